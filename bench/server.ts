// The load target of the HTTP benchmarks, run as a child process of the
// benchmark (bench/lib.ts startServer) so the load generator has its own event
// loop. Two modes:
//   service: the real app (as an embedder registers it) with idle sessions that
//            spawn nothing (injected driver)
//   bare:    a bare Fastify app answering the same heartbeat JSON after the same
//            Map lookup: the baseline
// It listens on 127.0.0.1, port 0, reports { type: 'ready', port, sessionId }
// and answers commands over IPC. It exits when the parent disconnects.

import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks'
import Fastify, { type FastifyInstance } from 'fastify'
import { flatUUID, idleDriver, type ServerConfig, serviceApp, cpuTimeMs } from './lib.js'

const config = JSON.parse(process.argv[2] ?? '{}') as ServerConfig
const LOOP_DELAY_RESOLUTION_MS = 1

interface BareSession { id: string, state: 'idle' | 'busy', lastActivity: number, idleTimeoutMs: number }

async function bareApp (sessions: number): Promise<{ app: FastifyInstance, sessionId: string }> {
  const app = Fastify({ logger: false })
  const map = new Map<string, BareSession>()
  let first = ''
  for (let i = 0; i < sessions; i++) {
    const id = flatUUID()
    if (i === 0) first = id
    map.set(id, { id, state: 'idle', lastActivity: Date.now(), idleTimeoutMs: 600_000 })
  }
  app.post<{ Querystring: { session_id?: string } }>('/api/heartbeat', async (request, reply) => {
    const session = map.get(request.query.session_id ?? '')
    if (session === undefined) return await reply.code(404).send({ error: 'SESSION_NOT_FOUND' })
    session.lastActivity = Date.now()
    return {
      message: 'Heartbeat received',
      session_id: session.id,
      last_activity: new Date(session.lastActivity).toISOString(),
      idle_timeout_seconds: session.idleTimeoutMs / 1000,
      expires_at: new Date(session.lastActivity + session.idleTimeoutMs).toISOString()
    }
  })
  return { app, sessionId: first }
}

// The baseline of one sweep: the same check over a plain Map of plain objects
// with the fields a session has (lib/sessions/manager.ts), one per session.
interface BareRecord {
  id: string
  chatId: string
  createdAt: number
  idleTimeoutMs: number
  state: 'idle' | 'busy' | 'closing'
  lastActivity: number
  turn: AbortController | null
  settling: Promise<unknown> | null
  history: unknown[] | null
}
const bareRecords = new Map<string, BareRecord>()

function addBareRecord (idleTimeoutMs: number): void {
  const id = flatUUID()
  const now = Date.now()
  bareRecords.set(id, { id, chatId: flatUUID(), createdAt: now, idleTimeoutMs, state: 'idle', lastActivity: now, turn: null, settling: null, history: null })
}

function bareSweep (): number {
  const now = Date.now()
  const expired: string[] = []
  let checked = 0
  for (const session of bareRecords.values()) {
    checked++
    if (session.state === 'idle' && now - session.lastActivity >= session.idleTimeoutMs) expired.push(session.id)
  }
  if (checked !== bareRecords.size) throw new Error('unreachable')
  return expired.length
}

async function serviceTarget (sessions: number): Promise<{ app: FastifyInstance, sessionId: string }> {
  const app = await serviceApp({
    driver: idleDriver(),
    maxSessions: sessions + 10,
    sessionTimeout: '1h',
    cleanupInterval: config.cleanupIntervalMs
  })
  if (!config.sweeps) await app.agentSessionsReaper.stop()
  let first = ''
  for (let i = 0; i < sessions; i++) {
    const info = await app.agentSessions.create()
    if (i === 0) first = info.id
    // The sweep's baseline grows in the same loop: its records are allocated
    // among the same garbage and lie in the heap like the sessions do.
    addBareRecord(info.idleTimeoutMs)
  }
  return { app, sessionId: first }
}

const { app, sessionId } = config.mode === 'service' ? await serviceTarget(config.sessions) : await bareApp(config.sessions)
await app.listen({ host: '127.0.0.1', port: 0 })
const address = app.server.address()
const port = typeof address === 'object' && address !== null ? address.port : 0

