// 1. Heartbeat throughput: autocannon on POST /api/heartbeat of the real app
// against a bare Fastify app answering the same JSON after the same Map lookup.
// Both servers run side by side (each in its own process, idle while the other
// is loaded); short rounds alternate A B, B A, ... so drift of a noisy machine
// falls on both sides alike, and the ratio is the median of the pairs' ratios.
// On two cores autocannon needs one of them, so throughput is partly bounded by
// the load generator: the CPU time each server spends per request (from
// process.cpuUsage, independent of who is the bottleneck) is reported next to it.

import { fmt, loadHeartbeat, median, QUICK, round, startServer, type BenchResult, type LoadResult, type ServerHandle } from './lib.js'

const TARGET_RATIO = 0.95

type Round = LoadResult & { cpuUsPerRequest: number }

export async function run (): Promise<BenchResult> {
  const connections = QUICK ? 10 : 50
  const seconds = QUICK ? 0.5 : 1.5
  const pairs = QUICK ? 1 : 10
  const sessions = 100

  const service = await startServer({ mode: 'service', sessions, cleanupIntervalMs: 60_000, sweeps: true })
  const bare = await startServer({ mode: 'bare', sessions, cleanupIntervalMs: 60_000, sweeps: false })
  try {
    // Warm-up (JIT, connection setup), not counted.
    const warm = QUICK ? 0.25 : 1
    await loadHeartbeat(service, { connections, seconds: warm })
    await loadHeartbeat(bare, { connections, seconds: warm })

    const measure = async (server: ServerHandle): Promise<Round> => {
      const cpuBefore = await server.request<number>('cpu')
      const load = await loadHeartbeat(server, { connections, seconds })
      const cpuUs = await server.request<number>('cpu') - cpuBefore
      return { ...load, cpuUsPerRequest: cpuUs / Math.max(1, load.total) }
    }
    const rounds: Array<{ service: Round, bare: Round }> = []
    for (let i = 0; i < pairs; i++) {
      let s: Round
      let b: Round
      if (i % 2 === 0) {
        s = await measure(service)
        b = await measure(bare)
      } else {
        b = await measure(bare)
        s = await measure(service)
      }
      rounds.push({ service: s, bare: b })
    }

    const serviceRps = median(rounds.map((r) => r.service.rps))
    const bareRps = median(rounds.map((r) => r.bare.rps))
    // The ratio of each A/B pair, then the median of those: one noisy round cannot decide it.
    const ratio = median(rounds.map((r) => r.service.rps / r.bare.rps))
    const serviceCpuUs = median(rounds.map((r) => r.service.cpuUsPerRequest))
    const bareCpuUs = median(rounds.map((r) => r.bare.cpuUsPerRequest))
    const failures = rounds.reduce((n, r) => n + r.service.errors + r.service.non2xx + r.bare.errors + r.bare.non2xx, 0)
    const met = ratio >= TARGET_RATIO && failures === 0
    return {
      name: 'heartbeat',
      title: 'Heartbeat throughput',
      baseline: 'bare Fastify app: same JSON after the same Map lookup, same run',
      met,
      rows: [{
        benchmark: `Heartbeat throughput (${connections} conn, ${pairs}x${seconds} s)`,
        measured: `${fmt(serviceRps, 0)} req/s`,
        baseline: `bare Fastify ${fmt(bareRps, 0)} req/s`,
        figure: `ratio ${fmt(ratio, 3)}`,
        target: `>= ${TARGET_RATIO}`,
        met
      }, {
        benchmark: 'Heartbeat: server CPU time per request',
        measured: `${fmt(serviceCpuUs, 1)} us`,
        baseline: `bare Fastify ${fmt(bareCpuUs, 1)} us`,
        figure: `ratio ${fmt(bareCpuUs / serviceCpuUs, 3)} (bare/service)`,
        target: '(reported)',
        met: null
      }],
      figures: {
        serviceRps: round(serviceRps, 1),
        bareRps: round(bareRps, 1),
        ratio: round(ratio, 4),
        ratioOfMedians: round(serviceRps / bareRps, 4),
        serviceCpuUsPerRequest: round(serviceCpuUs, 2),
        bareCpuUsPerRequest: round(bareCpuUs, 2),
        cpuRatio: round(bareCpuUs / serviceCpuUs, 4),
        serviceLatencyP99Ms: median(rounds.map((r) => r.service.latencyP99Ms)),
        bareLatencyP99Ms: median(rounds.map((r) => r.bare.latencyP99Ms)),
        failedRequests: failures,
        connections,
        secondsPerRound: seconds,
        pairs
      },
      details: { rounds }
    }
  } finally {
    await Promise.all([service.stop(), bare.stop()])
  }
}
