import t from 'tap'
import { FakeDriver } from './helpers/fake-driver.js'
import type { InjectOptions } from 'fastify'
import { agentWrapper, ask, build, RUN_SIMULATOR_QUICK_VERSION, sandbox, SIMULATOR_VERSION, startSession, waitFor, waitForGone } from './helpers/index.js'

const JSON_HEADERS = { 'content-type': 'application/json' }

t.test('the Janus client sequence: start, ask, heartbeat, end, then 404 everywhere', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)

  // The Janus client posts Content-Type: application/json with NO body.
  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: JSON_HEADERS })
  t.equal(start.statusCode, 200, start.body)
  const { session_id: id, message } = start.json()
  t.match(id, /^[0-9a-f-]{36}$/)
  t.type(message, 'string')
  t.ok(start.headers['x-request-id'], 'X-Request-ID on every response')

  const answer = await ask(app, id, 'What does app.ts do?')
  t.equal(answer.statusCode, 200, answer.body)
  t.same(answer.json(), { answer: 'Answer 1: you asked "What does app.ts do?"', session_id: id, stop_reason: 'end_turn' })

  const beat = await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}`, headers: JSON_HEADERS })
  t.equal(beat.statusCode, 200, beat.body)
  t.equal(beat.json().session_id, id)
  t.type(beat.json().message, 'string')
  t.ok(!Number.isNaN(Date.parse(beat.json().last_activity)), 'last_activity is ISO 8601')
  t.equal(new Date(beat.json().last_activity).toISOString(), beat.json().last_activity)

  const end = await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}`, headers: JSON_HEADERS })
  t.equal(end.statusCode, 200, end.body)
  t.same(end.json(), { message: end.json().message, session_id: id })

  for (const [method, url, payload] of [
    ['POST', `/api/heartbeat?session_id=${id}`, undefined],
    ['POST', `/api/ask?session_id=${id}`, { question: 'still there?' }],
    ['POST', `/api/session/end?session_id=${id}`, undefined]
  ] as const) {
    const res = await app.inject({ method, url, headers: JSON_HEADERS, ...(payload === undefined ? {} : { payload }) })
    t.equal(res.statusCode, 404, `${url} after end`)
    const body = res.json()
    t.equal(body.error, 'SESSION_NOT_FOUND')
    t.equal(body.reason, 'ended')
    t.match(body.details, /ended by the client/)
    t.equal(body.request_id, res.headers['x-request-id'])
    t.ok(!Number.isNaN(Date.parse(body.timestamp)))
  }
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process left')
})

t.test('two sessions keep separate chats', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const a = await startSession(app)
  const b = await startSession(app)
  t.not(a, b)
  t.equal((await ask(app, a, 'remember the banana')).statusCode, 200)
  t.equal((await ask(app, a, 'and the apple')).statusCode, 200)
  t.equal((await ask(app, b, 'remember the cherry')).statusCode, 200)
  t.equal((await ask(app, a, 'show the history')).json().answer,
    'This chat has 2 earlier questions: remember the banana | and the apple')
  t.equal((await ask(app, b, 'show the history')).json().answer,
    'This chat has 1 earlier questions: remember the cherry')
})

t.test('a question that looks like a flag reaches the agent as text on stdin, never as argv', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const res = await ask(app, id, '--version')
  t.equal(res.json().answer, 'Answer 1: you asked "--version"')
  const argv = JSON.parse((await ask(app, id, '--force --help [[show:argv]]')).json().answer) as string[]
  t.notOk(argv.includes('--help'), 'the question is not in argv')
  t.same(argv.slice(0, 6), ['-p', '--output-format', 'stream-json', '--stream-partial-output', '--resume', argv[5]])
  t.ok(argv.includes('--trust'), 'headless runs trust the configured workspace by default')
  t.notOk(argv.includes('--force'), '--force only when AGENT_FORCE is set')
})

