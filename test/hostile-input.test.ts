// Property-based: whatever a client sends (method, path, query string, content
// type, headers, body), the service answers in bounded time, never with a 5xx,
// always in the JSON error shape, and stays healthy afterwards. Requests with a
// real session id and a well-formed body run real agent turns (the simulator).

import t, { type Test } from 'tap'
import fc from 'fast-check'
import type { FastifyInstance, HTTPMethods, InjectOptions, LightMyRequestResponse } from 'fastify'
import { AGENT_CALL_TIMEOUT_MS, ask, build, sandbox, startSession, waitForGone } from './helpers/index.js'

// A request may run an agent turn, which the service bounds itself (ASK_TIMEOUT,
// AGENT_CALL_TIMEOUT_MS here, answered 504): past that plus a margin, it hangs.
const REQUEST_BOUND_MS = AGENT_CALL_TIMEOUT_MS + 10_000
// Counted runs, not a time budget: on a busy machine a time budget would run
// fewer requests, and fewer of them would reach the agent. About one run in
// eight runs a turn: 200 runs make fewer than 5 turns practically impossible.
const RUNS = 200
const TOKEN = 'hostile-input-token-0123456789abcdef'

const METHODS: HTTPMethods[] = ['GET', 'POST', 'PUT', 'DELETE', 'PATCH', 'OPTIONS', 'HEAD', 'TRACE', 'SEARCH', 'PROPFIND']

const KNOWN_PATHS = ['/api/session/start', '/api/ask', '/api/heartbeat', '/api/session/end', '/api/health', '/metrics', '/documentation/json', '/']

const path = fc.oneof(
  { weight: 4, arbitrary: fc.constantFrom(...KNOWN_PATHS) },
  fc.constantFrom('//api//ask', '/api/ask/', '/API/ASK', '/api/ask%00', '/api/%2e%2e/%2e%2e/etc/passwd', '/api/session/start/../end',
    '/api/ask;jsessionid=1', '/api/ask#frag', '/%', '/%ZZ', '/\u0000', '/api/\u00e9\u{1F600}', `/${'a'.repeat(20_000)}`),
  // An HTTP request line always has a path; light-my-request cannot send an empty one.
  fc.webPath().map((p) => p.startsWith('/') ? p : `/${p}`),
  fc.string({ unit: 'binary', maxLength: 40 }).map((s) => `/api/${encodeURIComponent(s)}`)
)

function queryArbitrary (sessionId: () => string): fc.Arbitrary<string> {
  const ids = fc.oneof(
    fc.constant('REAL'),
    fc.string({ maxLength: 60 }),
    fc.string({ unit: 'binary', maxLength: 60 }),
    fc.constantFrom('', '%', '%zz', '%00', 'null', 'undefined', '[]', '{}', '__proto__', 'constructor', '6b1c1a7e-0000-4000-8000-000000000000', 'x'.repeat(70_000))
  )
  const encode = (value: string): string => value === 'REAL' ? sessionId() : encodeURIComponent(value)
  return fc.oneof(
    fc.constant(''),
    ids.map((id) => `?session_id=${encode(id)}`),
    fc.tuple(ids, ids).map(([a, b]) => `?session_id=${encode(a)}&session_id=${encode(b)}`),
    ids.map((id) => `?session_id[]=${encode(id)}`),
    ids.map((id) => `?__proto__[session_id]=${encode(id)}&constructor[prototype][x]=1`),
    fc.webQueryParameters().map((q) => `?${q}`),
    fc.constantFrom('?', '?&&&', '?=', '?session_id', '?session_id=%', '?session_id=a%00b', `?${'k=v&'.repeat(5000)}`)
  ).map((query) => query)
}

const contentType = fc.constantFrom(undefined, 'application/json', 'application/json; charset=utf-8', 'application/json; charset=utf-16',
  'APPLICATION/JSON', 'application/json; boundary', 'text/plain', 'text/plain; charset=latin1', 'application/x-www-form-urlencoded',
  'multipart/form-data; boundary=x', 'application/xml', 'application/octet-stream', '', 'garbage', '*/*', 'application/json, text/plain',
  'application/vnd.api+json', 'application/\u0000json')

const questionValue = fc.oneof(
  fc.string({ maxLength: 200 }),
  fc.string({ unit: 'binary', maxLength: 200 }),
  fc.string({ unit: 'grapheme', maxLength: 50 }),
  fc.constantFrom('\u0000', 'a\u0000b', '   ', '\n\t', '\uFEFF', '\ud800', '--help', '-p', '$(rm -rf /)', '`id`', '"; DROP TABLE x; --'),
  fc.constant('q'.repeat(70_000)),
  fc.jsonValue(),
  fc.anything()
)

