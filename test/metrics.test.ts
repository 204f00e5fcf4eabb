import t from 'tap'
import type { FastifyInstance } from 'fastify'
import { ask, build, EVENT_TIMEOUT_MS, onlyTheseTurnsTimeOut, sandbox, sleep, startSession, waitForGone } from './helpers/index.js'

const JSON_HEADERS = { 'content-type': 'application/json' }

/** The value of one sample, e.g. `agent_turns_total{outcome="answered"}`; undefined when absent. */
function sample (text: string, series: string): number | undefined {
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue
    const space = line.lastIndexOf(' ')
    if (line.slice(0, space) === series) return Number(line.slice(space + 1))
  }
  return undefined
}

/** Polls an async probe (the helpers' waitFor is synchronous) until it holds. */
async function eventually (probe: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + EVENT_TIMEOUT_MS
  while (!(await probe())) {
    if (Date.now() >= deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

async function scrape (app: FastifyInstance): Promise<string> {
  const res = await app.inject({ method: 'GET', url: '/metrics' })
  if (res.statusCode !== 200) throw new Error(`/metrics answered ${res.statusCode}: ${res.body}`)
  return res.body
}

const SERIES = [
  ['agent_sessions_active', 'gauge'],
  ['agent_sessions_busy', 'gauge'],
  ['agent_sessions_started_total', 'counter'],
  ['agent_sessions_ended_total', 'counter'],
  ['agent_turns_total', 'counter'],
  ['agent_turn_duration_seconds', 'histogram'],
  ['agent_teardowns_total', 'counter']
] as const

t.test('GET /metrics is Prometheus text with every series, labelled from zero, and the process defaults', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const res = await app.inject({ method: 'GET', url: '/metrics' })
  t.equal(res.statusCode, 200)
  t.match(res.headers['content-type'], /^text\/plain; version=0\.0\.4/)
  const text = res.body
  for (const [name, type] of SERIES) {
    t.match(text, new RegExp(`^# HELP ${name} \\S`, 'm'), `${name} has help`)
    t.match(text, new RegExp(`^# TYPE ${name} ${type}$`, 'm'), `${name} is a ${type}`)
  }
  t.equal(sample(text, 'agent_sessions_active'), 0)
  t.equal(sample(text, 'agent_sessions_busy'), 0)
  t.equal(sample(text, 'agent_sessions_started_total'), 0)
  for (const reason of ['ended', 'expired', 'shutdown']) t.equal(sample(text, `agent_sessions_ended_total{reason="${reason}"}`), 0, reason)
  for (const outcome of ['answered', 'failed', 'timeout', 'cancelled']) t.equal(sample(text, `agent_turns_total{outcome="${outcome}"}`), 0, outcome)
  for (const stage of ['exited', 'sigterm', 'sigkill']) t.equal(sample(text, `agent_teardowns_total{stage="${stage}"}`), 0, stage)
  t.equal(sample(text, 'agent_turn_duration_seconds_count'), 0)
  t.equal(sample(text, 'agent_turn_duration_seconds_bucket{le="+Inf"}'), 0)
  // collectDefaultMetrics on the app's own registry.
  t.ok((sample(text, 'process_cpu_user_seconds_total') ?? -1) >= 0, 'process_cpu_user_seconds_total')
  t.ok((sample(text, 'nodejs_heap_size_total_bytes') ?? 0) > 0, 'nodejs_heap_size_total_bytes')
  t.ok((sample(text, 'process_resident_memory_bytes') ?? 0) > 0, 'process_resident_memory_bytes')
})

t.test('the series move when sessions start, turn, fail, time out, go busy and end', async (t) => {
  const box = sandbox(t)
  // ASK_TIMEOUT is short for the one turn that must time out; every other call has time.
  const app = await build(t, box, { askTimeout: '1500ms', killGrace: '500ms', wrapDriver: onlyTheseTurnsTimeOut((prompt) => prompt.startsWith('time out')) })
  const teardowns = (text: string, stage: string): number => sample(text, `agent_teardowns_total{stage="${stage}"}`) ?? NaN

  const id = await startSession(app)
  let text = await scrape(app)
  t.equal(sample(text, 'agent_sessions_started_total'), 1)
  t.equal(sample(text, 'agent_sessions_active'), 1)
  // create-chat exits by itself once it printed the chat id.
  await eventually(async () => teardowns(await scrape(app), 'exited') >= 1, 'create-chat teardown counted')

  t.equal((await ask(app, id, 'hello')).statusCode, 200)
  text = await scrape(app)
  t.equal(sample(text, 'agent_turns_total{outcome="answered"}'), 1)
  t.equal(sample(text, 'agent_turn_duration_seconds_count'), 1)
  const seconds = sample(text, 'agent_turn_duration_seconds_sum') ?? NaN
  // Seconds, not milliseconds: even a quick turn would read 100 or more in ms.
  t.ok(seconds > 0 && seconds < 60, `turn took ${seconds} s`)
  t.equal(sample(text, 'agent_turn_duration_seconds_bucket{le="+Inf"}'), 1)

  t.equal((await ask(app, id, 'boom [[fault:exit-1]]')).statusCode, 502)
  text = await scrape(app)
  t.equal(sample(text, 'agent_turns_total{outcome="failed"}'), 1)
  t.equal(sample(text, 'agent_turn_duration_seconds_count'), 2)

  // A stalled turn times out; the polite signal ends it.
  const before = teardowns(await scrape(app), 'sigterm')
  t.equal((await ask(app, id, 'time out [[fault:stall]]')).statusCode, 504)
  t.equal(sample(await scrape(app), 'agent_turns_total{outcome="timeout"}'), 1)
  await eventually(async () => teardowns(await scrape(app), 'sigterm') === before + 1, 'sigterm teardown counted')

  // A turn in flight makes the session busy; ending the session cancels it,
  // and a process that ignores SIGTERM needs SIGKILL.
  const inFlight = ask(app, id, 'stall [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]')
  await eventually(async () => sample(await scrape(app), 'agent_sessions_busy') === 1, 'busy gauge at 1')
  // The simulator logs its grandchild only after it started ignoring SIGTERM.
  await eventually(async () => box.pids().some((p) => p.role === 'grandchild'), 'the turn ignores SIGTERM')
  const end = await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}`, headers: JSON_HEADERS })
  t.equal(end.statusCode, 200)
  t.equal((await inFlight).statusCode, 404, 'the cancelled turn answers that the session ended')
  await eventually(async () => teardowns(await scrape(app), 'sigkill') === 1, 'sigkill teardown counted')
  text = await scrape(app)
  t.equal(sample(text, 'agent_turns_total{outcome="cancelled"}'), 1)
  t.equal(sample(text, 'agent_sessions_ended_total{reason="ended"}'), 1)
  t.equal(sample(text, 'agent_sessions_busy'), 0)
  t.equal(sample(text, 'agent_sessions_active'), 0)
  t.equal(sample(text, 'agent_turn_duration_seconds_count'), 4)
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process left')
})

t.test('reaped and shut-down sessions are counted by reason', async (t) => {
  const box = sandbox(t)
  const clock = { now: Date.now() }
  const app = await build(t, box, { sessionTimeout: '1m', now: () => clock.now })
  await startSession(app)
  await startSession(app)
  clock.now += 61_000
  await app.agentSessionsReaper.runOnce()
  let text = await scrape(app)
  t.equal(sample(text, 'agent_sessions_ended_total{reason="expired"}'), 2)
  t.equal(sample(text, 'agent_sessions_active'), 0)

  await startSession(app)
  t.equal(sample(await scrape(app), 'agent_sessions_started_total'), 3)
  await app.close()
  // Sessions ended by the shutdown drain still count (the registry outlives close).
  text = await app.agentSessionsMetrics.metrics()
  t.equal(sample(text, 'agent_sessions_ended_total{reason="shutdown"}'), 1)
  t.equal(sample(text, 'agent_sessions_active'), 0)
})

t.test('each app instance has its own registry', async (t) => {
  const a = await build(t, sandbox(t))
  const b = await build(t, sandbox(t))
  t.not(a.agentSessionsMetrics, b.agentSessionsMetrics)
  await startSession(a)
  t.equal(sample(await scrape(a), 'agent_sessions_started_total'), 1)
  t.equal(sample(await scrape(b), 'agent_sessions_started_total'), 0, 'the other instance saw nothing')
  t.ok((sample(await scrape(b), 'nodejs_heap_size_total_bytes') ?? 0) > 0, 'both collect the defaults without a name clash')
})
