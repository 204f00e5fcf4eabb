// 1. Heartbeat throughput: autocannon on POST /api/heartbeat, three pairs of
// servers, each server in a process of its own:
//   - the standalone server as users run it (`node dist/server.js`, its
//     defaults, the simulator as agent, LOG_LEVEL=warn) against a bare Fastify
//     server (bench/bare-server.mjs, plain node) with the same logger at the
//     same level answering the same JSON after the same Map lookup;
//   - the same pair at LOG_LEVEL=info (Fastify logs every request twice);
//   - the app registered in-process by an embedder with the logger off
//     (bench/server.ts) against a bare Fastify app without a logger.
// Beside them, reported without a target, the standalone gap split in two by a
// third server at LOG_LEVEL=warn: the same bare route in a process that has
// also loaded the whole app, idle, with as many sessions (bench/bare-server.mjs,
// BARE_BESIDE=app). Against the bare server it gives what merely having the app
// in the process costs a request; the standalone server against it gives the
// rest: the app's route, its store writing the heartbeated sessions, its
// server options. A fourth server holds an ordinary Fastify app of the same
// size instead (BARE_BESIDE=ordinary-app, no code of this project): against
// the bare server, what any such app costs the route; the standalone server
// against it, what this app costs beyond that.
// Rounds alternate (A B, then B A, ...) and go through the pairs in turn, so
// drift of a shared machine falls on both sides alike; each pair of adjacent
// rounds gives one ratio. Reported: the median of those ratios, their
// interquartile range and a bootstrap 95 % interval of the median; a gap is
// seen only where that interval excludes 1. On two cores autocannon takes one
// of them, so throughput is partly bounded by the load generator: the CPU
// time each server process spends per request (every thread, from
// /proc/PID/task/*/schedstat over each round) is reported beside it, with the
// same statistics.

import { loadavg } from 'node:os'
import {
  countAppRoutes, fmt, loadHeartbeat, processCpuUs, QUICK, removeDir, round, sandbox, spread, startBareProcess, startServer, startStandalone,
  type BenchResult, type LoadResult, type LoadTarget, type Spread, type TableRow
} from './lib.js'

const TARGET_RATIO = 0.95

type Round = LoadResult & { cpuUsPerRequest: number }

interface Pair {
  key: string
  label: string
  service: LoadTarget
  bare: LoadTarget
  /** What the baseline is called in the table; bare Fastify unless said. */
  baselineLabel?: string
  rounds: Array<{ service: Round, bare: Round }>
}

function range (s: Spread, digits: number): string {
  return `IQR ${fmt(s.q1, digits)}-${fmt(s.q3, digits)}, 95% CI ${fmt(s.ciLow, digits)}-${fmt(s.ciHigh, digits)}`
}

/** Whether the interval of the median ratio lies wholly on one side of 1 (a gap the noise cannot explain). */
function gapSeen (s: Spread): boolean {
  return s.ciHigh < 1 || s.ciLow > 1
}

