// Shared pieces of the benchmarks: settings for full and quick mode, statistics,
// an agent driver that spawns nothing, simulator sandboxes whose pids are checked
// afterwards, the load-target server child and an autocannon wrapper.
//
// Every benchmark reports its figures against a baseline measured in the same
// run, never an absolute time on its own: the machines are shared and noisy.

import { execFileSync, fork, spawn, type ChildProcess } from 'node:child_process'
import { closeSync, mkdirSync, mkdtempSync, openSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs'
import { request as httpRequest } from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import autocannon from 'autocannon'
import Fastify, { type FastifyInstance, type FastifyServerOptions } from 'fastify'
import type { AgentSessionsOptions } from '../app.js'
import { freePort, liftDecorators, ROOT, SIMULATOR } from '../test/helpers/index.js'
import type { AgentDriver } from '../lib/agents/types.js'
import { promptOnlyDriver } from '../test/helpers/fake-driver.js'
import { isProcessAlive, signalGroup } from '../lib/processes/terminate.js'
import { SERVICE_ENV_NAMES } from '../lib/config.js'

export { ROOT, SIMULATOR }

/**
 * The real app against the simulator (or the given driver), ready, with its
 * decorators lifted so a benchmark can reach the manager and the reaper.
 */
export async function serviceApp (options: AgentSessionsOptions, fastifyOptions: FastifyServerOptions = {}): Promise<FastifyInstance> {
  const app = Fastify({ logger: false, ...fastifyOptions })
  await app.register(liftDecorators, { cursorAgentBin: SIMULATOR, workspaceDir: ROOT, ...options })
  await app.ready()
  return app
}

/** How many routes the app declares (HEAD routes aside), as the benchmarks run it: no Redis, so no cluster routes. */
export async function countAppRoutes (): Promise<number> {
  const app = Fastify({ logger: false, exposeHeadRoutes: false })
  let routes = 0
  app.addHook('onRoute', () => { routes++ })
  await app.register(liftDecorators, { cursorAgentBin: SIMULATOR, workspaceDir: ROOT, stateDir: 'off' })
  await app.ready()
  await app.close()
  return routes
}

export const BENCH_DIR = fileURLToPath(new URL('.', import.meta.url))

export const QUICK = process.argv.includes('--quick') || process.env.BENCH_QUICK === '1'

/** The benchmarks bench/run.ts runs, in order. */
export const BENCHMARKS = ['heartbeat', 'ask', 'teardown', 'reaper', 'memory', 'precision', 'acp', 'sse-fanout', 'durability', 'cluster'] as const

/**
 * How long one quick-mode benchmark may run before bench/run.ts gives up on
 * it: only a hang should reach it. A quick benchmark takes seconds on a quiet
 * machine, but each starts two or three Node.js processes through tsx, and on
 * a loaded 2-core machine one of those can take 15 s to start.
 */
export const QUICK_BENCH_TIMEOUT_MS = 600_000

/** What one benchmark hands back to bench/run.ts: its table rows and its raw figures. */
export interface BenchResult {
  name: string
  title: string
  baseline: string
  /** Whether every target of this benchmark was met (reported, never asserted). */
  met: boolean
  rows: TableRow[]
  /** Every figure, numeric, for results.json. */
  figures: Record<string, number>
  /** Anything else worth keeping (per-round figures, distributions, validity checks). */
  details?: Record<string, unknown>
}

export interface TableRow {
  benchmark: string
  measured: string
  baseline: string
  figure: string
  target: string
  met: boolean | null
}

// ---------------------------------------------------------------------------
// Statistics

export interface Summary { n: number, min: number, p50: number, p90: number, p99: number, max: number, mean: number }

/** Nearest-rank percentile of an ascending array. */
export function percentile (sorted: readonly number[], p: number): number {
  if (sorted.length === 0) return NaN
  const rank = Math.ceil((p / 100) * sorted.length)
  return sorted[Math.min(sorted.length - 1, Math.max(0, rank - 1))]
}

export function summarize (values: readonly number[]): Summary {
  const sorted = [...values].sort((a, b) => a - b)
  const mean = sorted.reduce((sum, v) => sum + v, 0) / Math.max(1, sorted.length)
  return {
    n: sorted.length,
    min: sorted[0] ?? NaN,
    p50: percentile(sorted, 50),
    p90: percentile(sorted, 90),
    p99: percentile(sorted, 99),
    max: sorted[sorted.length - 1] ?? NaN,
    mean
  }
}

export function median (values: readonly number[]): number {
  return percentile([...values].sort((a, b) => a - b), 50)
}

/** Quantile with linear interpolation between order statistics (R's type 7); 0.5 is the usual median. */
export function quantile (values: readonly number[], q: number): number {
  const sorted = [...values].sort((a, b) => a - b)
  if (sorted.length === 0) return NaN
  const pos = (sorted.length - 1) * q
  const lo = Math.floor(pos)
  const hi = Math.ceil(pos)
  return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo)
}

