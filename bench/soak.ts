// Soak: many sessions and turns from concurrent clients, with heartbeats and
// ends racing a fast reaper and misbehaving agents (the simulator's faults),
// then the leak checks: no agent process alive, open file descriptors back to
// the start, no session left that should be gone, heap back near its start.
//
//   npm run bench:soak                     (large: ~300 sessions, ~1,500 turns)
//   SOAK_CLIENTS=4 SOAK_SESSIONS=5 SOAK_TURNS=3 npm run bench:soak
//
// test/soak.test.ts runs the same driver small. The baseline (fds, heap) is
// measured in the same run, after a warm-up cycle, and the figures printed are
// deltas and ratios against it. Exit code 1 when a leak check fails.

import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs'
import { Agent, request as httpRequest } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import { fileURLToPath, pathToFileURL } from 'node:url'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import fp from 'fastify-plugin'
import Fastify, { type FastifyInstance } from 'fastify'
import agentSessions, { type AgentSessionsOptions } from '../app.js'
import { isProcessAlive, signalGroup } from '../lib/processes/terminate.js'
import { AGENT_CALL_TIMEOUT_MS, EVENT_TIMEOUT_MS, onlyTheseTurnsTimeOut } from '../test/helpers/index.js'

const ROOT = fileURLToPath(new URL('..', import.meta.url))
const SIMULATOR = join(ROOT, 'test', 'fixtures', 'fake-cursor-agent.mjs')

export interface SoakOptions {
  clients: number
  sessionsPerClient: number
  turnsPerSession: number
  /** 'inject' (no sockets) or 'http' (a real server on 127.0.0.1 with keep-alive clients). */
  transport: 'inject' | 'http'
  sessionTimeoutMs: number
  cleanupIntervalMs: number
  killGraceMs: number
  /** ASK_TIMEOUT, which only the stalled turns can reach: every other agent call has a generous timeout of its own. */
  askTimeoutMs: number
  /** Share of turns that run a misbehaving agent (0..1). */
  faultRate: number
  /** Seed for the clients' choices, so a failing run can be replayed. */
  seed: number
  log?: (line: string) => void
}

export interface SoakReport {
  options: SoakOptions
  durationMs: number
  /** The event loop's worst delay during the load: a request waits that long, and the reaper's sweep with it. */
  loopDelayMaxMs: number
  sessionsStarted: number
  /** Asks sent, and those answered 200 (the rest: busy, failed or timed-out turns, ended sessions). */
  turns: number
  answered: number
  heartbeats: number
  ends: number
  /** Sessions the reaper ended (seen through the manager's events). */
  reaped: number
  statuses: Record<string, number>
  /** Responses no client behaviour explains (5xx other than the faults', wrong codes). */
  unexpected: string[]
  agentProcesses: number
  aliveAfter: number[]
  sessionsLeft: { active: number, busy: number, starting: number, closing: number }
  fdsBefore: number
  fdsAfter: number
  heapBeforeMb: number
  heapAfterMb: number
  failures: string[]
}

export const SOAK_DEFAULTS: SoakOptions = {
  clients: 16,
  sessionsPerClient: 20,
  turnsPerSession: 5,
  transport: 'http',
  // The clients race the reaper on purpose: they idle for about this long. On
  // a loaded machine the event loop also stalls (for seconds), and a session
  // can expire between two steps of its client; 1 s keeps most of them alive.
  sessionTimeoutMs: 1000,
  cleanupIntervalMs: 100,
  killGraceMs: 500,
  askTimeoutMs: 1500,
  faultRate: 0.15,
  seed: 1
}

// Slack for the leak checks: a few fds (pino, timers' internals) and a heap
// that may keep some compiled code and caches; a real leak grows with N.
const FD_SLACK = 4
const HEAP_SLACK_MB = 24

type Send = (method: 'GET' | 'POST', url: string, body?: unknown) => Promise<{ status: number, body: Record<string, unknown> }>

