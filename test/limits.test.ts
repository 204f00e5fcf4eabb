// What one client can make the service do is bounded: sessions (counting
// starts in progress), question size, body size, and session starts per client
// per window. Every limit is a setting; each answers in the JSON error shape.

import t, { type Test } from 'tap'
import type { LightMyRequestResponse } from 'fastify'
import Fastify, { type FastifyInstance } from 'fastify'
import { trustProxyOption } from '../plugins/http.js'
import { FakeDriver } from './helpers/fake-driver.js'
import { ask, build, liftDecorators, ROOT, sandbox, sleep, startSession, waitFor } from './helpers/index.js'

/** open() answers only when the test opens the gate: starts stay "in progress" until then. */
function gatedDriver (): { driver: FakeDriver, open: () => void } {
  const driver = new FakeDriver()
  let open!: () => void
  driver.gate = new Promise<void>((resolve) => { open = resolve })
  return { driver, open }
}

function checkErrorShape (t: Test, body: Record<string, unknown>, code: string, what: string): void {
  t.equal(body.error, code, what)
  t.type(body.details, 'string', what)
  t.type(body.request_id, 'string', what)
  t.ok(!Number.isNaN(Date.parse(String(body.timestamp))), `${what}: timestamp`)
}

t.test('MAX_SESSIONS counts starts still in progress: a burst cannot overshoot it', async (t) => {
  const box = sandbox(t)
  const { driver, open } = gatedDriver()
  const app = await build(t, box, { driver, maxSessions: 2 })
  const start = async (): Promise<LightMyRequestResponse> => await app.inject({ method: 'POST', url: '/api/session/start' })

  const first = start()
  const second = start()
  // Both are waiting on create-chat: no session exists yet, but two are starting.
  await waitFor(() => app.agentSessions.counts().starting === 2, 'two starts in progress')
  t.same(app.agentSessions.counts(), { active: 0, busy: 0, starting: 2, closing: 0 }, 'two starts in progress, no session yet')

  const third = await start()
  t.equal(third.statusCode, 503, third.body)
  checkErrorShape(t, third.json(), 'SESSION_LIMIT_REACHED', 'third start')
  t.match(third.json().details, /MAX_SESSIONS/)
  t.ok(Number(third.headers['retry-after']) > 0, `Retry-After: ${third.headers['retry-after']}`)
  t.equal(driver.opened, 2, 'the refused start ran no agent')

  open()
  t.equal((await first).statusCode, 200)
  t.equal((await second).statusCode, 200)
  const fourth = await start()
  t.equal(fourth.statusCode, 503, 'still full with two sessions')

  const [one] = app.agentSessions.list()
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${one.id}` })).statusCode, 200)
  t.equal((await start()).statusCode, 200, 'ending one frees a place')
})

t.test('MAX_QUESTION_BYTES counts UTF-8 bytes: the limit passes, one byte more is 413 and runs nothing', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxQuestionBytes: 64 })
  const id = await startSession(app)
  const atLimit = 'é'.repeat(32) // 64 bytes, 32 characters
  const ok = await ask(app, id, atLimit)
  t.equal(ok.statusCode, 200, ok.body)
  const processes = box.pids().length
  const over = await ask(app, id, atLimit + 'x')
  t.equal(over.statusCode, 413, over.body)
  checkErrorShape(t, over.json(), 'PAYLOAD_TOO_LARGE', 'question')
  t.match(over.json().details, /65 bytes.*64.*MAX_QUESTION_BYTES/)
  t.equal(box.pids().length, processes, 'no agent process for the refused question')
})

t.test('BODY_LIMIT: a larger JSON body is 413 in the JSON error shape; the server goes on', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { bodyLimit: 2048, maxQuestionBytes: 100_000 })
  const id = await startSession(app)
  const url = `/api/ask?session_id=${id}`
  const headers = { 'content-type': 'application/json' }

  const under = JSON.stringify({ question: 'q'.repeat(1900) })
  t.ok(Buffer.byteLength(under) <= 2048)
  t.equal((await app.inject({ method: 'POST', url, headers, payload: under })).statusCode, 200, 'a body under the limit is read')

  for (const [what, payload] of [
    ['a long question', JSON.stringify({ question: 'q'.repeat(3000) })],
    ['junk after a short question', `{"question":"hi"}${' '.repeat(5000)}`],
    ['a 5 MB body', JSON.stringify({ question: 'x'.repeat(5_000_000) })]
  ] as const) {
    const res = await app.inject({ method: 'POST', url, headers, payload })
    t.equal(res.statusCode, 413, `${what}: ${res.body.slice(0, 200)}`)
    checkErrorShape(t, res.json(), 'PAYLOAD_TOO_LARGE', what)
  }
  // The start route has a body too (idle_timeout).
  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers, payload: JSON.stringify({ idle_timeout: '1'.repeat(4000) }) })
  t.equal(start.statusCode, 413, 'start body over the limit')
  t.equal((await ask(app, id, 'still here?')).statusCode, 200, 'the session still answers')
})

t.test('session starts are rate limited per client: 429 RATE_LIMITED with Retry-After; other routes are not', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { startRateLimit: 3, startRateWindow: '1m' })
  const ids: string[] = []
  for (let i = 0; i < 3; i++) ids.push(await startSession(app))
  const processes = box.pids().length

  const limited = await app.inject({ method: 'POST', url: '/api/session/start', headers: { 'content-type': 'application/json' } })
  t.equal(limited.statusCode, 429, limited.body)
  checkErrorShape(t, limited.json(), 'RATE_LIMITED', 'fourth start')
  t.match(limited.json().details, /at most 3 per 1m.*START_RATE_LIMIT/)
  t.equal(limited.json().request_id, limited.headers['x-request-id'])
  const retryAfter = Number(limited.headers['retry-after'])
  t.ok(retryAfter >= 1 && retryAfter <= 60, `Retry-After ${limited.headers['retry-after']} within the window`)
  t.equal(box.pids().length, processes, 'the limited start ran no agent')
  t.equal(app.agentSessions.counts().active, 3)

  // Another client has its own budget.
  const other = await app.inject({ method: 'POST', url: '/api/session/start', remoteAddress: '10.9.8.7' })
  t.equal(other.statusCode, 200, `another client: ${other.body}`)

  // Sessions already started are not held back: heartbeats and questions go on.
  for (let i = 0; i < 10; i++) {
    t.equal((await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${ids[0]}` })).statusCode, 200)
  }
  t.equal((await ask(app, ids[1], 'not limited')).statusCode, 200)
})

