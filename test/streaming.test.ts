// Streaming over real HTTP: an ask as Server-Sent Events (both drivers), the
// session's own stream with any number of subscribers, replay, expiry
// warnings, permission by the user, and a stalled consumer cut off.

import t, { type Test } from 'tap'
import { connect } from 'node:net'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import { EventSource } from 'eventsource'
import { createParser } from 'eventsource-parser'
import type { AgentDriver, PromptOptions } from '../lib/agents/types.js'
import { AGENT_CALL_TIMEOUT_MS, ask, build, sandbox, startSession, waitFor, type BuildOptions, type Sandbox } from './helpers/index.js'
import { openSse, until, type SseEvent } from './helpers/sse.js'
import { promptOnlyDriver } from './helpers/fake-driver.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))

async function served (t: Test, box: Sandbox, options: BuildOptions = {}): Promise<{ app: FastifyInstance, base: string }> {
  const app = await build(t, box, options)
  await app.listen({ port: 0, host: '127.0.0.1' })
  const address = app.server.address() as { port: number }
  return { app, base: `http://127.0.0.1:${address.port}` }
}

function askStream (base: string, id: string, question: string, headers: Record<string, string> = {}): ReturnType<typeof openSse> {
  return openSse(`${base}/api/ask?session_id=${id}`, { method: 'POST', body: JSON.stringify({ question }), headers })
}

const names = (events: SseEvent[]): string[] => events.map((e) => e.event)

t.test('an ask streams its events in order and ends with the JSON reply\'s fields (cursor driver)', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  const stream = await askStream(base, id, 'stream it')
  t.equal(stream.status, 200)
  t.match(stream.headers.get('content-type'), /^text\/event-stream/)
  t.ok(stream.headers.get('x-request-id'), 'request id on the stream too')
  const events = await stream.all()
  const order = names(events)
  t.equal(order.at(-1), 'answer', `answer comes last: ${order.join(', ')}`)
  t.ok(order.indexOf('thought') < order.indexOf('tool_call') && order.indexOf('tool_call') < order.indexOf('chunk'), 'thought, then tool_call, then chunks')
  const chunks = events.filter((e) => e.event === 'chunk').map((e) => e.data.text).join('')
  const answer = events.at(-1)?.data
  t.equal(chunks, answer?.answer, 'the chunks add up to the answer')
  t.match(events.find((e) => e.event === 'tool_call')?.data, { id: 'call_1', title: 'shell: ls', kind: 'execute', status: 'in_progress' })

  const json = await ask(app, id, 'stream it')
  t.same(Object.keys(answer ?? {}).sort(), Object.keys(json.json()).sort(), 'the same fields as the JSON reply')
  t.same({ ...answer, answer: null }, { ...json.json(), answer: null })
})

t.test('the first chunk arrives while the turn is still running', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  // Half a second between words: the check below has seconds, however busy the machine.
  const stream = await askStream(base, id, 'one word at a time [[fault:slow-chunks=500]]')
  await until(stream, (e) => e.event === 'chunk', 'the first chunk')
  t.equal(app.agentSessions.get(id).state, 'busy', 'the turn had not ended when the first chunk arrived')
  const rest = await stream.all()
  t.equal(rest.at(-1)?.event, 'answer')
})