const FAULTS = ['[[fault:grandchild]]', '[[fault:hang-after-result]]', '[[fault:worker-server]]',
  '[[fault:crash-mid-stream]]', '[[fault:ignore-sigterm]] [[fault:hang-after-result]]', '[[fault:stall]]', '[[fault:slow=200]]']

// Statuses each call may legitimately answer in a soak where the reaper and the client race.
const EXPECTED: Record<string, Record<number, string[]>> = {
  start: { 200: [] },
  ask: { 200: [], 404: ['SESSION_NOT_FOUND'], 409: ['SESSION_BUSY'], 502: ['PROCESS_COMMUNICATION_FAILED'], 504: ['REQUEST_TIMEOUT'] },
  heartbeat: { 200: [], 404: ['SESSION_NOT_FOUND'] },
  end: { 200: [], 404: ['SESSION_NOT_FOUND'] }
}

/** mulberry32: small, seedable, good enough to pick behaviours. */
function random (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let x = a
    x = Math.imul(x ^ (x >>> 15), x | 1)
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61)
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}

const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

export function openFds (): number {
  return readdirSync('/proc/self/fd').length
}

let gcFn: (() => void) | undefined
function gc (): void {
  if (gcFn === undefined) {
    // Works without --expose-gc on the command line (tap, tsx).
    setFlagsFromString('--expose-gc')
    gcFn = runInNewContext('gc') as () => void
  }
  gcFn()
}

async function heapAfterGcMb (): Promise<number> {
  for (let i = 0; i < 3; i++) {
    gc()
    await sleep(50)
  }
  return Math.round(process.memoryUsage().heapUsed / 1024 / 1024 * 10) / 10
}

function readPids (stateDir: string): number[] {
  let text = ''
  try {
    text = readFileSync(join(stateDir, 'pids.log'), 'utf8')
  } catch {}
  return [...new Set(text.split('\n').filter(Boolean).map((line) => Number(line.split(' ')[0])))]
}

/** Polls until the probe holds; false at the deadline, which only turns a leak (something that never goes) into a finding. */
async function waitUntil (probe: () => boolean, timeoutMs = EVENT_TIMEOUT_MS): Promise<boolean> {
  const deadline = Date.now() + timeoutMs
  while (!probe()) {
    if (Date.now() >= deadline) return false
    await sleep(50)
  }
  return true
}

function injectSender (app: FastifyInstance): Send {
  return async (method, url, body) => {
    const res = await app.inject({ method, url, ...(body === undefined ? {} : { payload: body as object }) })
    let parsed: Record<string, unknown> = {}
    try { parsed = res.json() } catch {}
    return { status: res.statusCode, body: parsed }
  }
}

function httpSender (port: number, agent: Agent): Send {
  return async (method, url, body) => await new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body)
    const req = httpRequest({
      host: '127.0.0.1',
      port,
      method,
      path: url,
      agent,
      headers: payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      res.on('end', () => {
        let parsed: Record<string, unknown> = {}
        try { parsed = JSON.parse(text) } catch {}
        resolve({ status: res.statusCode ?? 0, body: parsed })
      })
      res.on('error', reject)
    })
    req.on('error', reject)
    req.end(payload)
  })
}

