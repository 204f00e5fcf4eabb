// The reaper with real agent processes and short timings, through the plugin
// and the HTTP API.

import t from 'tap'
import { Writable } from 'node:stream'
import { ask, build, sandbox, sleep, startSession, waitFor, waitForGone } from './helpers/index.js'
import type { EndReport } from '../lib/sessions/manager.js'

const TIMEOUT_MS = 1000
const INTERVAL_MS = 200
const SHORT = { sessionTimeout: TIMEOUT_MS, cleanupInterval: INTERVAL_MS }
// Sweeps are timers: on a loaded machine they fire late. The exact timing is
// tested with an injected clock (reaper.test.ts) and measured in bench/
// (precision); here a reap must come by itself, never early, and well before
// 10x the time it should take.
const REAP_BOUND_MS = 10 * (TIMEOUT_MS + INTERVAL_MS)

function logSink (): { stream: Writable, lines: Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = []
  const stream = new Writable({
    write (chunk, _encoding, done) {
      for (const line of String(chunk).split('\n')) if (line !== '') lines.push(JSON.parse(line))
      done()
    }
  })
  return { stream, lines }
}

t.test('an abandoned session is reaped between timeout and timeout + interval, then answers 404 expired', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, SHORT)
  const ended: Array<EndReport & { at: number }> = []
  app.agentSessions.on('session-ended', (r) => ended.push({ ...r, at: Date.now() }))
  const id = await startSession(app)
  const startedAt = app.agentSessions.get(id).lastActivity
  await waitFor(() => ended.length > 0, 'the reap')
  const after = ended[0].at - startedAt
  t.equal(ended[0].reason, 'expired')
  t.ok(after >= TIMEOUT_MS, `reaped ${after} ms after the last activity, not before the timeout`)
  t.ok(after <= REAP_BOUND_MS, `reaped ${after} ms after the last activity (bound ${REAP_BOUND_MS})`)

  const res = await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}` })
  t.equal(res.statusCode, 404)
  t.equal(res.json().reason, 'expired')
  t.match(res.json().details, /expired after 1(\.\d)?s without activity/)

  const health = (await app.inject({ method: 'GET', url: '/api/health' })).json()
  t.equal(health.reaper.sessions_reaped, 1)
  t.equal(health.reaper.running, true)
  t.equal(health.reaper.interval_seconds, INTERVAL_MS / 1000)
  t.equal(health.reaper.session_timeout_seconds, TIMEOUT_MS / 1000)
  t.ok(health.reaper.last_sweep_at !== null && !Number.isNaN(Date.parse(health.reaper.last_sweep_at)))
})

t.test('a session kept alive by heartbeats survives several timeouts', async (t) => {
  const box = sandbox(t)
  const timeoutMs = 2000
  const app = await build(t, box, { sessionTimeout: timeoutMs, cleanupInterval: INTERVAL_MS })
  const id = await startSession(app)
  const sweepsBefore = app.agentSessionsReaper.stats().sweeps
  const until = Date.now() + 3.5 * timeoutMs
  // A heartbeat every 100 ms: only an event-loop stall of most of the
  // timeout (20x the heartbeat period) could let the session lapse.
  while (Date.now() < until) {
    const res = await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}` })
    t.equal(res.statusCode, 200)
    await sleep(100)
  }
  t.ok(app.agentSessionsReaper.stats().sweeps > sweepsBefore, 'the reaper swept meanwhile')
  t.equal((await ask(app, id, 'still here')).statusCode, 200)
  t.equal(app.agentSessions.counts().active, 1)
})