t.test('without the Accept header the ask is exactly the JSON of old', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  const res = await fetch(`${base}/api/ask?session_id=${id}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'plain' }) })
  t.match(res.headers.get('content-type'), /^application\/json/)
  t.same(Object.keys(await res.json() as object).sort(), ['answer', 'session_id', 'stop_reason'])
})

t.test('refused before the turn starts: a JSON error with its status; after: an error event', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box, { maxQuestionBytes: 64 })
  const id = await startSession(app)
  const unknown = await askStream(base, 'no-such-session', 'hi')
  t.equal(unknown.status, 404)
  t.equal(unknown.json?.error, 'SESSION_NOT_FOUND')
  const big = await askStream(base, id, 'x'.repeat(100))
  t.equal(big.status, 413)
  t.equal(big.json?.error, 'PAYLOAD_TOO_LARGE')
  const busy = await askStream(base, id, 'slow [[fault:slow-chunks=300]]')
  await until(busy, (e) => e.event === 'chunk', 'the first turn streams')
  const second = await askStream(base, id, 'me too')
  t.equal(second.status, 409)
  t.equal(second.json?.error, 'SESSION_BUSY')
  await busy.all()

  const failing = await askStream(base, id, 'fail [[fault:exit-1]]')
  t.equal(failing.status, 200, 'the stream had started')
  const events = await failing.all()
  t.equal(events.at(-1)?.event, 'error')
  t.match(events.at(-1)?.data, { error: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 1/ })
})

t.test('a dropped stream does not cancel the turn; history has the answer', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  const finished = new Promise<{ outcome: string }>((resolve) => app.agentSessions.once('turn-finished', resolve))
  const stream = await askStream(base, id, 'keep going [[fault:slow-chunks=150]]')
  await until(stream, (e) => e.event === 'chunk', 'the first chunk')
  stream.abort()
  t.equal((await finished).outcome, 'answered', 'the turn ran to its end')
  const history = (await app.inject({ method: 'GET', url: `/api/session/history?session_id=${id}` })).json()
  t.equal(history.turns.length, 1)
  t.match(history.turns[0], { question: 'keep going [[fault:slow-chunks=150]]', answer: 'Answer 1: you asked "keep going"', stop_reason: 'end_turn', error: null })
  t.ok(Date.parse(history.turns[0].ended_at) >= Date.parse(history.turns[0].started_at))
})

t.test('cancel mid-stream ends the stream with stop_reason cancelled', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  // Half a second between words: the cancel has seconds to arrive before the turn ends by itself.
  const stream = await askStream(base, id, 'long one, word by word [[fault:slow-chunks=500]]')
  const before = await until(stream, (e) => e.event === 'chunk', 'the first chunk')
  await app.inject({ method: 'POST', url: `/api/cancel?session_id=${id}` })
  const events = [...before, ...await stream.all()]
  const last = events.at(-1)
  t.equal(last?.event, 'answer')
  t.equal(last?.data.stop_reason, 'cancelled')
  t.ok(String(last?.data.answer).startsWith(String(before.at(-1)?.data.text)), 'the answer keeps what streamed before the cancel')
})

t.test('a session stream: state, the turn\'s events, ended; two subscribers see the same; replay with Last-Event-ID', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box)
  const id = await startSession(app)
  const first = await openSse(`${base}/api/session/events?session_id=${id}`)
  const second = await openSse(`${base}/api/session/events?session_id=${id}`)
  t.same((await first.next())?.data, { state: 'idle' }, 'the current state comes first')
  t.same((await second.next())?.data, { state: 'idle' })
  const answered = await ask(app, id, 'watch this')
  t.equal(answered.statusCode, 200)
  const a = await until(first, (e) => e.event === 'answer', 'the answer on the first stream')
  const b = await until(second, (e) => e.event === 'answer', 'the answer on the second stream')
  t.same(a, b, 'both subscribers saw the same events with the same ids')
  t.same(names(a).slice(0, 1), ['state'])
  t.equal(a[0].data.state, 'busy')
  t.same(a.at(-1)?.data, answered.json(), 'the turn\'s answer, as the JSON reply')

  // A third client that saw up to the first event reconnects: it gets the rest.
  const replay = await openSse(`${base}/api/session/events?session_id=${id}`, { headers: { 'last-event-id': String(a[0].id) } })
  t.same((await replay.next())?.data, { state: 'idle' }, 'the current state first')
  const missed = await until(replay, (e) => e.event === 'state' && e.data.state === 'idle', 'the missed events up to idle')
  t.same(missed.map((e) => e.id), [...a.slice(1).map((e) => e.id), missed.at(-1)?.id], 'exactly the events after Last-Event-ID')

  await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })
  const tail = await first.all()
  t.same(tail.at(-1), { event: 'ended', data: { reason: 'ended' }, id: tail.at(-1)?.id }, 'ended is last, then the stream closes')
  await second.all()
  await replay.all()
  const gone = await fetch(`${base}/api/session/events?session_id=${id}`)
  t.equal(gone.status, 404, 'an ended id answers 404 JSON')
  t.match(await gone.json(), { error: 'SESSION_NOT_FOUND', reason: 'ended' })
})

t.test('expiring comes before ended, and a heartbeat postpones it; an open stream is not activity', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box, { sessionTimeout: '6s', expiryWarning: '5s', cleanupInterval: '100ms' })
  const id = await startSession(app)
  const source = new EventSource(`${base}/api/session/events?session_id=${id}`)
  t.teardown(() => { source.close() })
  const seen: Array<{ type: string, data: Record<string, unknown> }> = []
  const arrived = (type: string, count: number): Promise<void> => waitFor(() => seen.filter((e) => e.type === type).length >= count, `${count} ${type}`).then(() => {})
  for (const type of ['state', 'expiring', 'ended']) {
    source.addEventListener(type, (event) => { seen.push({ type, data: JSON.parse((event as MessageEvent).data) }) })
  }
  await arrived('expiring', 1)
  const firstWarning = seen.find((e) => e.type === 'expiring')?.data as { expires_at: string, seconds_left: number }
  t.ok(firstWarning.seconds_left <= 5 && firstWarning.seconds_left >= 0, `seconds_left ${firstWarning.seconds_left}`)
  const beat = await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}` })
  t.equal(beat.statusCode, 200, 'the warned session is still there')
  await arrived('expiring', 2)
  const secondWarning = seen.filter((e) => e.type === 'expiring')[1].data as { expires_at: string }
  t.ok(Date.parse(secondWarning.expires_at) > Date.parse(firstWarning.expires_at), 'the heartbeat moved the expiry later')
  await arrived('ended', 1)
  t.same(seen.at(-1), { type: 'ended', data: { reason: 'expired' } }, 'the reaper ended it, though a stream was open')
  t.ok(seen.findIndex((e) => e.type === 'expiring') < seen.findIndex((e) => e.type === 'ended'))
})