export async function runSoak (partial: Partial<SoakOptions> = {}): Promise<SoakReport> {
  const options: SoakOptions = { ...SOAK_DEFAULTS, ...partial }
  const log = options.log ?? (() => {})
  const stateDir = mkdtempSync(join(tmpdir(), 'agent-sessions-soak-'))
  const app = Fastify({ logger: false, return503OnClosing: false })
  const pluginOptions: AgentSessionsOptions = {
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    sessionTimeout: options.sessionTimeoutMs,
    cleanupInterval: options.cleanupIntervalMs,
    killGrace: options.killGraceMs,
    askTimeout: options.askTimeoutMs,
    startTimeout: AGENT_CALL_TIMEOUT_MS,
    maxSessions: 10_000,
    // Every simulated client connects from 127.0.0.1.
    maxSessionsPerClient: 10_000,
    startRateLimit: 1_000_000,
    agentEnv: { FAKE_AGENT_STATE_DIR: stateDir },
    // Only stalled turns may time out: starts and the other turns get a generous timeout.
    wrapDriver: onlyTheseTurnsTimeOut((prompt) => prompt.includes('[[fault:stall]]'))
  }
  // A fresh function: fp() marks the function it wraps.
  await app.register(fp(async (instance, opts: AgentSessionsOptions) => { await agentSessions(instance, opts) }), pluginOptions)
  let agent: Agent | undefined
  let port = 0
  if (options.transport === 'http') {
    await app.listen({ port: 0, host: '127.0.0.1' })
    const address = app.server.address()
    port = typeof address === 'object' && address !== null ? address.port : 0
  } else {
    await app.ready()
  }
  // A fresh keep-alive pool per phase, so the baseline holds no client socket.
  const connect = (): Send => {
    if (options.transport === 'inject') return injectSender(app)
    agent = new Agent({ keepAlive: true, maxSockets: options.clients * 2 })
    return httpSender(port, agent)
  }
  let send = connect()

  const statuses: Record<string, number> = {}
  const unexpected: string[] = []
  const failures: string[] = []
  let sessionsStarted = 0
  let turns = 0
  let answered = 0
  let heartbeats = 0
  let ends = 0
  let reaped = 0
  app.agentSessions.on('session-ended', (report) => { if (report.reason === 'expired') reaped++ })

  const call = async (what: keyof typeof EXPECTED, method: 'GET' | 'POST', url: string, body?: unknown): Promise<{ status: number, body: Record<string, unknown> }> => {
    const res = await send(method, url, body)
    const key = `${what} ${res.status}${res.status >= 400 ? ` ${String(res.body.error)}` : ''}`
    statuses[key] = (statuses[key] ?? 0) + 1
    const allowed = EXPECTED[what][res.status]
    if (allowed === undefined || (allowed.length > 0 && !allowed.includes(String(res.body.error)))) {
      if (unexpected.length < 50) unexpected.push(`${method} ${url} -> ${res.status} ${JSON.stringify(res.body).slice(0, 300)}`)
    }
    return res
  }
  const start = async (): Promise<string | undefined> => {
    const res = await call('start', 'POST', '/api/session/start')
    if (res.status !== 200) return undefined
    sessionsStarted++
    return String(res.body.session_id)
  }
  const question = (rand: () => number, n: number): string =>
    rand() < options.faultRate ? `turn ${n} ${FAULTS[Math.floor(rand() * FAULTS.length)]}` : `turn ${n}: what does app.ts do?`
  const ask = async (id: string, text: string): Promise<number> => {
    turns++
    const { status } = await call('ask', 'POST', `/api/ask?session_id=${id}`, { question: text })
    if (status === 200) answered++
    return status
  }

  // Warm-up: load every code path once, so the baseline is not taken cold.
  {
    const id = await start()
    if (id !== undefined) {
      await ask(id, 'warm-up')
      await call('heartbeat', 'POST', `/api/heartbeat?session_id=${id}`)
      await call('end', 'POST', `/api/session/end?session_id=${id}`)
    }
    await send('GET', '/api/health')
    await waitUntil(() => readPids(stateDir).every((pid) => !isProcessAlive(pid)) && app.agentSessions.counts().closing === 0)
    agent?.destroy()
    send = connect()
    await sleep(200)
  }
  const fdsBefore = openFds()
  const heapBeforeMb = await heapAfterGcMb()
  log(`baseline: ${fdsBefore} open fds, heap ${heapBeforeMb} MB after gc`)

  const loopDelay = monitorEventLoopDelay({ resolution: 20 })
  loopDelay.enable()
  const started = performance.now()
  const client = async (index: number): Promise<void> => {
    const rand = random(options.seed * 1000 + index)
    const timeout = options.sessionTimeoutMs
    for (let s = 0; s < options.sessionsPerClient; s++) {
      let id = await start()
      if (id === undefined) continue
      for (let n = 0; n < options.turnsPerSession; n++) {
        const roll = rand()
        if (roll < 0.55) {
          const status = await ask(id, question(rand, n))
          if (status === 404) id = await start() ?? id
        } else if (roll < 0.7) {
          // A heartbeat during a turn, and a second ask that must be refused as busy.
          const turn = ask(id, `turn ${n} [[fault:slow=150]]`)
          await sleep(30)
          await call('heartbeat', 'POST', `/api/heartbeat?session_id=${id}`)
          heartbeats++
          await ask(id, 'me too')
          await turn
        } else if (roll < 0.85) {
          // Idle for about the timeout, then a heartbeat: it races the reaper.
          await sleep(timeout * (0.6 + rand() * 0.8))
          heartbeats++
          const res = await call('heartbeat', 'POST', `/api/heartbeat?session_id=${id}`)
          if (res.status === 404) id = await start() ?? id
        } else {
          heartbeats++
          await call('heartbeat', 'POST', `/api/heartbeat?session_id=${id}`)
        }
      }
      const ending = rand()
      if (ending < 0.35) {
        ends++
        await call('end', 'POST', `/api/session/end?session_id=${id}`)
      } else if (ending < 0.55) {
        // End while a turn is in flight: the turn is answered 404, its processes go.
        const turn = ask(id, 'a long one [[fault:slow=400]] [[fault:grandchild]]')
        await sleep(50 + rand() * 100)
        ends++
        await call('end', 'POST', `/api/session/end?session_id=${id}`)
        await turn
      } else if (ending < 0.75) {
        // End at about the moment the reaper may take it.
        await sleep(timeout * (0.7 + rand() * 0.6))
        ends++
        await call('end', 'POST', `/api/session/end?session_id=${id}`)
      }
      // else: abandoned, the reaper's job.
    }
  }
  await Promise.all(Array.from({ length: options.clients }, async (_, i) => { await client(i) }))
  const durationMs = Math.round(performance.now() - started)
  loopDelay.disable()
  const loopDelayMaxMs = Math.round(loopDelay.max / 1e6)
  log(`load done in ${durationMs} ms: ${sessionsStarted} sessions, ${turns} turns; event loop delay up to ${loopDelayMaxMs} ms`)

  // Everything abandoned must be reaped, without closing the app (close would hide a leak).
  // It takes about SESSION_TIMEOUT + CLEANUP_INTERVAL + KILL_GRACE; the deadline is 10x that, at least EVENT_TIMEOUT_MS.
  const reapBound = Math.max(EVENT_TIMEOUT_MS, 10 * (options.sessionTimeoutMs + options.cleanupIntervalMs + options.killGraceMs))
  const empty = (): boolean => {
    const c = app.agentSessions.counts()
    return c.active === 0 && c.busy === 0 && c.starting === 0 && c.closing === 0
  }
  if (!(await waitUntil(empty, reapBound))) failures.push(`sessions left ${reapBound} ms after the load: ${JSON.stringify(app.agentSessions.counts())}`)
  const sessionsLeft = app.agentSessions.counts()

  const pids = readPids(stateDir)
  await waitUntil(() => pids.every((pid) => !isProcessAlive(pid)))
  const aliveAfter = pids.filter(isProcessAlive)
  if (aliveAfter.length > 0) failures.push(`${aliveAfter.length} agent processes still alive: ${aliveAfter.slice(0, 10).join(', ')}`)

  agent?.destroy()
  // Sockets and pipes close asynchronously: wait for them.
  await waitUntil(() => openFds() <= fdsBefore + FD_SLACK)
  const fdsAfter = openFds()
  if (fdsAfter > fdsBefore + FD_SLACK) failures.push(`open fds ${fdsBefore} -> ${fdsAfter} (slack ${FD_SLACK})`)
  const heapAfterMb = await heapAfterGcMb()
  if (heapAfterMb > heapBeforeMb + HEAP_SLACK_MB) failures.push(`heap ${heapBeforeMb} MB -> ${heapAfterMb} MB after gc (slack ${HEAP_SLACK_MB} MB)`)
  if (unexpected.length > 0) failures.push(`${unexpected.length} unexpected responses, e.g. ${unexpected[0]}`)

  await app.close()
  // Safety net only (the checks above count): nothing of this run may outlive it.
  for (const pid of pids) {
    try { process.kill(pid, 'SIGKILL') } catch {}
    signalGroup(pid, 'SIGKILL')
  }
  rmSync(stateDir, { recursive: true, force: true })

  return {
    options,
    durationMs,
    loopDelayMaxMs,
    sessionsStarted,
    turns,
    answered,
    heartbeats,
    ends,
    reaped,
    statuses,
    unexpected,
    agentProcesses: pids.length,
    aliveAfter,
    sessionsLeft,
    fdsBefore,
    fdsAfter,
    heapBeforeMb,
    heapAfterMb,
    failures
  }
}