const body = fc.oneof(
  fc.constant(undefined),
  fc.constantFrom('', ' ', 'null', 'true', '0', '[]', '{}', '"question"', '{"question":', '{"question":"x"', '{question:"x"}', "{'question':'x'}",
    '{"question":"x"}}', '{"question":"x",}', '\u0000', '{"question":"a\u0000b"}', '{"question":"\\u0000"}', '{"question":"\\ud800"}',
    '{"__proto__":{"polluted":1},"question":"x"}', '{"constructor":{"prototype":{"polluted":1}},"question":"x"}',
    '['.repeat(20_000) + ']'.repeat(20_000), '{"a":'.repeat(5000) + '1' + '}'.repeat(5000), '{"question":"' + 'x'.repeat(2_000_000) + '"}'),
  questionValue.map((question) => safeStringify({ question })),
  fc.record({ question: questionValue, idle_timeout: fc.oneof(fc.string({ maxLength: 40 }), fc.integer(), fc.double(), fc.jsonValue()) }, { requiredKeys: [] }).map(safeStringify),
  fc.jsonValue().map(safeStringify),
  fc.string({ unit: 'binary', maxLength: 500 }),
  fc.uint8Array({ maxLength: 500 }).map((bytes) => Buffer.from(bytes))
)

const extraHeaders = fc.record({
  authorization: fc.oneof(fc.constant(undefined), fc.string({ maxLength: 80 }).map((s) => `Bearer ${s}`),
    fc.constantFrom('', 'Bearer', 'Basic Zm9vOmJhcg==', `Bearer ${TOKEN.slice(1)}`, `bearer ${TOKEN}x`, 'Bearer \u0000')),
  'x-request-id': fc.oneof(fc.constant(undefined), fc.string({ maxLength: 300 }), fc.constantFrom('../../etc', '\u0000', 'a'.repeat(5000))),
  accept: fc.constantFrom(undefined, 'application/json', 'text/html', '*/*', 'application/xml', ''),
  'accept-encoding': fc.constantFrom(undefined, 'gzip', 'br', 'identity;q=0', '*')
}, { requiredKeys: [] })

function safeStringify (value: unknown): string {
  try {
    return JSON.stringify(value) ?? 'null'
  } catch {
    return String(value)
  }
}

// Header values must be printable; light-my-request (like Node) refuses others outright.
function printableHeaders (headers: Record<string, string | undefined>): Record<string, string> {
  const out: Record<string, string> = {}
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined && /^[\t\x20-\x7e\x80-\xff]*$/.test(value)) out[name] = value
  }
  return out
}

