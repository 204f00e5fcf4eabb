// 4. Reaper cost with 100,000 idle sessions that own no process (an injected
// driver spawns nothing):
//   - one sweep's cost, timed sweep by sweep with no load, against the same
//     check over a plain Map of as many plain objects with a session's fields
//     (the floor of any sweep), built in the same loop as the sessions so both
//     lie alike in the heap. Both loops are compiled (untimed rounds) and a
//     full GC runs before the timed ones, which alternate. The figure is CPU
//     time (process.cpuUsage, exact for the calling thread): on a busy machine
//     a 2 ms loop is often preempted, and a wall clock counts the other
//     processes' turns too (wall times are reported beside it);
//   - event-loop delay p99 (perf_hooks.monitorEventLoopDelay, in the server
//     process) under heartbeat load while the reaper sweeps every 100 ms, against
//     the same load with the reaper stopped. Phases alternate off/on/on/off;
//     each side reports its worst phase.
// The 100 ms interval (600x the default) makes sweeps frequent enough to show in
// a p99 at all; with the default 1 min they would be invisible.

import { fmt, signed, loadHeartbeat, median, QUICK, round, spread, startServer, summarize, type BenchResult, type LoadResult } from './lib.js'

const TARGET_SWEEP_MS = 5
const TARGET_DELAY_P99_MS = 20
const SWEEP_INTERVAL_MS = 100

interface DelayStats { samples: number, p50Ms: number, p99Ms: number, maxMs: number, meanMs: number }

