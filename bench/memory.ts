// 5. Memory per idle session: heap growth over 100,000 sessions (no process
// behind them: an injected driver) divided by their number, against the heap
// before creating them, with a forced GC on both sides (needs --expose-gc, which
// bench/run.ts passes). For scale it also measures, in the same process, a bare
// Map of as many plain { id, lastActivity, idleTimeoutMs } objects.

import { flatUUID, fmt, idleDriver, QUICK, round, type BenchResult, serviceApp } from './lib.js'

const TARGET_BYTES = 1024

function settledHeap (): number {
  const gc = globalThis.gc
  if (gc === undefined) throw new Error('run with --expose-gc (bench/run.ts does)')
  for (let i = 0; i < 4; i++) gc()
  return process.memoryUsage().heapUsed
}

export async function run (): Promise<BenchResult> {
  const sessions = QUICK ? 10_000 : 100_000
  const app = await serviceApp({
    driver: idleDriver(),
    maxSessions: sessions + 10,
    sessionTimeout: '1h',
    cleanupInterval: '1h'
  })
  try {
    const manager = app.agentSessions
    // One session first, so that lazily built code and shapes are not counted.
    await manager.end((await manager.create()).id, 'ended')

    const before = settledHeap()
    for (let i = 0; i < sessions; i++) await manager.create()
    const after = settledHeap()
    if (manager.counts().active !== sessions) throw new Error(`expected ${sessions} sessions, got ${manager.counts().active}`)
    const perSession = (after - before) / sessions

    // The same count of bare records in a Map, for scale.
    const bareBefore = settledHeap()
    const bare = new Map<string, { id: string, lastActivity: number, idleTimeoutMs: number }>()
    for (let i = 0; i < sessions; i++) {
      const id = flatUUID()
      bare.set(id, { id, lastActivity: Date.now(), idleTimeoutMs: 600_000 })
    }
    const bareAfter = settledHeap()
    const barePerEntry = (bareAfter - bareBefore) / bare.size

    const met = perSession <= TARGET_BYTES
    return {
      name: 'memory',
      title: 'Memory per idle session',
      baseline: 'heap before creating the sessions (forced GC before and after)',
      met,
      rows: [{
        benchmark: `Memory per idle session (${sessions.toLocaleString('en-US')} sessions)`,
        measured: `${fmt(perSession, 0)} B/session (+${fmt((after - before) / 1024 / 1024, 1)} MiB)`,
        baseline: `heap before ${fmt(before / 1024 / 1024, 1)} MiB; bare Map ${fmt(barePerEntry, 0)} B/entry`,
        figure: `${fmt(perSession / TARGET_BYTES, 3)} of 1 KiB`,
        target: `<= ${TARGET_BYTES} B`,
        met
      }],
      figures: {
        sessions,
        heapBeforeBytes: before,
        heapAfterBytes: after,
        bytesPerSession: round(perSession, 1),
        bareMapBytesPerEntry: round(barePerEntry, 1),
        ratioToBareMap: round(perSession / barePerEntry, 3)
      }
    }
  } finally {
    await app.close()
  }
}