t.test('request errors are JSON with a code, and the server keeps running', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)

  const cases: Array<{ name: string, req: InjectOptions, status: number, code: string }> = [
    { name: 'missing session_id', req: { method: 'POST', url: '/api/heartbeat' }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'empty session_id', req: { method: 'POST', url: '/api/heartbeat?session_id=' }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'unknown session', req: { method: 'POST', url: '/api/heartbeat?session_id=6b1c1a7e-0000-4000-8000-000000000000' }, status: 404, code: 'SESSION_NOT_FOUND' },
    { name: 'malformed session id', req: { method: 'POST', url: '/api/session/end?session_id=%27%3B--' }, status: 404, code: 'SESSION_NOT_FOUND' },
    { name: 'ask without body', req: { method: 'POST', url: `/api/ask?session_id=${id}`, headers: JSON_HEADERS }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'ask with broken JSON', req: { method: 'POST', url: `/api/ask?session_id=${id}`, headers: JSON_HEADERS, payload: '{"question":' }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'ask with an object', req: { method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: { text: 'x' } } }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'ask with null', req: { method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: null } }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'ask with a blank question', req: { method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: '   ' } }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'ask with an empty question', req: { method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: '' } }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'proto poisoning', req: { method: 'POST', url: `/api/ask?session_id=${id}`, headers: JSON_HEADERS, payload: '{"question":"x","__proto__":{"a":1}}' }, status: 400, code: 'INVALID_REQUEST' },
    { name: 'unsupported media type', req: { method: 'POST', url: `/api/ask?session_id=${id}`, headers: { 'content-type': 'application/xml' }, payload: '<q/>' }, status: 415, code: 'UNSUPPORTED_MEDIA_TYPE' },
    { name: 'unknown route', req: { method: 'GET', url: '/api/nope' }, status: 404, code: 'NOT_FOUND' },
    { name: 'bad idle_timeout', req: { method: 'POST', url: '/api/session/start', payload: { idle_timeout: 'soon' } }, status: 400, code: 'INVALID_REQUEST' }
  ]
  for (const c of cases) {
    const res = await app.inject(c.req)
    t.equal(res.statusCode, c.status, `${c.name}: ${res.body}`)
    t.equal(res.json().error, c.code, c.name)
    t.type(res.json().details, 'string', c.name)
    t.ok(res.headers['x-request-id'], `${c.name} has X-Request-ID`)
  }
  t.equal((await ask(app, id, 'still fine?')).statusCode, 200, 'the session still works')
})

t.test('a question over MAX_QUESTION_BYTES is 413 and nothing runs', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxQuestionBytes: 100 })
  const id = await startSession(app)
  const before = box.pids().length
  const res = await ask(app, id, 'é'.repeat(60))
  t.equal(res.statusCode, 413)
  t.equal(res.json().error, 'PAYLOAD_TOO_LARGE')
  t.match(res.json().details, /MAX_QUESTION_BYTES/)
  t.equal(box.pids().length, before, 'no agent process was started')
})

t.test('one turn at a time: a second ask on a busy session is 409', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const slow = ask(app, id, 'take your time [[fault:slow=1500]]')
  // The second ask comes as soon as the first is under way; the first lasts 1.5 s more.
  await waitFor(() => app.agentSessions.get(id).state === 'busy', 'the first turn to start')
  const busy = await ask(app, id, 'me too')
  t.equal(busy.statusCode, 409)
  t.equal(busy.json().error, 'SESSION_BUSY')
  t.ok(busy.headers['retry-after'])
  const other = await startSession(app)
  t.equal((await ask(app, other, 'another session is not blocked')).statusCode, 200)
  t.equal((await slow).statusCode, 200)
  t.equal((await ask(app, id, 'now it is free')).statusCode, 200)
})

t.test('ending a session answers its in-flight ask with a JSON error, not a hang', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const pending = ask(app, id, 'long one [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]')
  // The simulator logs the grandchild once the turn ignores SIGTERM: the stuck turn is under way.
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'the stuck turn and its grandchild')
  const endedAt = Date.now()
  const end = await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })
  t.equal(end.statusCode, 200)
  const res = await pending
  t.equal(res.statusCode, 404)
  t.equal(res.json().error, 'SESSION_NOT_FOUND')
  t.equal(res.json().reason, 'ended')
  const pids = box.pids().map((p) => p.pid)
  t.ok(pids.length >= 3, 'create-chat, the turn and its grandchild were recorded')
  t.same(await waitForGone(pids), [], 'all gone')
  // KILL_GRACE (1 s), then SIGKILL; the slack is for a loaded machine, far below the turn's ASK_TIMEOUT (AGENT_CALL_TIMEOUT_MS).
  t.ok(Date.now() - endedAt < 1000 + 9000, `gone ${Date.now() - endedAt} ms after the end (KILL_GRACE 1000 ms)`)
})

t.test('health reports sessions, version and whether the agent answers', async (t) => {
  const box = sandbox(t)
  // An agent that answers --version well within the probe's 5 s, however busy the machine.
  const app = await build(t, box, { cursorAgentBin: agentWrapper(t, RUN_SIMULATOR_QUICK_VERSION).bin })
  await startSession(app)
  const res = await app.inject({ method: 'GET', url: '/api/health' })
  t.equal(res.statusCode, 200)
  const body = res.json()
  t.equal(body.status, 'ok')
  t.match(body.version, /^\d+\.\d+\.\d+/)
  t.equal(body.active_sessions, 1)
  t.equal(body.busy_sessions, 0)
  t.type(body.uptime_seconds, 'number')
  t.ok(body.memory_usage_mb > 0)
  t.same(body.agent, {
    protocol: 'cursor',
    binary: body.agent.binary,
    name: 'cursor-agent',
    available: true,
    version: SIMULATOR_VERSION,
    can_resume: true,
    live_processes: 0,
    live_rss_mb: 0
  })

  const missing = await build(t, box, { cursorAgentBin: '/nonexistent/cursor-agent' })
  const degraded = (await missing.inject({ method: 'GET', url: '/api/health' })).json()
  t.equal(degraded.status, 'degraded')
  t.match(degraded.agent, { binary: '/nonexistent/cursor-agent', available: false, version: null })
})