t.test('the start budget comes back after START_RATE_WINDOW', async (t) => {
  const box = sandbox(t)
  // No agent process: the two starts are milliseconds apart, well inside the window, however busy the machine.
  const app = await build(t, box, { driver: new FakeDriver(), startRateLimit: 1, startRateWindow: '1500ms' })
  await startSession(app)
  const limited = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(limited.statusCode, 429)
  t.ok(Number(limited.headers['retry-after']) <= 2, `Retry-After ${limited.headers['retry-after']}`)
  // Past the window (the limiter compares timestamps): lateness only makes it longer.
  await sleep(2500)
  const again = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(again.statusCode, 200, `after the window: ${again.body}`)
})

t.test('refused credentials do not spend a client\'s start budget', async (t) => {
  const box = sandbox(t)
  const token = 'limits-token-0123456789abcdef'
  const app = await build(t, box, { apiToken: token, startRateLimit: 2 })
  for (let i = 0; i < 5; i++) {
    t.equal((await app.inject({ method: 'POST', url: '/api/session/start' })).statusCode, 401)
  }
  const authed = { authorization: `Bearer ${token}` }
  t.equal((await app.inject({ method: 'POST', url: '/api/session/start', headers: authed })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/api/session/start', headers: authed })).statusCode, 200)
  t.equal((await app.inject({ method: 'POST', url: '/api/session/start', headers: authed })).statusCode, 429)
})

t.test('every limit is a validated setting with a message naming it', async (t) => {
  const box = sandbox(t)
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ startRateLimit: 0 }, /START_RATE_LIMIT \(option startRateLimit\) must be at least 1/],
    [{ startRateLimit: 'lots' }, /START_RATE_LIMIT \(option startRateLimit\) must be a whole number/],
    [{ startRateWindow: 'soon' }, /START_RATE_WINDOW \(option startRateWindow\) must be a duration/],
    [{ maxSessions: 0 }, /MAX_SESSIONS/],
    [{ maxQuestionBytes: 0 }, /MAX_QUESTION_BYTES/],
    [{ bodyLimit: 10 }, /BODY_LIMIT/]
  ]
  for (const [options, message] of cases) {
    await t.rejects(build(t, box, options as object), { message }, JSON.stringify(options))
  }
  const defaults = await build(t, box)
  t.equal(defaults.agentSessionsConfig.startRateLimit, 30, 'default START_RATE_LIMIT')
  t.equal(defaults.agentSessionsConfig.startRateWindowMs, 60_000, 'default START_RATE_WINDOW')
})

