// Reaper logic with an injected clock and a driver that spawns nothing: which
// sessions go, which stay, and the races between reaping, ending and use.

import t from 'tap'
import { SessionManager, type EndReport } from '../lib/sessions/manager.js'
import { Sweeper } from '../lib/sessions/sweeper.js'
import { AgentSessionError } from '../lib/errors.js'
import type { Logger } from '../lib/logger.js'
import { FakeDriver } from './helpers/fake-driver.js'
import { sleep, waitFor } from './helpers/index.js'

const MINUTE = 60_000

function setup (options: { sessionTimeoutMs?: number, log?: Logger } = {}): { manager: SessionManager, driver: FakeDriver, clock: { now: number }, ended: EndReport[] } {
  const clock = { now: Date.parse('2026-11-24T10:00:00Z') }
  const driver = new FakeDriver()
  const manager = new SessionManager({
    driver,
    maxSessions: 1000,
    sessionTimeoutMs: options.sessionTimeoutMs ?? 10 * MINUTE,
    maxSessionTimeoutMs: 24 * 60 * MINUTE,
    askTimeoutMs: MINUTE,
    now: () => clock.now,
    log: options.log
  })
  const ended: EndReport[] = []
  manager.on('session-ended', (report) => ended.push(report))
  return { manager, driver, clock, ended }
}

function capture (): { log: Logger, lines: Array<{ level: string, obj: Record<string, unknown>, msg?: string }> } {
  const lines: Array<{ level: string, obj: Record<string, unknown>, msg?: string }> = []
  const at = (level: string) => (obj: object, msg?: string) => { lines.push({ level, obj: obj as Record<string, unknown>, msg }) }
  return { log: { debug: at('debug'), info: at('info'), warn: at('warn'), error: at('error') }, lines }
}

t.test('exactly the stale idle sessions go', async (t) => {
  const { manager, clock, ended } = setup()
  const old = await manager.create()
  clock.now += 5 * MINUTE
  const young = await manager.create()
  clock.now += 5 * MINUTE - 1
  let report = await manager.sweep()
  t.same(report.reaped, [], 'nothing is older than the timeout yet')
  clock.now += 1
  report = await manager.sweep()
  t.same(report.reaped.map((r) => r.sessionId), [old.id], 'the old one goes at exactly its timeout')
  t.equal(report.checked, 2)
  t.same(manager.list().map((s) => s.id), [young.id])
  t.equal(ended[0].reason, 'expired')
  t.equal(ended[0].idleMs, 10 * MINUTE)
  t.throws(() => manager.touch(old.id), { code: 'SESSION_NOT_FOUND', extra: { reason: 'expired' } })
  t.match(() => manager.get(old.id), Function)
  try {
    manager.get(old.id)
  } catch (err) {
    t.match((err as Error).message, /expired after 10m without activity/)
  }
})

t.test('a heartbeat resets the idle clock', async (t) => {
  const { manager, clock } = setup()
  const s = await manager.create()
  for (let i = 0; i < 5; i++) {
    clock.now += 9 * MINUTE
    manager.touch(s.id)
    t.same((await manager.sweep()).reaped, [], `alive after ${(i + 1) * 9} minutes`)
  }
  clock.now += 10 * MINUTE
  t.equal((await manager.sweep()).reaped.length, 1)
})

t.test('a session touched just before the sweep looks at it is not reaped', async (t) => {
  const { manager, clock } = setup()
  const s = await manager.create()
  clock.now += 10 * MINUTE + 5
  manager.touch(s.id)
  t.same((await manager.sweep()).reaped, [])
  t.equal(manager.get(s.id).state, 'idle')
})

t.test('reads are not activity', async (t) => {
  const { manager, clock } = setup()
  const s = await manager.create()
  clock.now += 10 * MINUTE
  manager.get(s.id)
  manager.list()
  manager.counts()
  t.equal((await manager.sweep()).reaped.length, 1)
})

t.test('busy sessions stay, however long the turn; the turn end is activity', async (t) => {
  const { manager, driver, clock } = setup()
  const s = await manager.create()
  const asking = manager.ask(s.id, 'a long question')
  clock.now += 60 * MINUTE
  t.same((await manager.sweep()).reaped, [], 'busy is not idle')
  t.equal(manager.get(s.id).state, 'busy')
  driver.turns[0].answer('done')
  driver.turns[0].finish()
  t.same(await asking, { answer: 'done', stopReason: 'end_turn', durationMs: 1 })
  t.equal(manager.get(s.id).lastActivity, clock.now, 'the end of a turn counts as activity')
  clock.now += 10 * MINUTE - 1
  t.same((await manager.sweep()).reaped, [])
  clock.now += 1
  t.equal((await manager.sweep()).reaped.length, 1)
})