/** A seeded generator (mulberry32): bootstrap intervals come out the same for the same data. */
function seededRandom (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6D2B79F5) >>> 0
    let t = a
    t = Math.imul(t ^ (t >>> 15), t | 1)
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61)
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296
  }
}

/** The middle and the spread of per-round figures: median, interquartile range and a bootstrap 95 % interval of the median. */
export interface Spread { n: number, median: number, q1: number, q3: number, ciLow: number, ciHigh: number }

export function spread (values: readonly number[], resamples = 4000): Spread {
  const n = values.length
  const random = seededRandom(0x5eed)
  const medians: number[] = []
  for (let r = 0; r < resamples && n > 0; r++) {
    const sample = Array.from({ length: n }, () => values[Math.floor(random() * n)])
    medians.push(quantile(sample, 0.5))
  }
  return {
    n,
    median: quantile(values, 0.5),
    q1: quantile(values, 0.25),
    q3: quantile(values, 0.75),
    ciLow: quantile(medians, 0.025),
    ciHigh: quantile(medians, 0.975)
  }
}

export function round (value: number, digits = 2): number {
  const f = 10 ** digits
  return Math.round(value * f) / f
}

export function fmt (value: number, digits = 2): string {
  return round(value, digits).toLocaleString('en-US', { maximumFractionDigits: digits })
}

/** A delta with its sign: +1.2, -0.4. */
export function signed (value: number, digits = 2): string {
  return `${value >= 0 ? '+' : '-'}${fmt(Math.abs(value), digits)}`
}

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}

// ---------------------------------------------------------------------------
// An agent driver that spawns nothing: sessions cost only what the service keeps.

// Ids as the service keeps them (flat strings, not randomUUID()'s ropes): the
// real driver's chat ids are parsed out of create-chat's output (flat), and the
// baselines' ids must cost what the service's cost, or the memory figures
// would compare ropes with strings.
export { newSessionId as flatUUID } from '../lib/sessions/manager.js'

export function idleDriver (): AgentDriver {
  return promptOnlyDriver('bench-idle-driver', async () => ({ answer: 'ok', stopReason: 'end_turn', durationMs: 0 }))
}

// ---------------------------------------------------------------------------
// Simulator sandboxes: a state dir (chats, pids.log) under the run's temp root,
// so bench/run.ts can check every pid any benchmark started once all are done.

export function tempRoot (): string {
  const root = process.env.BENCH_TMP_ROOT
  if (root !== undefined && root !== '') {
    mkdirSync(root, { recursive: true })
    return root
  }
  return tmpdir()
}

export interface Sandbox {
  dir: string
  pids: () => Array<{ pid: number, role: string }>
}

export function sandbox (name: string): Sandbox {
  const dir = mkdtempSync(join(tempRoot(), `${name}-`))
  return { dir, pids: () => readPidLog(join(dir, 'pids.log')) }
}

export function readPidLog (file: string): Array<{ pid: number, role: string }> {
  let text = ''
  try {
    text = readFileSync(file, 'utf8')
  } catch {}
  return text.split('\n').filter(Boolean).map((line) => {
    const [pid, role] = line.split(' ')
    return { pid: Number(pid), role }
  })
}

/** Every pids.log below a directory. */
export function pidLogsUnder (dir: string): string[] {
  const found: string[] = []
  let names: string[]
  try {
    names = readdirSync(dir)
  } catch {
    return found
  }
  for (const name of names) {
    const path = join(dir, name)
    if (name === 'pids.log') found.push(path)
    else if (statSync(path, { throwIfNoEntry: false })?.isDirectory() === true) found.push(...pidLogsUnder(path))
  }
  return found
}

/**
 * The pids that still run a simulator. Zombies count as gone; a pid that now
 * belongs to another program (pids are reused) is not ours.
 */