// Event-loop delay: one monitor per load phase (bench/reaper.ts combines the phases).
let phase: { h: IntervalHistogram } | null = null
let sweepsAtStart = 0

function delayStats (h: IntervalHistogram): Record<string, number> {
  // The histogram records the whole timer period; the delay is what exceeds it.
  const ms = (ns: number): number => Math.max(0, ns / 1e6 - LOOP_DELAY_RESOLUTION_MS)
  return { samples: h.count, p50Ms: ms(h.percentile(50)), p99Ms: ms(h.percentile(99)), maxMs: ms(h.max), meanMs: ms(h.mean) }
}

async function serviceSweep (): Promise<number> {
  const report = await app.agentSessions.sweep()
  if (report.checked !== config.sessions || report.reaped.length !== 0) {
    throw new Error(`a sweep checked ${report.checked} sessions and reaped ${report.reaped.length}`)
  }
  return report.checked
}

/** Wall time and CPU time of one call, in ms. */
async function timed (fn: () => unknown): Promise<{ wallMs: number, cpuMs: number }> {
  const cpu = cpuTimeMs()
  const wall = performance.now()
  await fn()
  const wallMs = performance.now() - wall
  return { wallMs, cpuMs: cpuTimeMs() - cpu }
}

const commands: Record<string, (args: Record<string, unknown>) => Promise<unknown> | unknown> = {
  sweeper: async (args) => {
    if (args.on === true) app.agentSessionsReaper.start()
    else await app.agentSessionsReaper.stop()
    return app.agentSessionsReaper.stats()
  },
  'delay-start': () => {
    // A fresh monitor per phase: re-enabling one would record the gap since it was disabled as a delay.
    phase = { h: monitorEventLoopDelay({ resolution: LOOP_DELAY_RESOLUTION_MS }) }
    sweepsAtStart = config.mode === 'service' ? app.agentSessionsReaper.stats().sweeps : 0
    phase.h.enable()
    return null
  },
  'delay-stop': () => {
    if (phase === null) throw new Error('no phase running')
    phase.h.disable()
    const stats = delayStats(phase.h)
    phase = null
    const sweeps = config.mode === 'service' ? app.agentSessionsReaper.stats().sweeps - sweepsAtStart : 0
    return { sweeps, ...stats }
  },
  // Sweeps timed one by one with the reaper's timer stopped and no load,
  // alternating with the bare loop (which goes first every other time). Both
  // loops are compiled first (untimed rounds) and a full GC runs before the
  // timed ones, so neither pays for JIT warm-up or for the other's garbage.
  'sweep-times': async (args) => {
    await app.agentSessionsReaper.stop()
    const count = Number(args.count)
    const warmup = Number(args.warmup ?? 5)
    const tick = (): Promise<void> => new Promise((resolve) => setImmediate(resolve))
    for (let i = 0; i < warmup; i++) {
      await serviceSweep()
      bareSweep()
      await tick()
    }
    globalThis.gc?.()
    globalThis.gc?.()
    const sweep: Array<{ wallMs: number, cpuMs: number }> = []
    const bare: Array<{ wallMs: number, cpuMs: number }> = []
    for (let i = 0; i < count; i++) {
      if (i % 2 === 0) {
        sweep.push(await timed(serviceSweep))
        bare.push(await timed(bareSweep))
      } else {
        bare.push(await timed(bareSweep))
        sweep.push(await timed(serviceSweep))
      }
      await tick()
    }
    return { sweep, bare, gcExposed: globalThis.gc !== undefined }
  },
  heap: () => {
    globalThis.gc?.()
    return process.memoryUsage()
  }
}

process.on('message', (raw) => {
  const msg = raw as { type: string, id: number, command: string, args: Record<string, unknown> }
  if (msg.type !== 'command') return
  const handler = commands[msg.command]
  void (async () => {
    try {
      if (handler === undefined) throw new Error(`unknown command ${msg.command}`)
      process.send?.({ type: 'reply', id: msg.id, result: await handler(msg.args) })
    } catch (err) {
      process.send?.({ type: 'reply', id: msg.id, error: String((err as Error).stack ?? err) })
    }
  })()
})

process.once('disconnect', () => {
  void app.close().finally(() => process.exit(0))
})

process.send?.({ type: 'ready', port, sessionId })
