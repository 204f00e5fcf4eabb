// 3. Teardown at scale: fastify.close() with N sessions, each with a turn in
// flight whose agent stalls and ignores SIGTERM, so every teardown has to wait
// out KILL_GRACE and SIGKILL. Teardowns run in parallel, so close() should take
// about KILL_GRACE whatever N is: the figure is close time / KILL_GRACE.
// Afterwards every pid the simulator logged must be gone (zombies count as gone).
//
// Second baseline, the floor: the same ladder run by hand on N stalled
// simulators spawned directly (SIGTERM every group, KILL_GRACE, SIGKILL every
// group, until all exited). No service can close faster, and with many Node.js
// processes on a small machine it is well above KILL_GRACE: signalling and
// tearing down N processes takes the kernel real time.

import { spawn } from 'node:child_process'
import { readFileSync } from 'node:fs'
import { type LightMyRequestResponse } from 'fastify'
import { agentEnvironment } from '../lib/processes/environment.js'
import type { EndReport } from '../lib/sessions/manager.js'
import { signalGroup } from '../lib/processes/terminate.js'
import { fmt, killLeftovers, QUICK, removeDir, round, ROOT, sandbox, SIMULATOR, sleep, stillRunning, type BenchResult, type TableRow, serviceApp } from './lib.js'

const TARGET_RATIO = 1.1
const STUCK = '[[fault:stall]] [[fault:ignore-sigterm]] Please hang.'

interface Round {
  n: number
  closeMs: number
  ratio: number
  /** The same ladder on N directly spawned stalled simulators, without the service. */
  floorMs: number
  floorRatio: number
  killed: number
  answered503: number
  pidsLogged: number
  pidsLeft: number
  setupMs: number
  firstEndMs: number
  lastEndMs: number
  teardownMsMax: number
}

export async function run (): Promise<BenchResult> {
  // BENCH_TEARDOWN_N=200 runs one size only (for a CPU profile of that close()).
  const only = Number(process.env.BENCH_TEARDOWN_N)
  const sizes = only > 0 ? [only] : QUICK ? [1, 2] : [10, 50, 200]
  const graceMs = QUICK ? 300 : 2000
  const rounds: Round[] = []
  for (const n of sizes) rounds.push(await closeWithStuckSessions(n, graceMs))

  const ratios = rounds.map((r) => r.ratio)
  const flatness = Math.max(...ratios) / Math.min(...ratios)
  const floors = rounds.map((r) => r.floorRatio)
  const floorFlatness = Math.max(...floors) / Math.min(...floors)
  const allKilled = rounds.every((r) => r.killed === r.n)
  const pidsLeft = rounds.reduce((sum, r) => sum + r.pidsLeft, 0)
  const pidsLogged = rounds.reduce((sum, r) => sum + r.pidsLogged, 0)
  const met = ratios.every((r) => r <= TARGET_RATIO) && flatness <= TARGET_RATIO && allKilled && pidsLeft === 0

  const rows: TableRow[] = rounds.map((r) => ({
    benchmark: `Teardown: close() with ${r.n} stuck turns`,
    measured: `${fmt(r.closeMs, 0)} ms (${r.killed}/${r.n} SIGKILLed)`,
    baseline: `KILL_GRACE ${graceMs} ms; bare ladder on ${r.n}: ${fmt(r.floorMs, 0)} ms`,
    figure: `${fmt(r.ratio, 3)}x (floor ${fmt(r.floorRatio, 3)}x)`,
    target: `<= ${TARGET_RATIO}`,
    met: r.ratio <= TARGET_RATIO && r.killed === r.n
  }))
  rows.push({
    benchmark: `Teardown: flat in N (${sizes.join(', ')})`,
    measured: `${fmt(Math.min(...ratios), 3)}x .. ${fmt(Math.max(...ratios), 3)}x`,
    baseline: `bare ladder ${fmt(Math.min(...floors), 3)}x .. ${fmt(Math.max(...floors), 3)}x`,
    figure: `max/min ${fmt(flatness, 3)} (bare ${fmt(floorFlatness, 3)})`,
    target: `<= ${TARGET_RATIO}`,
    met: flatness <= TARGET_RATIO
  }, {
    benchmark: 'Teardown: agent processes left after close()',
    measured: `${pidsLeft} of ${pidsLogged} pids`,
    baseline: 'pids.log of the simulator',
    figure: `${pidsLeft} left`,
    target: '0',
    met: pidsLeft === 0
  })

  const figures: Record<string, number> = { killGraceMs: graceMs, flatness: round(flatness, 4), floorFlatness: round(floorFlatness, 4), pidsLogged, pidsLeft }
  for (const r of rounds) {
    figures[`closeMsN${r.n}`] = round(r.closeMs, 1)
    figures[`ratioN${r.n}`] = round(r.ratio, 4)
    figures[`floorMsN${r.n}`] = round(r.floorMs, 1)
    figures[`floorRatioN${r.n}`] = round(r.floorRatio, 4)
  }
  return {
    name: 'teardown',
    title: 'Teardown at scale',
    baseline: 'KILL_GRACE (the shortest a close can take when agents ignore SIGTERM)',
    met,
    rows,
    figures,
    details: { rounds }
  }
}