export function stillRunning (pids: readonly number[]): number[] {
  return pids.filter((pid) => {
    if (!isProcessAlive(pid)) return false
    try {
      return readFileSync(`/proc/${pid}/cmdline`, 'latin1').includes('fake-cursor-agent')
    } catch {
      return true
    }
  })
}

/** Safety net: SIGKILL whatever of these pids (and their groups) still runs a simulator. */
export function killLeftovers (pids: readonly number[]): number[] {
  const left = stillRunning(pids)
  for (const pid of left) {
    signalGroup(pid, 'SIGKILL')
    try { process.kill(pid, 'SIGKILL') } catch {}
  }
  return left
}

export function removeDir (dir: string): void {
  rmSync(dir, { recursive: true, force: true })
}

// ---------------------------------------------------------------------------
// Load-target server in a child process (bench/server.ts), so that autocannon
// and the server under test do not share one event loop.

export interface ServerConfig {
  mode: 'service' | 'bare'
  /** Idle sessions created before listening. */
  sessions: number
  /** Reaper interval (service mode) in ms. */
  cleanupIntervalMs: number
  /** Whether the reaper's sweeps run from the start. */
  sweeps: boolean
}

export interface ServerHandle {
  port: number
  pid: number
  sessionId: string
  url: string
  request: <T = unknown>(command: string, args?: Record<string, unknown>) => Promise<T>
  stop: () => Promise<void>
}

export async function startServer (config: ServerConfig): Promise<ServerHandle> {
  // BENCH_SERVER_FLAGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the server under load.
  const extra = (process.env.BENCH_SERVER_FLAGS ?? '').split(' ').filter((f) => f !== '')
  const child: ChildProcess = fork(join(BENCH_DIR, 'server.ts'), [JSON.stringify(config)], {
    cwd: ROOT,
    execArgv: ['--import', 'tsx', '--expose-gc', ...extra],
    stdio: ['ignore', 'inherit', 'inherit', 'ipc']
  })
  let next = 0
  const pending = new Map<number, { resolve: (v: unknown) => void, reject: (e: Error) => void }>()
  let ready!: (v: { port: number, sessionId: string }) => void
  let failed!: (e: Error) => void
  const started = new Promise<{ port: number, sessionId: string }>((resolve, reject) => { ready = resolve; failed = reject })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  child.on('message', (raw) => {
    const msg = raw as { type: string, id?: number, result?: unknown, error?: string, port?: number, sessionId?: string }
    if (msg.type === 'ready') ready({ port: msg.port as number, sessionId: msg.sessionId as string })
    if (msg.type === 'reply' && msg.id !== undefined) {
      const p = pending.get(msg.id)
      pending.delete(msg.id)
      if (msg.error !== undefined) p?.reject(new Error(msg.error))
      else p?.resolve(msg.result)
    }
  })
  child.once('exit', (code) => {
    const err = new Error(`bench server (${config.mode}) exited with code ${String(code)}`)
    failed(err)
    for (const p of pending.values()) p.reject(err)
    pending.clear()
  })
  const { port, sessionId } = await started
  return {
    port,
    pid: child.pid as number,
    sessionId,
    url: `http://127.0.0.1:${port}`,
    request: async <T>(command: string, args: Record<string, unknown> = {}) => {
      const id = next++
      const reply = new Promise<unknown>((resolve, reject) => pending.set(id, { resolve, reject }))
      child.send({ type: 'command', id, command, args })
      return await reply as T
    },
    stop: async () => {
      if (child.exitCode === null && child.signalCode === null) {
        child.disconnect()
        const timer = setTimeout(() => child.kill('SIGKILL'), 5000)
        await exited
        clearTimeout(timer)
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Servers in processes of their own as users run them: the standalone server
// (`node dist/server.js`, as `npm start` runs it) and its baseline, a bare
// Fastify server (bench/bare-server.mjs) with the same logger at the same level.

/** What a load run needs of a server, and what CPU accounting needs. */
export interface LoadTarget {
  url: string
  sessionId: string
  pid: number
}

export interface ProcessServer extends LoadTarget {
  stop: () => Promise<void>
}

/**
 * CPU time a process has used so far (every thread), in microseconds: the sum
 * of /proc/PID/task/TID/schedstat, the scheduler's own count in nanoseconds.
 * utime + stime in /proc/PID/stat come in 10 ms clock ticks, each rounded
 * down: over a 1.5 s round at 0.3-0.7 s of CPU that is a few percent of error
 * per round, as large as the gaps the heartbeat benchmark looks for. (A thread
 * running at the moment of reading is counted up to its last scheduler tick.)
 */
export function processCpuUs (pid: number): number {
  let ns = 0
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'latin1').split(' ')[0])
    } catch {} // a thread that ended between the listing and the read
  }
  return ns / 1000
}