t.test('idle streams get comment lines so proxies keep them open', async (t) => {
  const box = sandbox(t)
  const { app, base } = await served(t, box, { streamHeartbeat: '100ms' })
  const id = await startSession(app)
  const stream = await openSse(`${base}/api/session/events?session_id=${id}`)
  await stream.next()
  await waitFor(() => stream.comments() >= 2, 'two comment lines')
  stream.abort()
  t.pass('comment lines arrived on an idle stream')
})

t.test('PERMISSION_POLICY=ask: the request streams, the client answers; no answer is a reject', async (t) => {
  const box = sandbox(t)
  // PERMISSION_TIMEOUT is short only where it is under test (nobody answers, below): here the client has time.
  const permissionApp = async (permissionTimeout: string | number): Promise<{ app: FastifyInstance, base: string }> => await served(t, box, {
    agentProtocol: 'acp',
    agentCommand: [process.execPath, ACP_SIMULATOR],
    permissionPolicy: 'ask',
    permissionTimeout
  })
  const { app, base } = await permissionApp(AGENT_CALL_TIMEOUT_MS)
  const id = await startSession(app)
  const watcher = await openSse(`${base}/api/session/events?session_id=${id}`)
  await watcher.next()

  const stream = await askStream(base, id, 'may I? [[fault:ask-permission]]')
  const asked = (await until(stream, (e) => e.event === 'permission', 'the permission request')).at(-1)?.data as { request_id: string, title: string, options: Array<{ option_id: string, kind: string }> }
  t.match(asked, { request_id: String, title: String })
  t.same(asked.options.map((o) => o.kind), ['allow_once', 'allow_always', 'reject_once'])
  const seenByWatcher = (await until(watcher, (e) => e.event === 'permission', 'the request on the session stream')).at(-1)?.data
  t.same(seenByWatcher, asked, 'the session\'s stream carries the same request')

  const wrong = await app.inject({ method: 'POST', url: `/api/permission?session_id=${id}`, payload: { request_id: asked.request_id, option_id: 'nope' } })
  t.equal(wrong.statusCode, 400, 'an option that was not offered')
  const unknown = await app.inject({ method: 'POST', url: `/api/permission?session_id=${id}`, payload: { request_id: 'perm_unknown', option_id: 'allow-once' } })
  t.equal(unknown.statusCode, 404)
  t.equal(unknown.json().error, 'PERMISSION_NOT_FOUND')
  const allow = asked.options.find((o) => o.kind === 'allow_once')?.option_id as string
  const answer = await app.inject({ method: 'POST', url: `/api/permission?session_id=${id}`, payload: { request_id: asked.request_id, option_id: allow } })
  t.equal(answer.statusCode, 200, answer.body)
  const decided = (await until(stream, (e) => e.event === 'permission', 'the decision')).at(-1)?.data
  t.same(decided, { request_id: asked.request_id, outcome: 'selected', option_id: allow })
  const final = (await until(stream, (e) => e.event === 'answer', 'the answer')).at(-1)?.data
  t.match(final?.answer, /Permission: selected allow-once/)
  const stale = await app.inject({ method: 'POST', url: `/api/permission?session_id=${id}`, payload: { request_id: asked.request_id, option_id: allow } })
  t.equal(stale.statusCode, 409)
  t.equal(stale.json().error, 'PERMISSION_ALREADY_DECIDED')

  watcher.abort()

  // Nobody answers: rejected after PERMISSION_TIMEOUT.
  const short = await permissionApp('1s')
  const other = await startSession(short.app)
  const unanswered = await askStream(short.base, other, 'again? [[fault:ask-permission]]')
  const events = await unanswered.all()
  const decisions = events.filter((e) => e.event === 'permission' && e.data.outcome !== undefined)
  t.same(decisions.map((e) => [e.data.outcome, e.data.option_id]), [['timeout', 'reject-once']], 'fail-safe deny')
  t.match(events.at(-1)?.data.answer, /Permission: selected reject-once/)
})