t.test('a turn longer than the idle timeout completes, and the session is reaped only after it', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, SHORT)
  const events: string[] = []
  let ended: EndReport | undefined
  app.agentSessions.on('turn-finished', ({ outcome }) => events.push(`turn ${outcome}`))
  app.agentSessions.on('session-ended', (report) => {
    events.push(`session ${report.reason}`)
    ended = report
  })
  const id = await startSession(app)
  const res = await ask(app, id, `slow one [[fault:slow=${TIMEOUT_MS * 2.5}]]`)
  t.equal(res.statusCode, 200)
  t.equal(res.json().answer, 'Answer 1: you asked "slow one"')
  await waitFor(() => ended, 'the reap after the turn')
  t.same(events, ['turn answered', 'session expired'], 'the reap came after the turn')
  t.ok(ended!.idleMs >= TIMEOUT_MS, `idle ${ended!.idleMs} ms counted from the end of the turn`)
})

t.test('a reaped session whose last turn hung leaves no process, even ignoring SIGTERM with a grandchild', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { ...SHORT, killGrace: '1s' })
  const id = await startSession(app)
  const res = await ask(app, id, 'hang [[fault:hang-after-result]] [[fault:ignore-sigterm]] [[fault:grandchild]]')
  t.equal(res.statusCode, 200)
  await waitFor(() => app.agentSessions.endedReason(id), 'the reap')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'every pid is gone')
})

t.test('the reaper logs what an operator needs', async (t) => {
  const box = sandbox(t)
  const sink = logSink()
  const app = await build(t, box, { ...SHORT, logger: { level: 'info', stream: sink.stream } })
  const id = await startSession(app)
  await waitFor(() => app.agentSessions.endedReason(id), 'the reap')
  await app.close()
  const started = sink.lines.find((l) => l.msg === 'reaper started')
  t.match(started, { intervalMs: INTERVAL_MS, sessionTimeoutMs: TIMEOUT_MS })
  const ended = sink.lines.filter((l) => l.msg === 'session ended')
  t.equal(ended.length, 1)
  t.match(ended[0], { level: 30, sessionId: id, reason: 'expired', processes: 'exited' })
  t.ok((ended[0].idleMs as number) >= TIMEOUT_MS)
  t.type(ended[0].teardownMs, 'number')
  t.ok(sink.lines.some((l) => l.msg === 'reaper stopped'))
  t.notOk(sink.lines.some((l) => l.msg === 'reaper sweep done'), 'sweep summaries are debug only')
})

t.test('close stops the sweep first, then ends every session with reason shutdown', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { cleanupInterval: 50 })
  t.equal(app.agentSessionsReaper.stats().running, true, 'the sweep starts on ready')
  const ids = [await startSession(app), await startSession(app)]
  const reasons: string[] = []
  app.agentSessions.on('session-ended', (r) => reasons.push(r.reason))
  await app.close()
  t.equal(app.agentSessionsReaper.stats().running, false, 'the timer is gone after close')
  t.same(reasons, ['shutdown', 'shutdown'])
  for (const id of ids) t.equal(app.agentSessions.endedReason(id), 'shutdown')
})

t.test('closing with stuck turns takes about KILL_GRACE, not N times it, and answers the asks with 503', async (t) => {
  const n = 5
  const graceMs = 1000
  const box = sandbox(t)
  const app = await build(t, box, { killGrace: graceMs })
  const ids = await Promise.all(Array.from({ length: n }, () => startSession(app)))
  const asks = ids.map((id) => ask(app, id, 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]'))
  await waitFor(() => box.pids().filter((p) => p.role === 'grandchild').length === n, 'five stuck turns')
  const started = Date.now()
  await app.close()
  const took = Date.now() - started
  // One after the other the teardowns would take n graces; the bound leaves a
  // loaded machine 3 s beyond one grace to signal and reap 10 processes.
  t.ok(took >= graceMs - 100 && took < (n - 1) * graceMs, `close took ${took} ms with ${n} stuck sessions (KILL_GRACE ${graceMs} ms)`)
  for (const res of await Promise.all(asks)) {
    t.equal(res.statusCode, 503)
    t.equal(res.json().error, 'SERVICE_UNAVAILABLE')
  }
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process outlives close()')
})