/**
 * CPU time (user + system) this process has used so far, in milliseconds. The
 * kernel brings the calling thread's share up to date on each call (other
 * threads only at scheduler ticks), so it times a synchronous loop to the
 * microsecond; unlike a wall clock it does not grow while other processes of
 * a busy machine hold the core. (/proc/thread-self/schedstat would not do: it
 * counts the running slice only at the next tick.)
 */
export function cpuTimeMs (): number {
  const usage = process.cpuUsage()
  return (usage.user + usage.system) / 1000
}

function post (url: string): Promise<{ status: number, body: string }> {
  return new Promise((resolve, reject) => {
    const req = httpRequest(url, { method: 'POST' }, (res) => {
      let body = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { body += chunk })
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }))
    })
    req.on('error', reject)
    req.end()
  })
}

/** The environment a user's shell would hand the server: none of the service's own settings leak in from ours. */
function serverEnv (extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [key, value] of Object.entries(process.env)) {
    if (!SERVICE_ENV_NAMES.includes(key)) env[key] = value
  }
  return { ...env, ...extra }
}

function exitedPromise (child: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve()
    else child.once('exit', () => resolve())
  })
}

async function stopProcess (child: ChildProcess, exited: Promise<void>): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return
  child.kill('SIGTERM')
  const timer = setTimeout(() => child.kill('SIGKILL'), 15_000)
  await exited
  clearTimeout(timer)
}

export interface ProcessServerOptions {
  logLevel: string
  /** Sessions started before the load (the first is the one heartbeats go to). */
  sessions: number
  /** Simulator state dir of the standalone server's sessions (bench/run.ts checks its pids). */
  stateDir: string
  /** STATE_DIR, the server's session store: on by default as for users, in `<stateDir>/store-<port>` (never the user's own); `off` for none. */
  storeDir?: string
  /** Extra node flags (BENCH_SERVER_FLAGS: --cpu-prof ...). */
  nodeFlags?: string[]
  /** Another build's server.js (an A/B of two builds); dist/server.js, built if stale, by default. */
  entry?: string
}

let built = false

/** dist/ as the sources are, built once per benchmark process if stale. */
function ensureBuilt (): void {
  if (built) return
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'ensure-built.mjs')], { cwd: ROOT, stdio: 'inherit' })
  built = true
}

/** The app's agent is the simulator, its state under stateDir; one store per server, as the default (one per port): servers started side by side must not share it. */
function simulatorEnv (stateDir: string, port: number): Record<string, string> {
  return {
    CURSOR_AGENT_BIN: SIMULATOR,
    FAKE_AGENT_STATE_DIR: stateDir,
    // The agent's environment is an allow-list.
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR',
    STATE_DIR: join(stateDir, `store-${port}`)
  }
}

/**
 * The standalone server as the README starts it (`npm start`: build if stale,
 * then `node dist/server.js`; `npm run demo`: against the simulator), with its
 * defaults but LOG_LEVEL, on a free loopback port. Its logs go to /dev/null:
 * the figures are the server's cost to write them, not a log pipeline's.
 */
export async function startStandalone (options: ProcessServerOptions): Promise<ProcessServer> {
  if (options.entry === undefined) ensureBuilt()
  const port = await freePort()
  const devNull = openSync('/dev/null', 'w')
  const child = spawn(process.execPath, [...(options.nodeFlags ?? []), options.entry ?? join(ROOT, 'dist', 'server.js')], {
    cwd: ROOT,
    env: serverEnv({
      PORT: String(port),
      HOST: '127.0.0.1',
      LOG_LEVEL: options.logLevel,
      ...simulatorEnv(options.stateDir, port),
      ...(options.storeDir === undefined ? {} : { STATE_DIR: options.storeDir })
    }),
    stdio: ['ignore', devNull, 'inherit']
  })
  closeSync(devNull)
  const exited = exitedPromise(child)
  const url = `http://127.0.0.1:${port}`
  try {
    let first: string | undefined
    const deadline = performance.now() + 60_000
    while (first === undefined) {
      if (child.exitCode !== null) throw new Error(`the standalone server exited with code ${child.exitCode}`)
      if (performance.now() > deadline) throw new Error('the standalone server did not answer within 60 s')
      try {
        const res = await post(`${url}/api/session/start`)
        if (res.status !== 200) throw new Error(`POST /api/session/start answered ${res.status}: ${res.body}`)
        first = (JSON.parse(res.body) as { session_id: string }).session_id
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ECONNREFUSED') throw err
        await sleep(100)
      }
    }
    for (let i = 1; i < options.sessions; i++) {
      const res = await post(`${url}/api/session/start`)
      if (res.status !== 200) throw new Error(`POST /api/session/start answered ${res.status}: ${res.body}`)
    }
    return { url, sessionId: first, pid: child.pid as number, stop: async () => { await stopProcess(child, exited) } }
  } catch (err) {
    await stopProcess(child, exited)
    throw err
  }
}

