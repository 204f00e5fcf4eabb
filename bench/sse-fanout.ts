// Many concurrent SSE asks fed by an in-process fake driver (no agent
// processes: this measures the service's SSE path): each of N streams gets a
// chunk every 100 ms (10 chunks/s) for the length of the window. Measured in
// the server's process, with the clients in another (bench/sse-clients.ts):
//   - event-loop delay p99 (monitorEventLoopDelay, beyond its 1 ms period), target < 20 ms;
//   - CPU time of the server process per delivered chunk (in a window of its
//     own, before the delay monitor's 1 ms timer runs);
//   - heap per open stream (forced GC, streams open and turns in flight,
//     against the heap with the sessions created and no stream open).
// Baseline, same run, same clients, same timers: a bare node:http server
// writing the same events straight to each response (no Fastify, session
// manager, event buffer or backpressure). Rounds alternate service / bare;
// the loop delay is each side's worse round, CPU and heap their mean.

import { fork, type ChildProcess } from 'node:child_process'
import { createServer, type ServerResponse } from 'node:http'
import { join } from 'node:path'
import { monitorEventLoopDelay } from 'node:perf_hooks'
import type { AgentDriver, PromptOptions, TurnResult } from '../lib/agents/types.js'
import { promptOnlyDriver } from '../test/helpers/fake-driver.js'
import { BENCH_DIR, fmt, QUICK, ROOT, round, serviceApp, sleep, type BenchResult } from './lib.js'

const TARGET_LOOP_DELAY_P99_MS = 20
const CHUNK_INTERVAL_MS = 100
const CHUNK_TEXT = 'a chunk of the answer, '
const LOOP_DELAY_RESOLUTION_MS = 1

/** Feeds every open turn a chunk every CHUNK_INTERVAL_MS until stop(). */
class Ticker {
  emitted = 0
  readonly #stops = new Set<() => void>()

  /** Starts one stream's ticks at a random phase; calls done() on stop. */
  start (emit: () => void, done: () => void): void {
    let interval: NodeJS.Timeout | undefined
    const tick = (): void => {
      this.emitted++
      emit()
    }
    const phase = setTimeout(() => {
      tick()
      interval = setInterval(tick, CHUNK_INTERVAL_MS)
    }, Math.random() * CHUNK_INTERVAL_MS)
    this.#stops.add(() => {
      clearTimeout(phase)
      clearInterval(interval)
      done()
    })
  }

  stop (): void {
    for (const stop of this.#stops) stop()
    this.#stops.clear()
  }
}

function tickerDriver (feed: { ticker: Ticker }): AgentDriver {
  return promptOnlyDriver('bench-ticker', async (_text: string, options: PromptOptions) => await new Promise<TurnResult>((resolve) => {
    feed.ticker.start(() => { options.onEvent({ type: 'chunk', text: CHUNK_TEXT }) }, () => {
      resolve({ answer: 'done', stopReason: 'end_turn', durationMs: 0 })
    })
  }))
}

interface Round {
  mode: 'service' | 'bare'
  streams: number
  loopDelayP99Ms: number
  loopDelayMaxMs: number
  cpuUsPerChunk: number
  chunksPerSecond: number
  heapPerStreamBytes: number
  /** Every chunk the ticker emitted reached a client; every stream ended with its answer. */
  delivered: number
  emitted: number
  answers: number
  errors: number
}

function settledHeap (): number {
  const gc = globalThis.gc
  if (gc === undefined) throw new Error('run with --expose-gc (bench/run.ts does)')
  for (let i = 0; i < 4; i++) gc()
  return process.memoryUsage().heapUsed
}

/** The client process: open, count, done. */
class Clients {
  readonly #child: ChildProcess
  readonly #waiting = new Map<string, Array<(message: Record<string, number>) => void>>()

