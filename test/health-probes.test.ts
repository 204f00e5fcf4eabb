// The probes containers and Kubernetes use: GET /api/health/live and
// GET /api/health/ready. Open without the token, documented, and ready only
// when a new session can start.

import t from 'tap'
import { agentWrapper, build, sandbox } from './helpers/index.js'

t.test('live and ready answer 200 while the agent answers', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const live = await app.inject({ method: 'GET', url: '/api/health/live' })
  t.equal(live.statusCode, 200)
  t.same(live.json(), { status: 'ok' })
  const ready = await app.inject({ method: 'GET', url: '/api/health/ready' })
  t.equal(ready.statusCode, 200)
  t.same(ready.json(), { status: 'ready', checks: ['accepting', 'agent'] })
  t.equal((await app.inject({ method: 'HEAD', url: '/api/health/ready' })).statusCode, 200, 'HEAD too')
})

t.test('ready answers 503 when the agent does not answer; live stays 200; /api/health stays 200 (degraded)', async (t) => {
  const box = sandbox(t)
  const agent = agentWrapper(t)
  agent.remove()
  const app = await build(t, box, { cursorAgentBin: agent.bin })
  const ready = await app.inject({ method: 'GET', url: '/api/health/ready' })
  t.equal(ready.statusCode, 503)
  const body = ready.json()
  t.equal(body.error, 'SERVICE_UNAVAILABLE')
  t.match(body.details, /^Not ready: agent: the agent \(.*cursor-agent\) is not usable$/)
  t.equal(body.request_id, ready.headers['x-request-id'])
  t.equal(ready.headers['retry-after'], '5')
  t.equal((await app.inject({ method: 'GET', url: '/api/health/live' })).statusCode, 200)
  const health = await app.inject({ method: 'GET', url: '/api/health' })
  t.equal(health.statusCode, 200, 'the Janus health route keeps its contract')
  t.equal(health.json().status, 'degraded')
})

t.test('once the server starts closing, ready answers 503', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  t.equal((await app.inject({ method: 'GET', url: '/api/health/ready' })).statusCode, 200)
  // What close() does first (preClose): refuse new work and end every session.
  await app.agentSessions.shutdown()
  const ready = await app.inject({ method: 'GET', url: '/api/health/ready' })
  t.equal(ready.statusCode, 503)
  t.equal(ready.json().error, 'SERVICE_UNAVAILABLE')
  t.equal(ready.headers.connection, 'close', 'and the connection is not kept open')
})

t.test('with API_TOKEN the probes need no token; the OpenAPI document lists them, open', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { apiToken: 'sesame' })
  for (const url of ['/api/health/live', '/api/health/ready']) {
    t.equal((await app.inject({ method: 'GET', url })).statusCode, 200, `GET ${url}`)
    t.equal((await app.inject({ method: 'HEAD', url })).statusCode, 200, `HEAD ${url}`)
  }
  t.equal((await app.inject({ method: 'GET', url: '/api/health/other' })).statusCode, 401, 'no other path under health is open')

  const doc = (await app.inject({ method: 'GET', url: '/documentation/json', headers: { authorization: 'Bearer sesame' } })).json()
  const live = doc.paths['/api/health/live'].get
  const ready = doc.paths['/api/health/ready'].get
  t.equal(live.operationId, 'healthLive')
  t.equal(ready.operationId, 'healthReady')
  t.notOk(live.security, 'live is open')
  t.notOk(ready.security, 'ready is open')
  t.match(live.responses['200'].content['application/json'].schema.properties.status, { enum: ['ok'] })
  t.match(ready.responses['200'].content['application/json'].schema.properties, { status: { enum: ['ready'] }, checks: { type: 'array' } })
  t.equal(ready.responses['503'].content['application/json'].schema.$ref, '#/components/schemas/AgentSessionsError')
})
