import t from 'tap'
import { build, sandbox } from './helpers/index.js'
import { ERROR_STATUS } from '../lib/errors.js'
import { packageInfo } from '../lib/package-info.js'

/* eslint-disable @typescript-eslint/no-explicit-any -- walking a JSON document */
type Doc = any

const ERROR_REF = '#/components/schemas/AgentSessionsError'

// What each route can answer: its own errors plus those the HTTP glue gives
// any route (408 and 431 from the server before routing, 500, 503 while
// closing; 400/413/415 for a body).
const ROUTES = {
  'POST /api/session/start': [200, 400, 401, 408, 413, 415, 429, 431, 500, 502, 503, 504],
  'POST /api/ask': [200, 400, 401, 404, 408, 409, 413, 415, 429, 431, 500, 502, 503, 504],
  'POST /api/heartbeat': [200, 400, 401, 404, 408, 431, 500, 503],
  'POST /api/session/end': [200, 400, 401, 404, 408, 431, 500, 503],
  'GET /api/health': [200, 408, 431, 500, 503]
} as const

function operation (doc: Doc, route: string): Doc {
  const [method, path] = route.split(' ')
  return doc.paths?.[path]?.[method.toLowerCase()]
}

t.test('GET /documentation/json lists every route with its parameters, bodies, responses and error codes', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const res = await app.inject({ method: 'GET', url: '/documentation/json' })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^application\/json/)
  const doc: Doc = res.json()
  t.equal(doc.openapi, '3.1.0')
  t.equal(doc.info.version, packageInfo.version)
  t.notOk(doc.paths['/documentation/json'], 'the document does not list itself')

  for (const [route, statuses] of Object.entries(ROUTES)) {
    const op = operation(doc, route)
    t.ok(op, `${route} is documented`)
    if (op === undefined) continue
    t.type(op.summary, 'string', `${route} has a summary`)
    t.same(Object.keys(op.responses).map(Number).sort((a, b) => a - b), statuses, `${route} responses`)
    t.ok(op.responses['200'].content['application/json'].schema.properties, `${route} 200 has a body schema`)
    for (const status of statuses.filter((s) => s >= 400)) {
      const response = op.responses[String(status)]
      t.equal(response.content['application/json'].schema.$ref, ERROR_REF, `${route} ${status} is the error shape`)
      const codes = Object.entries(ERROR_STATUS).filter(([code, s]) => s === status && code !== 'NOT_FOUND').map(([code]) => code)
      for (const code of codes) t.match(response.description, code, `${route} ${status} names ${code}`)
    }
  }

  // Query parameters.
  for (const route of ['POST /api/ask', 'POST /api/heartbeat', 'POST /api/session/end']) {
    const params = operation(doc, route).parameters
    t.match(params, [{ in: 'query', name: 'session_id', required: true, schema: { type: 'string', minLength: 1 } }], `${route} session_id`)
  }
  t.notOk(operation(doc, 'POST /api/session/start').parameters, 'start takes no query')

  // Bodies.
  const askBody = operation(doc, 'POST /api/ask').requestBody
  t.equal(askBody.required, true)
  t.match(askBody.content['application/json'].schema, { type: 'object', required: ['question'], properties: { question: { type: 'string', minLength: 1 } } })
  const startBody = operation(doc, 'POST /api/session/start').requestBody
  t.equal(startBody.required, false, 'the Janus client sends no body')
  t.match(JSON.stringify(startBody.content['application/json'].schema), /"idle_timeout"/)
  t.notOk(operation(doc, 'POST /api/heartbeat').requestBody)

  // Success bodies.
  const props = (route: string): string[] => Object.keys(operation(doc, route).responses['200'].content['application/json'].schema.properties)
  t.match(props('POST /api/session/start'), ['session_id', 'message', 'idle_timeout_seconds', 'expires_at'])
  t.same(props('POST /api/ask').sort(), ['answer', 'session_id', 'stop_reason'])
  t.match(props('POST /api/heartbeat'), ['message', 'session_id', 'last_activity'])
  t.equal(operation(doc, 'POST /api/heartbeat').responses['200'].content['application/json'].schema.properties.last_activity.format, 'date-time')
  t.same(props('POST /api/session/end').sort(), ['message', 'session_id'])
  t.match(props('GET /api/health'), ['status', 'version', 'uptime_seconds', 'active_sessions', 'busy_sessions', 'hibernated_sessions', 'memory_usage_mb', 'agent', 'store', 'reaper'])

  // The shared error schema, once, by name.
  t.match(doc.components.schemas.AgentSessionsError, {
    type: 'object',
    required: ['error', 'details', 'request_id', 'timestamp'],
    properties: { error: { type: 'string' }, details: { type: 'string' }, reason: { type: 'string' } }
  })

  // Every error code a route can answer appears somewhere.
  const text = JSON.stringify(doc.paths)
  for (const code of Object.keys(ERROR_STATUS).filter((c) => c !== 'NOT_FOUND')) t.match(text, code, `${code} is documented`)

  // Metrics, as text.
  const metrics = operation(doc, 'GET /metrics')
  t.ok(metrics.responses['200'].content['text/plain'], '/metrics answers text/plain')

  // Without API_TOKEN the token is optional.
  t.same(operation(doc, 'POST /api/ask').security, [{ bearerAuth: [] }, {}])
  t.notOk(operation(doc, 'GET /api/health').security)
  t.match(doc.components.securitySchemes.bearerAuth, { type: 'http', scheme: 'bearer' })
})

t.test('with API_TOKEN every route but health requires the bearer token', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { apiToken: 'sesame' })
  const res = await app.inject({ method: 'GET', url: '/documentation/json', headers: { authorization: 'Bearer sesame' } })
  t.equal(res.statusCode, 200)
  const doc: Doc = res.json()
  for (const route of ['POST /api/session/start', 'POST /api/ask', 'POST /api/heartbeat', 'POST /api/session/end', 'GET /metrics']) {
    t.same(operation(doc, route).security, [{ bearerAuth: [] }], route)
  }
  t.notOk(operation(doc, 'GET /api/health').security, 'health stays open')
})
