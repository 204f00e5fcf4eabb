// 6. Reap precision: the reaper sweeps every CLEANUP_INTERVAL (1 s), so an
// expired session may wait up to one interval to be ended. Sessions with idle
// timeouts spread over several seconds expire at every phase of the sweep
// cycle; for each, (reaped at - expired at) comes from the manager's own
// 'session-ended' report (idleMs is reaped at - last activity) against its
// expiry (last activity + idle timeout). Target: never above interval + 50 ms.

import type { EndReport } from '../lib/sessions/manager.js'
import { fmt, idleDriver, QUICK, round, summarize, type BenchResult, serviceApp } from './lib.js'

const SLACK_MS = 50

export async function run (): Promise<BenchResult> {
  const count = QUICK ? 100 : 1000
  const intervalMs = QUICK ? 200 : 1000
  const shortestMs = intervalMs
  const spreadMs = QUICK ? 600 : 3000

  const app = await serviceApp({
    driver: idleDriver(),
    maxSessions: count + 10,
    sessionTimeout: '1h',
    cleanupInterval: intervalMs
  })
  try {
    const manager = app.agentSessions
    const expiry = new Map<string, { expiresAt: number, idleTimeoutMs: number }>()
    const lateness: number[] = []
    const wallLateness: number[] = []
    let bad = 0
    const allEnded = new Promise<void>((resolve) => {
      manager.on('session-ended', (report: EndReport) => {
        const e = expiry.get(report.sessionId)
        if (e === undefined || report.reason !== 'expired') {
          bad++
        } else {
          lateness.push(report.idleMs - e.idleTimeoutMs)
          wallLateness.push(Date.now() - e.expiresAt)
        }
        if (lateness.length + bad >= count) resolve()
      })
    })
    for (let i = 0; i < count; i++) {
      const idleTimeoutMs = shortestMs + Math.round((i * spreadMs) / count)
      const info = await manager.create({ idleTimeoutMs })
      expiry.set(info.id, { expiresAt: info.expiresAt, idleTimeoutMs })
    }
    // Every session is reaped within about shortest + spread + interval: the
    // deadline, 10x that, only turns a reaper that stopped into a finding (missing).
    const deadline = 10 * (shortestMs + spreadMs + intervalMs)
    let timer: NodeJS.Timeout | undefined
    await Promise.race([allEnded, new Promise<void>((resolve) => { timer = setTimeout(resolve, deadline) })])
    clearTimeout(timer)

    const s = summarize(lateness)
    const wall = summarize(wallLateness)
    const missing = count - lateness.length
    const limit = intervalMs + SLACK_MS
    const met = missing === 0 && s.max <= limit && s.min >= 0
    return {
      name: 'precision',
      title: 'Reap precision',
      baseline: 'each session\'s expiry (last activity + idle timeout)',
      met,
      rows: [{
        benchmark: `Reap precision (${count} sessions, interval ${intervalMs} ms)`,
        measured: `max ${fmt(s.max, 0)} ms late (p50 ${fmt(s.p50, 0)}, p99 ${fmt(s.p99, 0)})`,
        baseline: 'expiry',
        figure: `max ${fmt(s.max / intervalMs, 3)} intervals`,
        target: `<= ${limit} ms`,
        met
      }],
      figures: {
        sessions: count,
        reaped: lateness.length,
        missing,
        intervalMs,
        minLateMs: s.min,
        p50LateMs: s.p50,
        p90LateMs: s.p90,
        p99LateMs: s.p99,
        maxLateMs: s.max,
        meanLateMs: round(s.mean, 1),
        wallClockMaxLateMs: round(wall.max, 1),
        maxInIntervals: round(s.max / intervalMs, 4)
      }
    }
  } finally {
    await app.close()
  }
}