t.test('the per-session timeout is honoured, and capped', async (t) => {
  const { manager, clock } = setup()
  const short = await manager.create({ idleTimeoutMs: MINUTE })
  const long = await manager.create({ idleTimeoutMs: 30 * MINUTE })
  const normal = await manager.create()
  t.equal(short.expiresAt, clock.now + MINUTE)
  clock.now += MINUTE
  t.same((await manager.sweep()).reaped.map((r) => r.sessionId), [short.id])
  clock.now += 9 * MINUTE
  t.same((await manager.sweep()).reaped.map((r) => r.sessionId), [normal.id])
  clock.now += 20 * MINUTE
  t.same((await manager.sweep()).reaped.map((r) => r.sessionId), [long.id])
  await t.rejects(manager.create({ idleTimeoutMs: 25 * 60 * MINUTE }), { code: 'INVALID_REQUEST', message: /MAX_SESSION_TIMEOUT/ })
})

t.test('an error ending one session is logged and the sweep goes on', async (t) => {
  const { log, lines } = capture()
  const { manager, clock } = setup({ log })
  const a = await manager.create()
  const b = await manager.create()
  const c = await manager.create()
  // A faulty listener (say, a metrics bug) throws while b is being ended.
  manager.on('session-ended', (report) => {
    if (report.sessionId === b.id) throw new Error('listener bug')
  })
  clock.now += 10 * MINUTE
  const report = await manager.sweep()
  t.equal(report.failed, 1)
  t.same(report.reaped.map((r) => r.sessionId).sort(), [a.id, c.id].sort())
  t.same(manager.list(), [], 'all three are gone from the map')
  t.ok(lines.some((l) => l.level === 'error' && l.msg === 'reaping a session failed'))
})

t.test('each ended session is logged once, with reason, idle time and how its processes ended', async (t) => {
  const { log, lines } = capture()
  const { manager, clock } = setup({ log })
  const s = await manager.create()
  clock.now += 12 * MINUTE
  await manager.sweep()
  const ended = lines.filter((l) => l.msg === 'session ended')
  t.equal(ended.length, 1)
  t.match(ended[0], { level: 'info', obj: { sessionId: s.id, reason: 'expired', idleMs: 12 * MINUTE, idle: '12m', processes: 'exited' } })
  t.type(ended[0].obj.teardownMs, 'number')
})

t.test('races', async (t) => {
  t.test('a heartbeat or ask arriving while the session is being reaped gets 404 and starts nothing', async (t) => {
    const { manager, driver, clock } = setup()
    driver.holdTeardown = true
    const s = await manager.create()
    // A turn answered, but its processes are still being torn down.
    const asked = manager.ask(s.id, 'q')
    driver.turns[0].answer('a')
    await asked
    clock.now += 10 * MINUTE
    const sweeping = manager.sweep()
    // The reap is under way (its teardown is held): the session must already be gone.
    t.throws(() => manager.touch(s.id), { code: 'SESSION_NOT_FOUND', extra: { reason: 'expired' } })
    await t.rejects(manager.ask(s.id, 'revive?'), { code: 'SESSION_NOT_FOUND' })
    t.equal(driver.turns.length, 1, 'no new turn was started')
    t.equal(manager.counts().active, 0)
    t.equal(manager.counts().closing, 1)
    driver.turns[0].finish()
    t.equal((await sweeping).reaped.length, 1)
    t.equal(manager.counts().closing, 0)
  })

  t.test('an ask waiting for the previous turn to settle is cancelled by an end, and never spawns', async (t) => {
    const { manager, driver } = setup()
    driver.holdTeardown = true
    const s = await manager.create()
    const first = manager.ask(s.id, 'one')
    driver.turns[0].answer('1')
    await first
    const second = manager.ask(s.id, 'two') // waits for turn 1's teardown
    const ending = manager.end(s.id, 'ended')
    driver.turns[0].finish()
    await t.rejects(second, { code: 'SESSION_NOT_FOUND', extra: { reason: 'ended' } })
    await ending
    t.equal(driver.turns.length, 1, 'the second turn never started')
  })

  t.test('an end racing a reap, or a second end, is harmless and tears down once', async (t) => {
    const { manager, driver, clock, ended } = setup()
    driver.holdTeardown = true
    const s = await manager.create()
    const asking = manager.ask(s.id, 'q')
    clock.now += 10 * MINUTE
    // The client ends it while the turn is in flight ...
    const ending = manager.end(s.id, 'ended')
    // ... and the reaper and a second end arrive during the teardown.
    t.same((await Promise.race([manager.sweep(), new Promise((resolve) => setTimeout(resolve, 50, 'held'))]) as { reaped: unknown[] }).reaped, [])
    t.throws(() => manager.end(s.id, 'ended'), { code: 'SESSION_NOT_FOUND', extra: { reason: 'ended' } })
    await t.rejects(asking, { code: 'SESSION_NOT_FOUND' })
    t.ok(driver.turns[0].aborted)
    driver.turns[0].finish()
    const all = manager.endAll('shutdown')
    await ending
    await all
    t.equal(ended.length, 1, 'ended exactly once')
    t.equal(ended[0].reason, 'ended')
    t.equal(ended[0].stage, 'exited')
  })

  t.test('shutdown answers in-flight asks at once and waits for their teardown', async (t) => {
    const { manager, driver } = setup()
    driver.holdTeardown = true
    const a = await manager.create()
    const b = await manager.create()
    const asks = [manager.ask(a.id, 'x'), manager.ask(b.id, 'y')]
    let drained = false
    const draining = manager.shutdown().then((reports) => { drained = true; return reports })
    for (const ask of asks) await t.rejects(ask, { code: 'SERVICE_UNAVAILABLE' })
    t.notOk(drained, 'the drain waits for the teardowns')
    await t.rejects(manager.create(), { code: 'SERVICE_UNAVAILABLE' })
    for (const turn of driver.turns) turn.finish()
    const reports = await draining
    t.same(reports.map((r) => r.reason), ['shutdown', 'shutdown'])
  })
})