async function closeWithStuckSessions (n: number, graceMs: number): Promise<Round> {
  const box = sandbox(`teardown-${n}`)
  const setupStarted = performance.now()
  const app = await serviceApp({
    killGrace: graceMs,
    askTimeout: '5m',
    sessionTimeout: '1h',
    maxSessions: n + 10,
    agentEnv: { FAKE_AGENT_STATE_DIR: box.dir }
  }, { return503OnClosing: false })
  const ended: EndReport[] = []
  const endedAt: number[] = []
  app.agentSessions.on('session-ended', (report) => {
    ended.push(report)
    endedAt.push(performance.now())
  })
  let closed = false
  try {
    const ids = await mapLimit(n, 8, async () => (await app.agentSessions.create()).id)
    const before = box.pids().length
    const asks: Array<Promise<LightMyRequestResponse>> = []
    for (const id of ids) {
      asks.push(app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: STUCK } }))
    }
    // Every turn's agent has started, and has settled into its stall (SIGTERM ignored by then).
    const turnPids = await waitFor(() => {
      const mains = box.pids().slice(before).filter((p) => p.role === 'main').map((p) => p.pid)
      return mains.length >= n ? mains : undefined
    }, 120_000, `${n} stuck agent turns`)
    await waitQuiet(turnPids, 60_000)
    const setupMs = performance.now() - setupStarted

    const started = performance.now()
    closed = true
    await app.close()
    const closeMs = performance.now() - started

    const responses = await Promise.all(asks)
    const pids = box.pids().map((p) => p.pid)
    const left = stillRunning(pids)
    const floorMs = await bareLadder(n, graceMs, box.dir)
    return {
      n,
      closeMs,
      ratio: closeMs / graceMs,
      floorMs,
      floorRatio: floorMs / graceMs,
      killed: ended.filter((r) => r.stage === 'killed').length,
      answered503: responses.filter((r) => r.statusCode === 503).length,
      pidsLogged: pids.length,
      pidsLeft: left.length,
      setupMs: round(setupMs, 0),
      // Where the time went: sessions' own teardowns (first and last) against close() as a whole.
      firstEndMs: round(Math.min(...endedAt) - started, 1),
      lastEndMs: round(Math.max(...endedAt) - started, 1),
      teardownMsMax: Math.max(...ended.map((r) => r.teardownMs))
    }
  } finally {
    if (!closed) await app.close()
    killLeftovers(box.pids().map((p) => p.pid))
    removeDir(box.dir)
  }
}

/**
 * The floor: the same ladder without the service. N stalled simulators that
 * ignore SIGTERM, spawned directly; SIGTERM to every group, KILL_GRACE, SIGKILL
 * to every group; ms from the first signal until every one has exited.
 */
async function bareLadder (n: number, graceMs: number, stateDir: string): Promise<number> {
  const env = { ...agentEnvironment(process.env, { extra: { FAKE_AGENT_STATE_DIR: stateDir } }), FAKE_AGENT_FAULTS: 'stall,ignore-sigterm' }
  const children = Array.from({ length: n }, () => spawn(SIMULATOR, ['create-chat'], { cwd: ROOT, env, detached: true, stdio: 'ignore' }))
  const exited = children.map((c) => new Promise<void>((resolve) => {
    c.once('exit', () => resolve())
    c.once('error', () => resolve())
  }))
  try {
    const pids = children.map((c) => c.pid ?? -1)
    await waitFor(() => {
      const logged = new Set(readPidLogPids(stateDir))
      return pids.every((pid) => logged.has(pid)) ? true : undefined
    }, 120_000, `${n} bare stalled simulators`)
    await waitQuiet(pids, 60_000)
    const started = performance.now()
    for (const pid of pids) signalGroup(pid, 'SIGTERM')
    await sleep(graceMs)
    for (const pid of pids) signalGroup(pid, 'SIGKILL')
    await Promise.all(exited)
    return performance.now() - started
  } finally {
    for (const c of children) if (c.pid !== undefined && c.exitCode === null && c.signalCode === null) signalGroup(c.pid, 'SIGKILL')
  }
}

function readPidLogPids (stateDir: string): number[] {
  try {
    return readFileSync(`${stateDir}/pids.log`, 'utf8').split('\n').filter(Boolean).map((l) => Number(l.split(' ')[0]))
  } catch {
    return []
  }
}

/** Runs fn n times with at most `limit` at once. */
async function mapLimit<T> (n: number, limit: number, fn: (i: number) => Promise<T>): Promise<T[]> {
  const out: T[] = new Array(n)
  let next = 0
  await Promise.all(Array.from({ length: Math.min(limit, n) }, async () => {
    while (next < n) {
      const i = next++
      out[i] = await fn(i)
    }
  }))
  return out
}

async function waitFor<T> (probe: () => T | undefined, timeoutMs: number, what: string): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = probe()
    if (value !== undefined) return value
    if (Date.now() >= deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

/** CPU time (utime + stime, in clock ticks) of a process, or -1 once it is gone. */
function cpuTicks (pid: number): number {
  try {
    const text = readFileSync(`/proc/${pid}/stat`, 'latin1')
    const fields = text.slice(text.lastIndexOf(')') + 2).split(' ')
    return Number(fields[11]) + Number(fields[12])
  } catch {
    return -1
  }
}

/** Waits until none of the processes used CPU for a while: they are all sitting in their stall. */
async function waitQuiet (pids: number[], timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs
  let last = pids.map(cpuTicks)
  for (;;) {
    await sleep(300)
    const now = pids.map(cpuTicks)
    if (now.every((t, i) => t === last[i])) return
    if (Date.now() >= deadline) throw new Error('the stuck agents never settled')
    last = now
  }
}