export interface BareProcessOptions extends Omit<ProcessServerOptions, 'stateDir' | 'storeDir' | 'entry'> {
  /**
   * What else the process holds, idle, beside the bare route (bench/bare-server.mjs, BARE_BESIDE):
   * the whole app with `sessions` sessions, its simulator state and store under stateDir;
   * or an ordinary Fastify app of the same size (bench/ordinary-app.mjs), with as many routes as countAppRoutes().
   */
  beside?: { kind: 'app', stateDir: string } | { kind: 'ordinary-app', routes: number }
}

/** The baseline: bench/bare-server.mjs under plain `node`, same LOG_LEVEL, as many Map entries as sessions. */
export async function startBareProcess (options: BareProcessOptions): Promise<ProcessServer> {
  const beside = options.beside
  if (beside?.kind === 'app') ensureBuilt()
  const port = await freePort()
  const devNull = openSync('/dev/null', 'w')
  const child = spawn(process.execPath, [...(options.nodeFlags ?? []), join(BENCH_DIR, 'bare-server.mjs')], {
    cwd: ROOT,
    env: serverEnv({
      PORT: String(port),
      HOST: '127.0.0.1',
      LOG_LEVEL: options.logLevel,
      BARE_SESSIONS: String(options.sessions),
      ...(beside === undefined ? {} : { BARE_BESIDE: beside.kind }),
      ...(beside?.kind === 'app' ? simulatorEnv(beside.stateDir, port) : {}),
      ...(beside?.kind === 'ordinary-app' ? { ORDINARY_APP_ROUTES: String(beside.routes) } : {})
    }),
    stdio: ['ignore', devNull, 'inherit', 'pipe']
  })
  closeSync(devNull)
  const exited = exitedPromise(child)
  try {
    const ids = await new Promise<string[]>((resolve, reject) => {
      let text = ''
      const pipe = child.stdio[3] as NodeJS.ReadableStream
      pipe.setEncoding('utf8')
      pipe.on('data', (chunk: string) => {
        text += chunk
        if (text.includes('\n')) resolve((JSON.parse(text) as { ids: string[] }).ids)
      })
      void exited.then(() => reject(new Error(`the bare server exited with code ${String(child.exitCode)}`)))
    })
    return { url: `http://127.0.0.1:${port}`, sessionId: ids[0], pid: child.pid as number, stop: async () => { await stopProcess(child, exited) } }
  } catch (err) {
    await stopProcess(child, exited)
    throw err
  }
}

// ---------------------------------------------------------------------------
// HTTP load

export interface LoadResult {
  rps: number
  total: number
  errors: number
  non2xx: number
  latencyP50Ms: number
  latencyP99Ms: number
}

export async function loadHeartbeat (server: Pick<LoadTarget, 'url' | 'sessionId'>, options: { connections: number, seconds: number }): Promise<LoadResult> {
  const result = await autocannon({
    url: `${server.url}/api/heartbeat?session_id=${encodeURIComponent(server.sessionId)}`,
    method: 'POST',
    connections: options.connections,
    // Quick mode counts requests instead: on a busy machine a short duration
    // can pass before the first answer, and a ratio of zeros is no figure.
    ...(QUICK ? { amount: 20 * options.connections } : { duration: options.seconds }),
    pipelining: 1
  })
  return {
    rps: result.requests.total / (result.duration > 0 ? result.duration : options.seconds),
    total: result.requests.total,
    errors: result.errors + result.timeouts,
    non2xx: result.non2xx,
    latencyP50Ms: result.latency.p50,
    latencyP99Ms: result.latency.p99
  }
}