export async function run (): Promise<BenchResult> {
  const sessions = QUICK ? 10_000 : 100_000
  const sweepsTimed = QUICK ? 5 : 30
  const connections = QUICK ? 10 : 50
  const seconds = QUICK ? 0.5 : 3
  const phases: boolean[] = QUICK ? [false, true] : [false, true, true, false]

  const server = await startServer({ mode: 'service', sessions, cleanupIntervalMs: SWEEP_INTERVAL_MS, sweeps: false })
  try {
    type Timing = Array<{ wallMs: number, cpuMs: number }>
    const times = await server.request<{ sweep: Timing, bare: Timing, gcExposed: boolean }>('sweep-times', { count: sweepsTimed, warmup: QUICK ? 2 : 5 })
    if (!times.gcExposed) throw new Error('the bench server runs without --expose-gc')
    const sweep = summarize(times.sweep.map((t) => t.cpuMs))
    const bare = summarize(times.bare.map((t) => t.cpuMs))
    const sweepWall = summarize(times.sweep.map((t) => t.wallMs))
    const bareWall = summarize(times.bare.map((t) => t.wallMs))
    // Each sweep against the bare loop right next to it.
    const ratio = spread(times.sweep.map((t, i) => t.cpuMs / times.bare[i].cpuMs))

    await loadHeartbeat(server, { connections, seconds: QUICK ? 0.25 : 1 }) // warm-up
    const loads: Array<{ sweeps: boolean, load: LoadResult, sweepsRun: number, delay: DelayStats }> = []
    for (const on of phases) {
      await server.request('sweeper', { on })
      await server.request('delay-start')
      const load = await loadHeartbeat(server, { connections, seconds })
      const { sweeps, ...delay } = await server.request<DelayStats & { sweeps: number }>('delay-stop')
      loads.push({ sweeps: on, load, sweepsRun: sweeps, delay })
    }
    await server.request('sweeper', { on: false })
    // Each side's figure is its worst phase.
    const worst = (sweeps: boolean): DelayStats => {
      const phasesOf = loads.filter((l) => l.sweeps === sweeps).map((l) => l.delay)
      return {
        samples: phasesOf.reduce((n, d) => n + d.samples, 0),
        p50Ms: Math.max(...phasesOf.map((d) => d.p50Ms)),
        p99Ms: Math.max(...phasesOf.map((d) => d.p99Ms)),
        maxMs: Math.max(...phasesOf.map((d) => d.maxMs)),
        meanMs: Math.max(...phasesOf.map((d) => d.meanMs))
      }
    }
    const off = worst(false)
    const on = worst(true)
    const sweepsUnderLoad = loads.filter((l) => l.sweeps).reduce((n, l) => n + l.sweepsRun, 0)
    const failures = loads.reduce((n, l) => n + l.load.errors + l.load.non2xx, 0)

    const sweepMet = sweep.p50 < TARGET_SWEEP_MS
    const delayMet = on.p99Ms < TARGET_DELAY_P99_MS
    const addedP99 = on.p99Ms - off.p99Ms
    return {
      name: 'reaper',
      title: 'Reaper cost',
      baseline: 'sweep: the same check over a plain Map of plain objects; loop delay: the same heartbeat load with the reaper stopped',
      met: sweepMet && delayMet && failures === 0,
      rows: [{
        benchmark: `Reaper: one sweep of ${sessions.toLocaleString('en-US')} idle sessions (p50 of ${sweepsTimed}, CPU time)`,
        measured: `${fmt(sweep.p50, 3)} ms (max ${fmt(sweep.max, 3)}; wall p50 ${fmt(sweepWall.p50, 3)})`,
        baseline: `bare Map loop ${fmt(bare.p50, 3)} ms (wall ${fmt(bareWall.p50, 3)})`,
        figure: `${fmt(ratio.median, 2)}x (IQR ${fmt(ratio.q1, 2)}-${fmt(ratio.q3, 2)})`,
        target: `< ${TARGET_SWEEP_MS} ms`,
        met: sweepMet
      }, {
        benchmark: `Reaper: loop delay p99 under heartbeat load, sweeps every ${SWEEP_INTERVAL_MS} ms`,
        measured: `${fmt(on.p99Ms, 2)} ms (${sweepsUnderLoad} sweeps)`,
        baseline: `no sweeps ${fmt(off.p99Ms, 2)} ms`,
        figure: `${signed(addedP99)} ms`,
        target: `< ${TARGET_DELAY_P99_MS} ms`,
        met: delayMet
      }],
      figures: {
        sessions,
        sweepP50Ms: round(sweep.p50, 4),
        sweepMaxMs: round(sweep.max, 4),
        bareLoopP50Ms: round(bare.p50, 4),
        sweepVsBareRatio: round(ratio.median, 3),
        sweepVsBareRatioQ1: round(ratio.q1, 3),
        sweepVsBareRatioQ3: round(ratio.q3, 3),
        sweepWallP50Ms: round(sweepWall.p50, 4),
        sweepWallMaxMs: round(sweepWall.max, 4),
        bareLoopWallP50Ms: round(bareWall.p50, 4),
        delayP99WithSweepsMs: round(on.p99Ms, 3),
        delayP99WithoutSweepsMs: round(off.p99Ms, 3),
        delayAddedP99Ms: round(addedP99, 3),
        delayMaxWithSweepsMs: round(on.maxMs, 3),
        delayMaxWithoutSweepsMs: round(off.maxMs, 3),
        sweepsUnderLoad,
        rpsWithSweeps: round(median(loads.filter((l) => l.sweeps).map((l) => l.load.rps)), 1),
        rpsWithoutSweeps: round(median(loads.filter((l) => !l.sweeps).map((l) => l.load.rps)), 1),
        failedRequests: failures,
        sweepIntervalMs: SWEEP_INTERVAL_MS
      },
      details: {
        sweepCpuMs: times.sweep.map((t) => round(t.cpuMs, 4)),
        bareLoopCpuMs: times.bare.map((t) => round(t.cpuMs, 4)),
        sweepWallMs: times.sweep.map((t) => round(t.wallMs, 4)),
        bareLoopWallMs: times.bare.map((t) => round(t.wallMs, 4)),
        delayWithSweeps: on,
        delayWithoutSweeps: off,
        phases: loads
      }
    }
  } finally {
    await server.stop()
  }
}