async function bounded (app: FastifyInstance, request: InjectOptions): Promise<LightMyRequestResponse> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${REQUEST_BOUND_MS} ms: ${request.method} ${String(request.url).slice(0, 200)}`)), REQUEST_BOUND_MS)
  })
  try {
    return await Promise.race([app.inject(request), timeout])
  } finally {
    clearTimeout(timer)
  }
}

function describe (request: InjectOptions): string {
  const payload = request.payload === undefined ? '' : String(request.payload).slice(0, 200)
  return `${request.method} ${String(request.url).slice(0, 200)} ${JSON.stringify(request.headers ?? {}).slice(0, 300)} ${JSON.stringify(payload)}`
}

function requestArbitrary (sessionId: () => string): fc.Arbitrary<InjectOptions> {
  const anything = fc.record({
    method: fc.constantFrom(...METHODS),
    path,
    query: queryArbitrary(sessionId),
    contentType,
    body,
    headers: extraHeaders
  })
  // Well aimed: a session route, a live session id and JSON, so that hostile
  // bodies and questions get past routing and reach the manager and the agent.
  const aimed = fc.record({
    method: fc.constant<HTTPMethods>('POST'),
    path: fc.constantFrom('/api/ask', '/api/ask', '/api/ask', '/api/ask', '/api/heartbeat', '/api/session/start', '/api/session/end'),
    query: fc.constant(null).map(() => `?session_id=${sessionId()}`),
    contentType: fc.oneof({ weight: 4, arbitrary: fc.constant('application/json') }, contentType),
    body: fc.oneof({ weight: 3, arbitrary: questionValue.map((question) => safeStringify({ question })) }, body),
    headers: extraHeaders
  })
  return fc.oneof(anything, aimed).map(({ method, path, query, contentType, body, headers }) => {
    const all: Record<string, string | undefined> = { ...headers }
    if (contentType !== undefined) all['content-type'] = contentType
    return {
      method,
      url: path + query,
      headers: printableHeaders(all),
      ...(body === undefined ? {} : { payload: body })
    }
  })
}

function checkResponse (request: InjectOptions, res: LightMyRequestResponse): void {
  const what = describe(request)
  if (res.statusCode >= 500) throw new Error(`${res.statusCode} for ${what}: ${res.body.slice(0, 500)}`)
  if (request.method === 'HEAD' || res.statusCode < 400) return
  let parsed: { error?: unknown, details?: unknown, request_id?: unknown, timestamp?: unknown }
  try {
    parsed = res.json()
  } catch {
    throw new Error(`${res.statusCode} without a JSON body for ${what}: ${res.body.slice(0, 300)}`)
  }
  // A URL that cannot be decoded is refused by Fastify's router before any
  // plugin sees it; only the server's `frameworkErrors` option could reshape it.
  if (res.statusCode === 400 && (parsed as { code?: unknown }).code === 'FST_ERR_BAD_URL') return
  if (typeof parsed.error !== 'string' || typeof parsed.details !== 'string' || typeof parsed.request_id !== 'string' || typeof parsed.timestamp !== 'string') {
    throw new Error(`${res.statusCode} not in the error shape for ${what}: ${res.body.slice(0, 300)}`)
  }
}

async function stillHealthy (t: Test, app: FastifyInstance, headers: Record<string, string> = {}): Promise<void> {
  t.equal((await app.inject({ method: 'GET', url: '/api/health' })).statusCode, 200, 'health answers 200')
  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers })
  t.equal(start.statusCode, 200, `a normal start works: ${start.body}`)
  const id = start.json().session_id as string
  const res = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, headers, payload: { question: 'still fine?' } })
  t.equal(res.statusCode, 200, 'a normal ask works')
  t.equal(res.json().answer, 'Answer 1: you asked "still fine?"')
  t.equal(({} as Record<string, unknown>).polluted, undefined, 'no prototype pollution')
}

t.test('random requests: no 5xx, no hang, JSON errors; the server stays healthy', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxSessions: 10_000, startRateLimit: 100_000, maxQuestionBytes: 65_536 })
  let sessionId = await startSession(app)
  let runs = 0
  const outcomes = new Map<string, number>()
  let turns = 0
  app.agentSessions.on('turn-finished', () => { turns++ })
  await fc.assert(fc.asyncProperty(requestArbitrary(() => sessionId), async (request) => {
    runs++
    const res = await bounded(app, request)
    checkResponse(request, res)
    const key = `${res.statusCode} ${res.statusCode >= 400 && request.method !== 'HEAD' ? String(res.json().error ?? res.json().code) : ''}`
    outcomes.set(key, (outcomes.get(key) ?? 0) + 1)
    // A random end may have ended the session the generator hands out: keep one alive.
    if (app.agentSessions.counts().active === 0 || app.agentSessions.endedReason(sessionId) !== undefined) sessionId = await startSession(app)
  }), { numRuns: RUNS })
  t.equal(runs, RUNS, `${runs} random requests`)
  t.comment(`agent turns run: ${turns}; outcomes: ${JSON.stringify(Object.fromEntries([...outcomes].sort()))}`)
  t.ok(turns >= 5, `random questions reached the agent (${turns} turns)`)
  await stillHealthy(t, app)
  await app.close()
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], `no agent process left of ${box.pids().length}`)
})

t.test('with API_TOKEN, no random request without the token gets past authentication', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { apiToken: TOKEN, maxSessions: 10_000, startRateLimit: 100_000 })
  const authed = { authorization: `Bearer ${TOKEN}` }
  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: authed })
  const sessionId = start.json().session_id as string
  // Health runs `cursor-agent --version`, so count the manager's work rather than processes.
  const work: string[] = []
  app.agentSessions.on('session-started', () => work.push('session started'))
  app.agentSessions.on('turn-finished', () => work.push('turn ran'))
  app.agentSessions.on('session-ended', () => work.push('session ended'))
  await fc.assert(fc.asyncProperty(requestArbitrary(() => sessionId), async (request) => {
    const res = await bounded(app, request)
    checkResponse(request, res)
    const path = String(request.url).split('?')[0]
    const isHealth = path === '/api/health' && (request.method === 'GET' || request.method === 'HEAD')
    if (!isHealth && res.statusCode < 400) throw new Error(`${res.statusCode} without the token for ${describe(request)}`)
  }), { numRuns: 150 })
  t.same(work, [], 'no request without the token started, ended or asked anything')
  t.equal(app.agentSessions.counts().active, 1, 'nor started or ended a session')
  await stillHealthy(t, app, authed)
  t.equal((await ask(app, sessionId, 'no token')).statusCode, 401)
})