t.test('MAX_SESSIONS_PER_CLIENT: one client address cannot hold every slot; 503 CLIENT_SESSION_LIMIT_REACHED with Retry-After', async (t) => {
  const box = sandbox(t)
  const { driver, open } = gatedDriver()
  const app = await build(t, box, { driver, maxSessions: 10, maxSessionsPerClient: 2 })
  t.equal(app.agentSessionsConfig.maxSessionsPerClient, 2)
  const start = (remoteAddress: string): Promise<LightMyRequestResponse> => app.inject({ method: 'POST', url: '/api/session/start', remoteAddress })

  // Starts in progress count, as for MAX_SESSIONS.
  const first = start('198.51.100.7')
  const second = start('198.51.100.7')
  for (let i = 0; i < 200 && app.agentSessions.counts().starting < 2; i++) await sleep(10)
  const third = await start('198.51.100.7')
  t.equal(third.statusCode, 503, third.body)
  checkErrorShape(t, third.json(), 'CLIENT_SESSION_LIMIT_REACHED', 'third start from one client')
  t.match(third.json().details, /2 sessions \(MAX_SESSIONS_PER_CLIENT\)/)
  t.ok(Number(third.headers['retry-after']) > 0, `Retry-After: ${third.headers['retry-after']}`)
  t.equal(driver.opened, 2, 'the refused start ran no agent')

  open()
  t.equal((await first).statusCode, 200)
  t.equal((await second).statusCode, 200)
  t.equal((await start('198.51.100.7')).json().error, 'CLIENT_SESSION_LIMIT_REACHED', 'still at its limit')
  t.equal((await start('198.51.100.8')).statusCode, 200, 'another client has its own budget')

  const mine = app.agentSessions.list()[0].id
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${mine}` })).statusCode, 200)
  t.equal((await start('198.51.100.7')).statusCode, 200, 'ending one of its sessions frees a place')

  const defaults = await build(t, box, { driver: new FakeDriver() })
  t.equal(defaults.agentSessionsConfig.maxSessionsPerClient, 20, 'default MAX_SESSIONS_PER_CLIENT')
  await t.rejects(build(t, box, { maxSessionsPerClient: 0 }), { message: /MAX_SESSIONS_PER_CLIENT \(option maxSessionsPerClient\) must be at least 1/ })
})

t.test('behind a proxy the host trusts, the client address, the start rate limit and the per-client limit come from X-Forwarded-For', async (t) => {
  const box = sandbox(t)
  const hostWith = async (trustProxy: ReturnType<typeof trustProxyOption>): Promise<FastifyInstance> => {
    const host = Fastify({ logger: false, trustProxy })
    await host.register(liftDecorators, {
      driver: new FakeDriver(), workspaceDir: ROOT, maxSessions: 100, maxSessionsPerClient: 1, startRateLimit: 3,
      agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir }
    })
    await host.ready()
    t.after(() => host.close())
    return host
  }
  const start = async (host: FastifyInstance, remoteAddress: string, forwardedFor?: string): Promise<string> => {
    const res = await host.inject({ method: 'POST', url: '/api/session/start', remoteAddress, headers: forwardedFor === undefined ? {} : { 'x-forwarded-for': forwardedFor } })
    return res.statusCode === 200 ? 'ok' : String(res.json().error)
  }

  // TRUST_PROXY=10.0.0.0/8: the proxy's X-Forwarded-For names the client.
  const byAddress = await hostWith(trustProxyOption(['10.0.0.0/8']))
  t.equal(await start(byAddress, '10.1.2.3', '203.0.113.1'), 'ok')
  t.equal(await start(byAddress, '10.1.2.3', '203.0.113.1'), 'CLIENT_SESSION_LIMIT_REACHED', 'the same client behind the proxy')
  t.equal(await start(byAddress, '10.9.9.9', '203.0.113.1'), 'CLIENT_SESSION_LIMIT_REACHED', 'through another proxy of the list too')
  t.equal(await start(byAddress, '10.1.2.3', '203.0.113.1'), 'RATE_LIMITED', 'its start rate limit is its own')
  t.equal(await start(byAddress, '10.1.2.3', '203.0.113.2'), 'ok', 'another client behind the same proxy has its own budgets')
  // A client that is not a trusted proxy cannot pick its address.
  t.equal(await start(byAddress, '192.0.2.9', '198.51.100.1'), 'ok')
  t.equal(await start(byAddress, '192.0.2.9', '198.51.100.2'), 'CLIENT_SESSION_LIMIT_REACHED', 'X-Forwarded-For from an untrusted peer is ignored')

  // TRUST_PROXY=1: one hop, the nearest address in X-Forwarded-For is the client.
  const byHops = await hostWith(trustProxyOption(1))
  t.equal(await start(byHops, '10.1.2.3', '192.0.2.200, 203.0.113.7'), 'ok')
  t.equal(await start(byHops, '10.1.2.3', '192.0.2.201, 203.0.113.7'), 'CLIENT_SESSION_LIMIT_REACHED', 'what the client wrote further left does not count')
  t.equal(await start(byHops, '10.1.2.3', '203.0.113.8'), 'ok')

  // Off (the default): X-Forwarded-For is ignored, the peer is the client.
  const off = await hostWith(trustProxyOption(undefined))
  t.equal(await start(off, '127.0.0.1', '203.0.113.1'), 'ok')
  t.equal(await start(off, '127.0.0.1', '203.0.113.2'), 'CLIENT_SESSION_LIMIT_REACHED', 'without TRUST_PROXY every request from one peer is one client')
})
