// 9. Durability: what hibernation saves and what the store costs.
//   - Heap per hibernated session: an app started on a state file of N stored
//     sessions (all come back hibernated) against the same app on an empty
//     one, forced GC on both sides, divided by N; beside the RSS of one idle
//     live session of the ACP simulator: their ratio is what hibernation saves.
//   - Start-up with 10,000 stored sessions: from building the app to ready
//     (store read, sessions restored, orphan sweep), against an empty store.
//   - Resume latency with the ACP simulator: an ask on a hibernated session
//     (new process, initialize, session/load, prompt) against a warm ask on a
//     live one and a fresh start (new process, session/new) plus its first ask.
//   - Heartbeat throughput with the store on against off: two standalone
//     servers, alternating rounds, the median ratio with its spread.

import { mkdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { randomUUID } from 'node:crypto'
import { STATE_FORMAT_VERSION } from '../lib/sessions/file-store.js'
import type { StoredSession } from '../lib/sessions/store.js'
import {
  fmt, loadHeartbeat, QUICK, removeDir, round, sandbox, serviceApp, signed, spread, startStandalone, summarize,
  type BenchResult, type TableRow
} from './lib.js'

const ACP_SIMULATOR = fileURLToPath(new URL('../test/fixtures/fake-acp-agent.mjs', import.meta.url))
const HEAP_TARGET_BYTES = 1024
const STARTUP_TARGET_MS = 1000
const HEARTBEAT_TARGET_RATIO = 0.9

function settledHeap (): number {
  const gc = globalThis.gc
  if (gc === undefined) throw new Error('run with --expose-gc (bench/run.ts does)')
  for (let i = 0; i < 4; i++) gc()
  return process.memoryUsage().heapUsed
}

/** A state directory holding `count` stored ACP sessions, as the file store writes them. */
function stateDirWith (root: string, name: string, count: number): string {
  const dir = join(root, name)
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  const now = Date.now()
  const sessions: StoredSession[] = []
  for (let i = 0; i < count; i++) {
    sessions.push({
      id: randomUUID(),
      ref: { protocol: 'acp', sessionId: randomUUID() },
      workspaceDir: root,
      createdAt: now,
      lastActivity: now,
      lastTurnEndedAt: now,
      idleTimeoutMs: 3_600_000,
      history: []
    })
  }
  writeFileSync(join(dir, 'sessions.json'), JSON.stringify({ version: STATE_FORMAT_VERSION, savedAt: now, sessions, ended: [] }), { mode: 0o600 })
  return dir
}

function acpOptions (root: string, extra: Record<string, unknown> = {}): Parameters<typeof serviceApp>[0] {
  return {
    agentProtocol: 'acp',
    agentCommand: [process.execPath, ACP_SIMULATOR],
    agentEnv: { FAKE_AGENT_STATE_DIR: join(root, 'agent') },
    workspaceDir: root,
    maxSessions: 20_000,
    sessionTimeout: '1h',
    cleanupInterval: '1h',
    ...extra
  } as Parameters<typeof serviceApp>[0]
}

/** Heap and time to ready of an app restored from `count` stored sessions. */
async function restored (root: string, name: string, count: number): Promise<{ heapBytes: number, readyMs: number, hibernated: number }> {
  const stateDir = stateDirWith(root, name, count)
  const before = settledHeap()
  const started = performance.now()
  const app = await serviceApp(acpOptions(root, { stateDir }))
  const readyMs = performance.now() - started
  try {
    const heapBytes = settledHeap() - before
    return { heapBytes, readyMs, hibernated: app.agentSessions.agentCounts().hibernated }
  } finally {
    await app.close()
  }
}

async function liveRssMb (app: Awaited<ReturnType<typeof serviceApp>>): Promise<number> {
  const res = await app.inject({ method: 'GET', url: '/api/health' })
  return (res.json() as { agent: { live_rss_mb: number } }).agent.live_rss_mb
}

export async function run (): Promise<BenchResult> {
  const stored = QUICK ? 1000 : 10_000
  const startupRounds = QUICK ? 1 : 5
  const latencyRounds = QUICK ? 3 : 30
  const box = sandbox('durability')
  const rows: TableRow[] = []
  const figures: Record<string, number> = {}
  try {
    // Heap per hibernated session, and start-up with many stored sessions (alternating, medians).
    const empty: Array<{ heapBytes: number, readyMs: number }> = []
    const full: Array<{ heapBytes: number, readyMs: number }> = []
    // First, untimed: code compiled on first use is not per session.
    await restored(box.dir, 'warm', 10)
    for (let i = 0; i < startupRounds; i++) {
      empty.push(await restored(box.dir, `empty-${i}`, 0))
      const r = await restored(box.dir, `full-${i}`, stored)
      if (r.hibernated !== stored) throw new Error(`expected ${stored} hibernated sessions, got ${r.hibernated}`)
      full.push(r)
    }
    const heapPerSession = (spread(full.map((r) => r.heapBytes)).median - spread(empty.map((r) => r.heapBytes)).median) / stored
    const readyFull = spread(full.map((r) => r.readyMs)).median
    const readyEmpty = spread(empty.map((r) => r.readyMs)).median

    // Latencies with the simulator: fresh start + first ask, warm ask, resume of a hibernated session.
    const app = await serviceApp(acpOptions(box.dir))
    let rssMb = 0
    const fresh: number[] = []
    const warm: number[] = []
    const resume: number[] = []
    try {
      for (let i = 0; i < latencyRounds; i++) {
        let t0 = performance.now()
        const { id } = await app.agentSessions.create()
        await app.agentSessions.ask(id, `first ${i}`)
        fresh.push(performance.now() - t0)
        if (i === 0) rssMb = await liveRssMb(app)
        t0 = performance.now()
        await app.agentSessions.ask(id, `warm ${i}`)
        warm.push(performance.now() - t0)
        await app.agentSessions.hibernate(id)
        t0 = performance.now()
        await app.agentSessions.ask(id, `resumed ${i}`)
        resume.push(performance.now() - t0)
        await app.agentSessions.end(id, 'ended')
      }
    } finally {
      await app.close()
    }
    const freshP50 = summarize(fresh).p50
    const warmP50 = summarize(warm).p50
    const resumeP50 = summarize(resume).p50

    // Heartbeats with the store on and off: standalone servers, alternating rounds.
    const connections = QUICK ? 10 : 50
    const seconds = QUICK ? 0.2 : 1.5
    const heartbeatRounds = QUICK ? 1 : 12
    const on = await startStandalone({ logLevel: 'warn', sessions: 1, stateDir: join(box.dir, 'agent-on'), storeDir: join(box.dir, 'store-on') })
    const off = await startStandalone({ logLevel: 'warn', sessions: 1, stateDir: join(box.dir, 'agent-off'), storeDir: 'off' })
    const ratios: number[] = []
    try {
      await loadHeartbeat(on, { connections, seconds })
      await loadHeartbeat(off, { connections, seconds })
      for (let i = 0; i < heartbeatRounds; i++) {
        const order = i % 2 === 0 ? [on, off] : [off, on]
        const [a, b] = [await loadHeartbeat(order[0], { connections, seconds }), await loadHeartbeat(order[1], { connections, seconds })]
        const [rOn, rOff] = order[0] === on ? [a, b] : [b, a]
        ratios.push(rOn.rps / rOff.rps)
      }
    } finally {
      await on.stop()
      await off.stop()
    }
    const ratio = spread(ratios)

    const heapMet = heapPerSession <= HEAP_TARGET_BYTES
    const startupMet = readyFull <= STARTUP_TARGET_MS
    const heartbeatMet = ratio.median >= HEARTBEAT_TARGET_RATIO
    rows.push(
      {
        benchmark: `Heap per hibernated session (${stored.toLocaleString('en-US')} restored)`,
        measured: `${fmt(heapPerSession, 0)} B`,
        baseline: `RSS of one idle live ACP simulator session ${fmt(rssMb, 1)} MB`,
        figure: `a live agent costs ${fmt(rssMb * 1024 * 1024 / Math.max(heapPerSession, 1), 0)}x a hibernated session`,
        target: `<= ${HEAP_TARGET_BYTES} B`,
        met: heapMet
      },
      {
        benchmark: `Start-up to ready with ${stored.toLocaleString('en-US')} stored sessions (median of ${startupRounds})`,
        measured: `${fmt(readyFull, 0)} ms`,
        baseline: `empty store ${fmt(readyEmpty, 0)} ms`,
        figure: `${signed(readyFull - readyEmpty, 0)} ms`,
        target: `<= ${STARTUP_TARGET_MS} ms`,
        met: startupMet
      },
      {
        benchmark: `Resume: ask on a hibernated session, ACP simulator (p50 of ${latencyRounds})`,
        measured: `${fmt(resumeP50, 1)} ms`,
        baseline: `warm ask ${fmt(warmP50, 1)} ms; fresh start + first ask ${fmt(freshP50, 1)} ms`,
        figure: `${fmt(resumeP50 / warmP50, 1)}x a warm ask, ${fmt(resumeP50 / freshP50, 2)}x a fresh start`,
        target: '(reported)',
        met: null
      },
      {
        benchmark: `Heartbeat throughput, store on vs off (standalone, ${heartbeatRounds}x2x${seconds} s)`,
        measured: `ratio ${fmt(ratio.median, 3)}`,
        baseline: 'the same server with STATE_DIR=off',
        figure: `IQR ${fmt(ratio.q1, 3)}-${fmt(ratio.q3, 3)}, 95% CI ${fmt(ratio.ciLow, 3)}-${fmt(ratio.ciHigh, 3)}`,
        target: `>= ${HEARTBEAT_TARGET_RATIO}`,
        met: heartbeatMet
      }
    )
    Object.assign(figures, {
      storedSessions: stored,
      heapBytesPerHibernatedSession: round(heapPerSession, 1),
      liveSessionRssMb: rssMb,
      readyMsWithStoredSessions: round(readyFull, 1),
      readyMsEmptyStore: round(readyEmpty, 1),
      resumeP50Ms: round(resumeP50, 2),
      warmAskP50Ms: round(warmP50, 2),
      freshStartP50Ms: round(freshP50, 2),
      heartbeatStoreOnOffRatio: round(ratio.median, 3),
      heartbeatRatioCiLow: round(ratio.ciLow, 3),
      heartbeatRatioCiHigh: round(ratio.ciHigh, 3)
    })
    return {
      name: 'durability',
      title: 'Durability: hibernation, the store, resume',
      baseline: 'an empty store, a live session, the store off (same run)',
      met: heapMet && startupMet && heartbeatMet,
      rows,
      figures
    }
  } finally {
    removeDir(box.dir)
  }
}