export async function run (): Promise<BenchResult> {
  const connections = QUICK ? 10 : 50
  const seconds = QUICK ? 0.2 : 1.5
  const roundsPerPair = QUICK ? 1 : 12
  // The standalone server starts sessions through the simulator, under START_RATE_LIMIT's default of 30 a minute.
  const sessions = QUICK ? 1 : 10
  const flags = (process.env.BENCH_SERVER_FLAGS ?? '').split(' ').filter((f) => f !== '')
  const box = sandbox('heartbeat')

  const stops: Array<() => Promise<void>> = []
  const started = async <T extends { stop: () => Promise<void> }>(server: Promise<T>): Promise<T> => {
    const s = await server
    stops.push(s.stop)
    return s
  }
  try {
    // Started side by side (each is idle while another is loaded); all settle
    // before any failure counts, so every one that started is stopped. Quick
    // mode leaves out the info pair: the same code with another level.
    const levels = QUICK ? ['warn'] : ['warn', 'info']
    const appRoutes = await countAppRoutes()
    const settled = await Promise.allSettled([
      ...levels.flatMap((level) => [
        started(startStandalone({ logLevel: level, sessions, stateDir: box.dir, nodeFlags: flags })),
        started(startBareProcess({ logLevel: level, sessions, nodeFlags: flags }))
      ]),
      started(startServer({ mode: 'service', sessions, cleanupIntervalMs: 60_000, sweeps: true })),
      started(startServer({ mode: 'bare', sessions, cleanupIntervalMs: 60_000, sweeps: false })),
      started(startBareProcess({ logLevel: 'warn', sessions, nodeFlags: flags, beside: { kind: 'app', stateDir: box.dir } })),
      started(startBareProcess({ logLevel: 'warn', sessions, nodeFlags: flags, beside: { kind: 'ordinary-app', routes: appRoutes } }))
    ])
    const servers = settled.map((r) => {
      if (r.status === 'rejected') throw r.reason
      return r.value as LoadTarget
    })
    const pairs: Pair[] = levels.map((level, i) => ({
      key: `standalone${level[0].toUpperCase()}${level.slice(1)}`,
      label: `standalone, LOG_LEVEL=${level}`,
      service: servers[2 * i],
      bare: servers[2 * i + 1],
      rounds: []
    }))
    pairs.push({ key: 'inProcess', label: 'in-process app, logger off', service: servers[2 * levels.length], bare: servers[2 * levels.length + 1], rounds: [] })
    // The standalone gap split in two (reported, not held to the target): what
    // a process that has loaded and run the app costs a bare route, and what
    // the standalone server costs beyond that.
    const besideApp = servers[2 * levels.length + 2]
    const besideOrdinaryApp = servers[2 * levels.length + 3]
    const parts: Pair[] = [
      { key: 'besideAppWarn', label: 'bare route beside the idle app in its process, LOG_LEVEL=warn', service: besideApp, bare: pairs[0].bare, rounds: [] },
      { key: 'standaloneWarnOverBesideApp', label: 'standalone against that bare route beside the app, LOG_LEVEL=warn', service: pairs[0].service, bare: besideApp, baselineLabel: 'bare route beside the app', rounds: [] },
      { key: 'besideOrdinaryAppWarn', label: 'bare route beside an ordinary Fastify app of the same size, LOG_LEVEL=warn', service: besideOrdinaryApp, bare: pairs[0].bare, rounds: [] },
      { key: 'standaloneWarnOverBesideOrdinaryApp', label: 'standalone against that bare route beside the ordinary app, LOG_LEVEL=warn', service: pairs[0].service, bare: besideOrdinaryApp, baselineLabel: 'bare route beside the ordinary app', rounds: [] }
    ]

    const measure = async (server: LoadTarget): Promise<Round> => {
      const cpuBefore = processCpuUs(server.pid)
      const load = await loadHeartbeat(server, { connections, seconds })
      const cpuUs = processCpuUs(server.pid) - cpuBefore
      return { ...load, cpuUsPerRequest: cpuUs / Math.max(1, load.total) }
    }

    // Warm-up (JIT, connection setup), not counted: each server once.
    for (const server of new Set([...pairs, ...parts].flatMap((pair) => [pair.service, pair.bare]))) {
      await loadHeartbeat(server, { connections, seconds: QUICK ? 0.2 : 1 })
    }
    const loads: number[] = [loadavg()[0]]
    for (let i = 0; i < roundsPerPair; i++) {
      for (const pair of [...pairs, ...parts]) {
        let s: Round
        let b: Round
        if (i % 2 === 0) {
          s = await measure(pair.service)
          b = await measure(pair.bare)
        } else {
          b = await measure(pair.bare)
          s = await measure(pair.service)
        }
        pair.rounds.push({ service: s, bare: b })
      }
      loads.push(loadavg()[0])
    }

    const rows: TableRow[] = []
    const figures: Record<string, number> = { connections, secondsPerRound: seconds, roundsPerPair, sessions, ordinaryAppRoutes: appRoutes }
    let met = true
    for (const pair of [...pairs, ...parts]) {
      const held = pairs.includes(pair)
      const rps = spread(pair.rounds.map((r) => r.service.rps / r.bare.rps))
      // Service CPU over bare CPU per request: above 1 means the service costs more.
      const cpu = spread(pair.rounds.map((r) => r.service.cpuUsPerRequest / r.bare.cpuUsPerRequest))
      const serviceRps = spread(pair.rounds.map((r) => r.service.rps))
      const bareRps = spread(pair.rounds.map((r) => r.bare.rps))
      const serviceCpu = spread(pair.rounds.map((r) => r.service.cpuUsPerRequest))
      const bareCpu = spread(pair.rounds.map((r) => r.bare.cpuUsPerRequest))
      const failures = pair.rounds.reduce((n, r) => n + r.service.errors + r.service.non2xx + r.bare.errors + r.bare.non2xx, 0)
      const pairMet = rps.median >= TARGET_RATIO && failures === 0
      if (held) met &&= pairMet
      rows.push({
        benchmark: `Heartbeat throughput, ${pair.label} (${connections} conn, ${roundsPerPair}x2x${seconds} s)`,
        measured: `${fmt(serviceRps.median, 0)} req/s`,
        baseline: `${pair.baselineLabel ?? 'bare Fastify'} ${fmt(bareRps.median, 0)} req/s`,
        figure: `ratio ${fmt(rps.median, 3)} (${range(rps, 3)})${gapSeen(rps) ? '' : ', no gap beyond noise'}`,
        target: held ? `>= ${TARGET_RATIO}` : '(reported)',
        met: held ? pairMet : null
      }, {
        benchmark: `Heartbeat CPU per request, ${pair.label}`,
        measured: `${fmt(serviceCpu.median, 1)} us`,
        baseline: `${pair.baselineLabel ?? 'bare Fastify'} ${fmt(bareCpu.median, 1)} us`,
        figure: `x${fmt(cpu.median, 3)} (${range(cpu, 3)})${gapSeen(cpu) ? '' : ', no gap beyond noise'}`,
        target: '(reported)',
        met: null
      })
      Object.assign(figures, {
        [`${pair.key}Rps`]: round(serviceRps.median, 1),
        [`${pair.key}BareRps`]: round(bareRps.median, 1),
        [`${pair.key}Ratio`]: round(rps.median, 4),
        [`${pair.key}RatioQ1`]: round(rps.q1, 4),
        [`${pair.key}RatioQ3`]: round(rps.q3, 4),
        [`${pair.key}RatioCiLow`]: round(rps.ciLow, 4),
        [`${pair.key}RatioCiHigh`]: round(rps.ciHigh, 4),
        [`${pair.key}CpuUsPerRequest`]: round(serviceCpu.median, 2),
        [`${pair.key}BareCpuUsPerRequest`]: round(bareCpu.median, 2),
        [`${pair.key}CpuRatio`]: round(cpu.median, 4),
        [`${pair.key}CpuRatioQ1`]: round(cpu.q1, 4),
        [`${pair.key}CpuRatioQ3`]: round(cpu.q3, 4),
        [`${pair.key}CpuRatioCiLow`]: round(cpu.ciLow, 4),
        [`${pair.key}CpuRatioCiHigh`]: round(cpu.ciHigh, 4),
        [`${pair.key}LatencyP99Ms`]: round(spread(pair.rounds.map((r) => r.service.latencyP99Ms)).median, 2),
        [`${pair.key}BareLatencyP99Ms`]: round(spread(pair.rounds.map((r) => r.bare.latencyP99Ms)).median, 2),
        [`${pair.key}FailedRequests`]: failures
      })
    }
    figures.loadAverageMin = round(Math.min(...loads), 2)
    figures.loadAverageMax = round(Math.max(...loads), 2)
    return {
      name: 'heartbeat',
      title: 'Heartbeat throughput',
      baseline: 'bare Fastify server: same JSON after the same Map lookup, same logger and level, own process, same run',
      met,
      rows,
      figures,
      details: {
        loadAverage: loads.map((l) => round(l, 2)),
        rounds: Object.fromEntries([...pairs, ...parts].map((p) => [p.key, p.rounds.map((r) => ({
          serviceRps: round(r.service.rps, 1),
          bareRps: round(r.bare.rps, 1),
          serviceCpuUsPerRequest: round(r.service.cpuUsPerRequest, 2),
          bareCpuUsPerRequest: round(r.bare.cpuUsPerRequest, 2)
        }))]))
      }
    }
  } finally {
    await Promise.all(stops.map(async (stop) => { await stop() }))
    removeDir(box.dir)
  }
}