t.test('a client X-Request-ID is kept when well-formed', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const res = await app.inject({ method: 'POST', url: '/api/heartbeat', headers: { 'x-request-id': 'abc' } })
  // The test app uses Fastify's default request ids; the server wires the header (see server tests).
  t.ok(res.headers['x-request-id'])
  t.equal(res.json().request_id, res.headers['x-request-id'])
})

t.test('a 5xx never leaks internals', async (t) => {
  const box = sandbox(t)
  const driver = new FakeDriver()
  driver.openError = new Error('secret internal detail at /home/x/.cursor')
  const app = await build(t, box, { driver })
  const res = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(res.statusCode, 500)
  t.equal(res.json().error, 'INTERNAL_SERVER_ERROR')
  t.notMatch(res.body, /secret|home/)
  t.equal(app.agentSessions.counts().starting, 0, 'the failed start is not counted')
  t.equal(app.agentSessions.counts().active, 0)
})

t.test('a JSON body is taken as typed: a non-string question is 400 INVALID_REQUEST, never coerced', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const processes = box.pids().length
  for (const question of [42, ['a'], true, 0, [1, 2], { text: 'a' }]) {
    const res = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question } })
    t.equal(res.statusCode, 400, `${JSON.stringify(question)}: ${res.body}`)
    t.equal(res.json().error, 'INVALID_REQUEST')
    t.match(res.json().details, /question must be string/, JSON.stringify(question))
  }
  t.equal(box.pids().length, processes, 'no agent ran for them')
  // The query string is text: its coercion stays (a repeated session_id is taken as an array of one).
  const res = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: 'a string' } })
  t.equal(res.statusCode, 200, res.body)
})

t.test('idle_timeout: a duration with its unit or whole seconds, from 10 s to MAX_SESSION_TIMEOUT; anything else is 400', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxSessionTimeout: '2h' })
  const start = async (idle: unknown): Promise<{ status: number, body: Record<string, any> }> => {
    const res = await app.inject({ method: 'POST', url: '/api/session/start', payload: { idle_timeout: idle } })
    return { status: res.statusCode, body: res.json() }
  }
  for (const [idle, seconds] of [['30m', 1800], [90, 90], [10, 10], ['10s', 10], ['1.5m', 90], ['2h', 7200], [7200, 7200], ['10000ms', 10]] as const) {
    const res = await start(idle)
    t.equal(res.status, 200, `${JSON.stringify(idle)}: ${JSON.stringify(res.body)}`)
    t.equal(res.body.idle_timeout_seconds, seconds, `${JSON.stringify(idle)} is ${seconds} s`)
  }
  const bad: Array<[unknown, RegExp]> = [
    [1.5, /whole seconds/], [0.5, /whole seconds/], [-30, /from 10s to 2h/], [0, /from 10s to 2h/], [9, /from 10s to 2h/],
    ['9s', /from 10s to 2h/], ['1.5s', /from 10s to 2h/], ['9999ms', /from 10s to 2h/], ['2h1s', /with its unit/], ['121m', /from 10s to 2h/],
    [7201, /from 10s to 2h \(MAX_SESSION_TIMEOUT\)/], ['600', /with its unit/], ['soon', /with its unit/], ['', /with its unit/],
    [null, /idle_timeout/], [true, /idle_timeout/], [['30m'], /idle_timeout/]
  ]
  for (const [idle, details] of bad) {
    const res = await start(idle)
    t.equal(res.status, 400, `${JSON.stringify(idle)}: ${JSON.stringify(res.body)}`)
    t.equal(res.body.error, 'INVALID_REQUEST')
    t.match(res.body.details, details, JSON.stringify(idle))
  }
  t.equal(app.agentSessions.counts().active, 8, 'only the good ones started a session')
})

t.test('a body with __proto__ or constructor.prototype says so, not "not valid JSON"', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  for (const payload of ['{"question":"x","__proto__":{"a":1}}', '{"question":"x","constructor":{"prototype":{"a":1}}}', '{"idle_timeout":"30m","__proto__":{}}']) {
    const url = payload.includes('idle') ? '/api/session/start' : `/api/ask?session_id=${id}`
    const res = await app.inject({ method: 'POST', url, headers: JSON_HEADERS, payload })
    t.equal(res.statusCode, 400, payload)
    t.equal(res.json().error, 'INVALID_REQUEST')
    t.match(res.json().details, /"__proto__" key or a "constructor" with a "prototype"/, payload)
    t.notMatch(res.json().details, /not valid JSON/)
  }
  const broken = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, headers: JSON_HEADERS, payload: '{"question":' })
  t.equal(broken.json().details, 'The request body is not valid JSON', 'malformed JSON still says so')
  t.equal(({} as Record<string, unknown>).a, undefined, 'no prototype pollution')
})