/** A driver whose turn pours out `chunks` chunks of `size` bytes as fast as it can. */
function floodDriver (chunks: number, size: number): AgentDriver {
  return promptOnlyDriver('flood', async (_text: string, options: PromptOptions) => {
    const text = 'x'.repeat(size)
    for (let i = 0; i < chunks; i++) {
      options.onEvent({ type: 'chunk', text })
      if (i % 16 === 0) await new Promise((resolve) => setImmediate(resolve))
    }
    return { answer: 'flooded', stopReason: 'end_turn', durationMs: 1 }
  })
}

t.test('a stalled consumer is cut off: what waits for it never passes STREAM_BUFFER_BYTES', async (t) => {
  const box = sandbox(t)
  const lines: Array<Record<string, unknown>> = []
  const logger = {
    level: 'warn',
    stream: { write: (line: string) => { lines.push(JSON.parse(line)) } }
  }
  const limit = 256 * 1024
  // 48 MB of chunks: far more than the kernel's socket buffers hold for a client that reads nothing.
  const { app, base } = await served(t, box, { driver: floodDriver(768, 64 * 1024), streamBufferBytes: limit, logger })
  const id = await startSession(app)
  const { port } = new URL(base)
  const socket = connect(Number(port), '127.0.0.1')
  t.teardown(() => { socket.destroy() })
  socket.on('error', () => {})
  socket.write(`POST /api/ask?session_id=${id} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n` +
    'Content-Type: application/json\r\nContent-Length: 20\r\n\r\n{"question":"flood"}')
  // Reads nothing: a phone in a tunnel.
  socket.pause()
  const finished = await new Promise<{ outcome: string }>((resolve) => app.agentSessions.once('turn-finished', resolve))
  t.equal(finished.outcome, 'answered', 'the turn itself went on to its end')
  await waitFor(() => lines.find((l) => l.msg === 'event stream consumer too slow: stream closed'), 'the cut')
  const cut = lines.find((l) => l.msg === 'event stream consumer too slow: stream closed') as { queuedBytes: number, limit: number }
  t.ok(cut.queuedBytes <= limit, `at most ${limit} bytes waited (${cut.queuedBytes})`)
  let open = -1
  const poll = (): void => { app.server.getConnections((_err, n) => { open = n }) }
  poll()
  await waitFor(() => { poll(); return open === 0 }, 'the server to close the stalled connection')
  t.equal(open, 0, 'the server closed the stalled connection')
  const health = await app.inject({ method: 'GET', url: '/api/health' })
  t.equal(health.statusCode, 200, 'the server keeps serving')
})

/** A full garbage collection, from a test process that was not started with --expose-gc. */
function collectGarbage (): () => number {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  return () => {
    for (let i = 0; i < 4; i++) gc()
    return process.memoryUsage().heapUsed
  }
}

t.test('a stream that stays open holds no memory per event it has sent', async (t) => {
  const settledHeap = collectGarbage()
  const box = sandbox(t)
  const eventsPerTurn = 20_000
  const { app, base } = await served(t, box, { driver: floodDriver(eventsPerTurn, 16) })
  const id = await startSession(app)
  // A watcher of the session, as a second device would be: reads every event, keeps none.
  let answers = 0
  let events = 0
  const parser = createParser({ onEvent: (e) => { events++; if (e.event === 'answer') answers++ } })
  const controller = new AbortController()
  t.teardown(() => { controller.abort() })
  const res = await fetch(`${base}/api/session/events?session_id=${id}`, { headers: { accept: 'text/event-stream' }, signal: controller.signal })
  void (async () => {
    const decoder = new TextDecoder()
    try {
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) parser.feed(decoder.decode(chunk, { stream: true }))
    } catch {}
  })()
  const turn = async (): Promise<void> => {
    const seen = answers
    t.equal((await ask(app, id, 'flood')).statusCode, 200)
    await waitFor(() => answers > seen, 'the watcher saw the answer')
  }
  // The first turn builds what is built once (code, buffers at their size).
  await turn()
  const before = settledHeap()
  const eventsBefore = events
  await turn()
  await turn()
  const grownBytes = settledHeap() - before
  t.ok(events - eventsBefore >= 2 * eventsPerTurn, `${events - eventsBefore} events went through the open stream`)
  // Racing each send against the stream's end leaked about 24 MB here (a promise reaction and its closures per event).
  t.ok(grownBytes < 4 * 1024 * 1024, `the heap grew by ${Math.round(grownBytes / 1024)} KiB over ${2 * eventsPerTurn} events`)
})