  constructor () {
    this.#child = fork(join(BENCH_DIR, 'sse-clients.ts'), [], { cwd: ROOT, execArgv: ['--import', 'tsx'], stdio: ['ignore', 'inherit', 'inherit', 'ipc'] })
    this.#child.on('message', (raw) => {
      const message = raw as { type: string } & Record<string, number>
      const waiter = this.#waiting.get(message.type)?.shift()
      waiter?.(message)
    })
  }

  next (type: string, timeoutMs: number): Promise<Record<string, number>> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => { reject(new Error(`sse clients: no '${type}' within ${timeoutMs} ms`)) }, timeoutMs)
      const list = this.#waiting.get(type) ?? []
      list.push((message) => {
        clearTimeout(timer)
        resolve(message)
      })
      this.#waiting.set(type, list)
    })
  }

  send (message: object): void {
    this.#child.send(message)
  }

  async count (): Promise<number> {
    const reply = this.next('count', 30_000)
    this.send({ type: 'count' })
    return (await reply).chunks
  }

  async stop (): Promise<void> {
    if (this.#child.exitCode !== null) return
    const exited = new Promise((resolve) => this.#child.once('exit', resolve))
    this.#child.disconnect()
    const timer = setTimeout(() => this.#child.kill('SIGKILL'), 5000)
    await exited
    clearTimeout(timer)
  }
}

// Streams run to their end before the measured ones, so that code compiled
// and shapes built on first use are not counted as heap per stream.
const WARMUP_STREAMS = 20

async function measureRound (mode: 'service' | 'bare', streams: number, windowMs: number): Promise<Round> {
  // The driver and the bare server feed the streams of the current batch.
  const feed = { ticker: new Ticker() }
  let base: string
  let paths: string[]
  let close: () => Promise<void>
  if (mode === 'service') {
    const app = await serviceApp({
      driver: tickerDriver(feed),
      maxSessions: streams + WARMUP_STREAMS,
      sessionTimeout: '1h',
      cleanupInterval: '1h'
    })
    await app.listen({ host: '127.0.0.1', port: 0 })
    base = `http://127.0.0.1:${(app.server.address() as { port: number }).port}`
    paths = []
    for (let i = 0; i < WARMUP_STREAMS + streams; i++) paths.push(`/api/ask?session_id=${(await app.agentSessions.create()).id}`)
    close = async () => { await app.close() }
  } else {
    const open = new Set<ServerResponse>()
    const server = createServer((req, res) => {
      req.resume()
      req.on('end', () => {
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache', connection: 'keep-alive' })
        open.add(res)
        const data = JSON.stringify({ text: CHUNK_TEXT })
        feed.ticker.start(() => { res.write(`event: chunk\ndata: ${data}\n\n`) }, () => {
          res.end(`event: answer\ndata: ${JSON.stringify({ answer: 'done', session_id: 'bare', stop_reason: 'end_turn' })}\n\n`)
          open.delete(res)
        })
      })
    })
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
    base = `http://127.0.0.1:${(server.address() as { port: number }).port}`
    paths = Array.from({ length: WARMUP_STREAMS + streams }, (_, i) => `/ask?i=${i}`)
    close = async () => {
      for (const res of open) res.destroy()
      await new Promise<void>((resolve) => server.close(() => resolve()))
    }
  }

  const clients = new Clients()
  try {
    const warmed = clients.next('opened', 120_000)
    clients.send({ type: 'open', base, paths: paths.slice(0, WARMUP_STREAMS) })
    await warmed
    const warmDone = clients.next('done', 120_000)
    feed.ticker.stop()
    await warmDone
    feed.ticker = new Ticker()
    const ticker = feed.ticker

    const heapBefore = settledHeap()
    const opened = clients.next('opened', 120_000)
    clients.send({ type: 'open', base, paths: paths.slice(WARMUP_STREAMS) })
    await opened
    await sleep(QUICK ? 100 : 1000)

    // CPU first, without the delay monitor: its 1 ms timer costs CPU of its own.
    const delivered0 = await clients.count()
    const cpu0 = process.cpuUsage()
    const t0 = performance.now()
    await sleep(windowMs)
    const cpu = process.cpuUsage(cpu0)
    const seconds = (performance.now() - t0) / 1000
    const deliveredInWindow = await clients.count() - delivered0

    const h = monitorEventLoopDelay({ resolution: LOOP_DELAY_RESOLUTION_MS })
    h.enable()
    await sleep(windowMs)
    h.disable()

    // Streams open, turns in flight: what they hold once garbage is gone.
    const heapOpen = settledHeap()
    const done = clients.next('done', 120_000)
    ticker.stop()
    const final = await done
    const beyond = (ns: number): number => Math.max(0, ns / 1e6 - LOOP_DELAY_RESOLUTION_MS)
    return {
      mode,
      streams,
      loopDelayP99Ms: beyond(h.percentile(99)),
      loopDelayMaxMs: beyond(h.max),
      cpuUsPerChunk: (cpu.user + cpu.system) / Math.max(1, deliveredInWindow),
      chunksPerSecond: deliveredInWindow / seconds,
      heapPerStreamBytes: (heapOpen - heapBefore) / streams,
      delivered: final.chunks,
      emitted: ticker.emitted,
      answers: final.answers,
      errors: final.errors
    }
  } finally {
    feed.ticker.stop()
    await clients.stop()
    await close()
  }
}

export async function run (): Promise<BenchResult> {
  const streams = QUICK ? 50 : 1000
  const windowMs = QUICK ? 500 : 10_000
  const order: Array<'service' | 'bare'> = QUICK ? ['service', 'bare'] : ['service', 'bare', 'bare', 'service']
  const rounds: Round[] = []
  for (const mode of order) rounds.push(await measureRound(mode, streams, windowMs))

  const invalid = rounds.filter((r) => r.delivered !== r.emitted || r.answers !== r.streams || r.errors > 0)
  if (invalid.length > 0) throw new Error(`streams lost chunks or answers: ${JSON.stringify(invalid)}`)
  const of = (mode: 'service' | 'bare'): Round[] => rounds.filter((r) => r.mode === mode)
  const worst = (rs: Round[], key: keyof Round): number => Math.max(...rs.map((r) => r[key] as number))
  const mean = (rs: Round[], key: keyof Round): number => rs.reduce((sum, r) => sum + (r[key] as number), 0) / rs.length
  const service = of('service')
  const bare = of('bare')
  const delayP99 = worst(service, 'loopDelayP99Ms')
  const bareDelayP99 = worst(bare, 'loopDelayP99Ms')
  const cpu = mean(service, 'cpuUsPerChunk')
  const bareCpu = mean(bare, 'cpuUsPerChunk')
  const heap = mean(service, 'heapPerStreamBytes')
  const bareHeap = mean(bare, 'heapPerStreamBytes')
  const rate = mean(service, 'chunksPerSecond')
  const met = delayP99 < TARGET_LOOP_DELAY_P99_MS
  const label = `${streams.toLocaleString('en-US')} streams x 10 chunks/s`
  return {
    name: 'sse-fanout',
    title: 'SSE fan-out',
    baseline: 'a bare node:http server writing the same events from the same timers',
    met,
    rows: [{
      benchmark: `SSE fan-out: loop delay p99 (${label})`,
      measured: `${fmt(delayP99)} ms (max ${fmt(worst(service, 'loopDelayMaxMs'))})`,
      baseline: `bare node:http ${fmt(bareDelayP99)} ms`,
      figure: `${fmt(delayP99 - bareDelayP99)} ms more`,
      target: `< ${TARGET_LOOP_DELAY_P99_MS} ms`,
      met
    }, {
      benchmark: `SSE fan-out: server CPU per delivered chunk (${label})`,
      measured: `${fmt(cpu, 1)} us (${fmt(rate, 0)} chunks/s)`,
      baseline: `bare node:http ${fmt(bareCpu, 1)} us`,
      figure: `ratio ${fmt(cpu / bareCpu, 2)}`,
      target: '(reported)',
      met: null
    }, {
      benchmark: `SSE fan-out: heap per open stream (${label})`,
      measured: `${fmt(heap / 1024, 1)} KiB`,
      baseline: `bare node:http ${fmt(bareHeap / 1024, 1)} KiB`,
      figure: `+${fmt((heap - bareHeap) / 1024, 1)} KiB`,
      target: '(reported)',
      met: null
    }],
    figures: {
      streams,
      windowMs,
      loopDelayP99Ms: round(delayP99, 3),
      bareLoopDelayP99Ms: round(bareDelayP99, 3),
      cpuUsPerChunk: round(cpu, 2),
      bareCpuUsPerChunk: round(bareCpu, 2),
      cpuRatioToBare: round(cpu / bareCpu, 3),
      chunksPerSecond: round(rate, 0),
      heapBytesPerStream: round(heap, 0),
      bareHeapBytesPerStream: round(bareHeap, 0)
    },
    details: { rounds: rounds.map((r) => Object.fromEntries(Object.entries(r).map(([k, v]) => [k, typeof v === 'number' ? round(v, 3) : v]))) }
  }
}