function envNumber (name: string, fallback: number): number {
  const raw = process.env[name]
  if (raw === undefined || raw === '') return fallback
  const n = Number(raw)
  if (!Number.isFinite(n) || n < 0) throw new Error(`${name} must be a non-negative number, got ${JSON.stringify(raw)}`)
  return n
}

async function main (): Promise<void> {
  const options: Partial<SoakOptions> = {
    clients: envNumber('SOAK_CLIENTS', SOAK_DEFAULTS.clients),
    sessionsPerClient: envNumber('SOAK_SESSIONS', SOAK_DEFAULTS.sessionsPerClient),
    turnsPerSession: envNumber('SOAK_TURNS', SOAK_DEFAULTS.turnsPerSession),
    transport: process.env.SOAK_TRANSPORT === 'inject' ? 'inject' : 'http',
    seed: envNumber('SOAK_SEED', SOAK_DEFAULTS.seed),
    log: (line) => { console.log(`soak: ${line}`) }
  }
  const report = await runSoak(options)
  const o = report.options
  console.log(`soak: ${o.clients} clients x ${o.sessionsPerClient} sessions x ${o.turnsPerSession} steps over ${o.transport}, ` +
    `SESSION_TIMEOUT ${o.sessionTimeoutMs} ms, CLEANUP_INTERVAL ${o.cleanupIntervalMs} ms, seed ${o.seed}`)
  console.log(`  load:       ${report.sessionsStarted} sessions, ${report.turns} asks (${report.answered} answered), ${report.heartbeats} heartbeats, ${report.ends} ends, ` +
    `${report.reaped} reaped, in ${(report.durationMs / 1000).toFixed(1)} s (${(report.turns / (report.durationMs / 1000)).toFixed(1)} turns/s)`)
  console.log(`  processes:  ${report.agentProcesses} agent processes started, ${report.aliveAfter.length} alive after`)
  console.log(`  sessions:   ${JSON.stringify(report.sessionsLeft)} left after the reaper's bound`)
  console.log(`  fds:        ${report.fdsBefore} -> ${report.fdsAfter} (x${(report.fdsAfter / report.fdsBefore).toFixed(2)})`)
  console.log(`  heap:       ${report.heapBeforeMb} MB -> ${report.heapAfterMb} MB after gc (x${(report.heapAfterMb / report.heapBeforeMb).toFixed(2)})`)
  console.log(`  responses:  ${JSON.stringify(report.statuses)}`)
  if (report.failures.length > 0) {
    console.log('FAILED:')
    for (const failure of report.failures) console.log(`  - ${failure}`)
    for (const line of report.unexpected.slice(0, 10)) console.log(`  unexpected: ${line}`)
    process.exitCode = 1
  } else {
    console.log('soak: no leak found')
  }
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await main()
}