t.test('sweeper', async (t) => {
  t.test('sweeps never overlap, and a failing sweep does not stop the reaper', async (t) => {
    let running = 0
    let maxRunning = 0
    let calls = 0
    const { log, lines } = capture()
    const sweeper = new Sweeper({
      intervalMs: 10,
      log,
      sweep: async () => {
        calls++
        running++
        maxRunning = Math.max(maxRunning, running)
        await new Promise((resolve) => setTimeout(resolve, 40)) // longer than the interval
        running--
        if (calls === 2) throw new Error('sweep blew up')
        return { checked: 0, reaped: [], failed: 0, durationMs: 40 }
      }
    })
    sweeper.start()
    // Counted, not timed: however late the timers fire, four sweeps must come, the failed second one included.
    await waitFor(() => calls >= 4 && running === 0, 'four sweeps')
    await sweeper.stop()
    const after = calls
    await sleep(100)
    t.equal(maxRunning, 1, 'never two sweeps at once')
    t.ok(calls >= 4, `kept sweeping after a failure (${calls} sweeps)`)
    t.equal(calls, after, 'no sweep after stop()')
    t.ok(lines.some((l) => l.level === 'error' && l.msg === 'reaper sweep failed'))
    t.equal(sweeper.stats().running, false)
    t.equal(sweeper.stats().sweeps, calls - 1, 'the failed sweep is not counted as done')
  })

  t.test('stop() waits for the sweep in progress', async (t) => {
    let started = false
    let finished = false
    let release!: () => void
    const gate = new Promise<void>((resolve) => { release = resolve })
    const sweeper = new Sweeper({
      intervalMs: 5,
      sweep: async () => {
        started = true
        await gate
        finished = true
        return { checked: 0, reaped: [], failed: 0, durationMs: 100 }
      }
    })
    sweeper.start()
    await waitFor(() => started, 'a sweep to start')
    let stopped = false
    const stopping = sweeper.stop().then(() => { stopped = true })
    await sleep(50)
    t.notOk(stopped, 'stop() is still waiting while the sweep runs')
    release()
    await stopping
    t.ok(finished, 'stop() returned after the sweep')
  })
})

t.test('each session keeps a bounded log of its turns, answered or failed', async (t) => {
  const clock = { now: 1_000 }
  const driver = new FakeDriver()
  const manager = new SessionManager({
    driver, maxSessions: 10, sessionTimeoutMs: MINUTE, maxSessionTimeoutMs: MINUTE, askTimeoutMs: MINUTE, maxHistory: 3, now: () => clock.now
  })
  const s = await manager.create()
  t.same(manager.history(s.id), [])
  for (const n of [1, 2, 3]) {
    const asking = manager.ask(s.id, `q${n}`)
    clock.now += 10
    // The turn starts once the previous one has settled (a microtask later).
    await waitFor(() => driver.turns.length === n, `turn ${n}`)
    driver.turns[n - 1].answer(`a${n}`)
    driver.turns[n - 1].finish()
    await asking
  }
  const failing = manager.ask(s.id, 'q4')
  clock.now += 10
  await waitFor(() => driver.turns.length === 4, 'turn 4')
  driver.turns[3].fail(new AgentSessionError('PROCESS_COMMUNICATION_FAILED', 'boom'))
  driver.turns[3].finish()
  await t.rejects(failing)
  t.same(manager.history(s.id), [
    { question: 'q2', answer: 'a2', stopReason: 'end_turn', error: null, startedAt: 1_010, endedAt: 1_020 },
    { question: 'q3', answer: 'a3', stopReason: 'end_turn', error: null, startedAt: 1_020, endedAt: 1_030 },
    { question: 'q4', answer: '', stopReason: null, error: 'PROCESS_COMMUNICATION_FAILED', startedAt: 1_030, endedAt: 1_040 }
  ], 'a failed turn is logged with its code; the oldest turns go past maxHistory')
  const copy = manager.history(s.id)
  copy.length = 0
  t.equal(manager.history(s.id).length, 3, 'callers get a copy')
})
