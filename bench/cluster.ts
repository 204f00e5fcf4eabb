// Benchmark `cluster` (npm run bench -- --only=cluster, or npm run bench:cluster):
// what clustering costs, against a baseline from the same run. Needs
// redis-server (Debian's package; without it the benchmark says so and
// measures nothing) and dist/ (built if missing).
//
// 1. Forwarding: heartbeat latency of a session asked through an instance
//    that forwards it to its owner, against the owner asked directly (one
//    client, sequential keep-alive requests, rounds alternating). Target: the
//    forwarding adds <= 1 ms at p50.
// 2. Throughput: heartbeats over three instances, each request to a random
//    instance for a random session of the cluster (two in three forwarded),
//    against one instance asked only for its own sessions; the same
//    connections in all, rounds alternating. On a machine with fewer cores
//    than instances this measures what forwarding costs in CPU, not what
//    more machines add.
// 3. Losing an instance: from the SIGKILL of the owner to each of its
//    sessions answering through another instance, against INSTANCE_TTL.

import { spawn, type ChildProcess } from 'node:child_process'
import { execFileSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { createConnection } from 'node:net'
import { join } from 'node:path'
import autocannon from 'autocannon'
import { freePort } from '../test/helpers/index.js'
import { redisMissing } from '../test/helpers/redis.js'
import { cleanEnv } from '../test/helpers/server-process.js'
import { QUICK, ROOT, SIMULATOR, fmt, median, removeDir, sleep, spread, summarize, tempRoot, type BenchResult } from './lib.js'

const TTL_MS = 2000

interface Proc { child: ChildProcess, exited: Promise<void> }

function start (command: string, args: string[], env: NodeJS.ProcessEnv = process.env): Proc {
  const child = spawn(command, args, { cwd: ROOT, env, stdio: ['ignore', 'ignore', 'inherit'] })
  const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()))
  return { child, exited }
}

async function stop (proc: Proc, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (proc.child.exitCode !== null || proc.child.signalCode !== null) return
  proc.child.kill(signal)
  await proc.exited
}

async function post (url: string): Promise<{ status: number, json: Record<string, unknown> }> {
  const res = await fetch(url, { method: 'POST' })
  return { status: res.status, json: await res.json() as Record<string, unknown> }
}

async function until (probe: () => Promise<boolean>, what: string, timeoutMs = 60_000): Promise<void> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    try { if (await probe()) return } catch {}
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

async function instance (redisUrl: string, agentState: string, dirs: string[]): Promise<Proc & { url: string }> {
  const port = await freePort()
  const stateDir = mkdtempSync(join(tempRoot(), 'cluster-bench-state-'))
  dirs.push(stateDir)
  // None of the service's settings (nor tsx's loader) leak in from whoever runs the benchmark.
  const proc = start(process.execPath, [join(ROOT, 'dist', 'server.js')], cleanEnv({
    PORT: String(port),
    HOST: '127.0.0.1',
    LOG_LEVEL: 'warn',
    REDIS_URL: redisUrl,
    INSTANCE_TTL: `${TTL_MS}ms`,
    STATE_DIR: stateDir,
    // One client (this benchmark) starts every session.
    START_RATE_LIMIT: '1000',
    MAX_SESSIONS_PER_CLIENT: '1000',
    CURSOR_AGENT_BIN: SIMULATOR,
    FAKE_AGENT_STATE_DIR: agentState,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  }))
  const url = `http://127.0.0.1:${port}`
  await until(async () => (await fetch(`${url}/api/health/ready`)).status === 200, 'an instance to be ready')
  return { ...proc, url }
}

async function startSession (url: string): Promise<string> {
  const res = await post(`${url}/api/session/start`)
  if (res.status !== 200) throw new Error(`a start answered ${res.status}: ${JSON.stringify(res.json)}`)
  return res.json.session_id as string
}

/** Sequential heartbeats over one keep-alive connection; milliseconds each. */
async function latencies (url: string, n: number): Promise<number[]> {
  const out: number[] = []
  for (let i = 0; i < n; i++) {
    const started = performance.now()
    const res = await fetch(url, { method: 'POST' })
    await res.arrayBuffer()
    if (res.status !== 200) throw new Error(`heartbeat answered ${res.status}`)
    out.push(performance.now() - started)
  }
  return out
}

/**
 * Heartbeats per second from `connections` keep-alive connections split over
 * `targets`, each request for a session picked at random from `sessionIds`.
 */
async function throughput (targets: string[], sessionIds: string[], connections: number, seconds: number): Promise<number> {
  const pick = (): string => `/api/heartbeat?session_id=${sessionIds[Math.floor(Math.random() * sessionIds.length)]}`
  const results = await Promise.all(targets.map(async (url, i) => await autocannon({
    url,
    connections: Math.floor(connections / targets.length) + (i < connections % targets.length ? 1 : 0),
    ...(QUICK ? { amount: Math.ceil(120 / targets.length) } : { duration: seconds }),
    pipelining: 1,
    requests: [{ method: 'POST', setupRequest: (request) => ({ ...request, path: pick() }) }]
  })))
  const failed = results.reduce((n, r) => n + r.non2xx + r.errors + r.timeouts, 0)
  if (failed > 0) throw new Error(`${failed} heartbeats failed during the throughput round`)
  const total = results.reduce((n, r) => n + r.requests.total, 0)
  const duration = Math.max(...results.map((r) => r.duration))
  return total / (duration > 0 ? duration : seconds)
}

export async function run (): Promise<BenchResult> {
  const missing = redisMissing()
  if (missing !== null) {
    return {
      name: 'cluster',
      title: 'Cluster (three instances sharing Redis)',
      baseline: 'one instance, the owner asked directly',
      met: true,
      rows: [{ benchmark: 'Cluster', measured: 'not measured', baseline: '-', figure: missing, target: '-', met: null }],
      figures: {}
    }
  }
  execFileSync(process.execPath, [join(ROOT, 'scripts', 'ensure-built.mjs')], { cwd: ROOT, stdio: 'inherit' })
  const dirs: string[] = []
  const agentState = mkdtempSync(join(tempRoot(), 'cluster-bench-agent-'))
  dirs.push(agentState)
  const redisDir = mkdtempSync(join(tempRoot(), 'cluster-bench-redis-'))
  dirs.push(redisDir)
  const redisPort = await freePort()
  const redis = start('redis-server', ['--port', String(redisPort), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', '--dir', redisDir])
  const procs: Proc[] = [redis]
  try {
    const redisUrl = `redis://127.0.0.1:${redisPort}`
    await until(async () => await new Promise<boolean>((resolve) => {
      const probe = createConnection(redisPort, '127.0.0.1', () => { probe.end(); resolve(true) })
      probe.once('error', () => resolve(false))
    }), 'redis-server to accept connections')
    const [a, b, c] = await Promise.all([0, 1, 2].map(async () => await instance(redisUrl, agentState, dirs)))
    procs.push(a, b, c)
    const id = await startSession(a.url)
    const direct = `${a.url}/api/heartbeat?session_id=${id}`
    const forwarded = `${b.url}/api/heartbeat?session_id=${id}`
    await latencies(direct, QUICK ? 20 : 200)
    await latencies(forwarded, QUICK ? 20 : 200)

    const rounds = QUICK ? 2 : 10
    const perRound = QUICK ? 50 : 500
    const deltas: number[] = []
    const directP50: number[] = []
    const forwardedP50: number[] = []
    for (let r = 0; r < rounds; r++) {
      const order = r % 2 === 0 ? [direct, forwarded] : [forwarded, direct]
      const results = new Map<string, number>()
      for (const url of order) results.set(url, median(await latencies(url, perRound)))
      directP50.push(results.get(direct)!)
      forwardedP50.push(results.get(forwarded)!)
      deltas.push(results.get(forwarded)! - results.get(direct)!)
    }
    const delta = spread(deltas)

    // Throughput: sessions on every instance; one instance asked for its own against all three for any.
    const perInstance = QUICK ? 2 : 6
    const owned = new Map<string, string[]>()
    for (const node of [a, b, c]) {
      const ids: string[] = []
      for (let i = 0; i < perInstance; i++) ids.push(await startSession(node.url))
      owned.set(node.url, ids)
    }
    const everyId = [...owned.values()].flat()
    const connections = QUICK ? 6 : 48
    const seconds = 2
    const tputRounds = QUICK ? 1 : 8
    await throughput([a.url], owned.get(a.url)!, connections, 1)
    await throughput([a.url, b.url, c.url], everyId, connections, 1)
    const ratios: number[] = []
    const soloRps: number[] = []
    const spreadRps: number[] = []
    for (let r = 0; r < tputRounds; r++) {
      const solo = async (): Promise<number> => await throughput([a.url], owned.get(a.url)!, connections, seconds)
      const cluster = async (): Promise<number> => await throughput([a.url, b.url, c.url], everyId, connections, seconds)
      let one: number, three: number
      if (r % 2 === 0) { one = await solo(); three = await cluster() } else { three = await cluster(); one = await solo() }
      soloRps.push(one)
      spreadRps.push(three)
      ratios.push(three / one)
    }
    const ratio = spread(ratios)

    // Losing an instance: sessions on A, A killed, each asked through B.
    const sessions: string[] = []
    for (let i = 0; i < (QUICK ? 2 : 5); i++) sessions.push(await startSession(a.url))
    await sleep(300)
    const killedAt = performance.now()
    await stop(a, 'SIGKILL')
    const answeredMs: number[] = []
    for (const sid of sessions) {
      const res = await post(`${b.url}/api/heartbeat?session_id=${sid}`)
      if (res.status !== 200) throw new Error(`after the crash a heartbeat answered ${res.status}: ${JSON.stringify(res.json)}`)
      answeredMs.push(performance.now() - killedAt)
    }
    const first = answeredMs[0]
    const all = answeredMs.at(-1)!
    const forwardingMet = delta.median <= 1
    const takeoverMet = all <= TTL_MS + 1000

    return {
      name: 'cluster',
      title: 'Cluster (three instances sharing Redis)',
      baseline: 'the owner asked directly; one instance asked for its own sessions; INSTANCE_TTL',
      met: forwardingMet && takeoverMet,
      rows: [
        {
          benchmark: `Heartbeat p50 forwarded by another instance (${rounds} paired rounds of ${perRound})`,
          measured: `${fmt(median(forwardedP50), 3)} ms`,
          baseline: `owner asked directly ${fmt(median(directP50), 3)} ms`,
          figure: `adds ${fmt(delta.median, 3)} ms (IQR ${fmt(delta.q1, 3)}-${fmt(delta.q3, 3)}, 95% CI ${fmt(delta.ciLow, 3)}-${fmt(delta.ciHigh, 3)})`,
          target: '<= 1 ms',
          met: forwardingMet
        },
        {
          benchmark: `Heartbeat throughput over 3 instances, random instance and session (${connections} conn, ${tputRounds}x2x${seconds} s)`,
          measured: `${fmt(median(spreadRps), 0)} req/s`,
          baseline: `1 instance, own sessions ${fmt(median(soloRps), 0)} req/s`,
          figure: `ratio ${fmt(ratio.median, 3)} (IQR ${fmt(ratio.q1, 3)}-${fmt(ratio.q3, 3)}, 95% CI ${fmt(ratio.ciLow, 3)}-${fmt(ratio.ciHigh, 3)}); all on one machine`,
          target: '(reported)',
          met: null
        },
        {
          benchmark: `SIGKILL of the owner to its ${sessions.length} sessions answering elsewhere`,
          measured: `first ${fmt(first, 0)} ms, all ${fmt(all, 0)} ms`,
          baseline: `INSTANCE_TTL ${TTL_MS} ms`,
          figure: `${fmt(all - TTL_MS, 0)} ms past the TTL`,
          target: '<= INSTANCE_TTL + 1 s',
          met: takeoverMet
        }
      ],
      figures: {
        forwardingAddsP50Ms: delta.median,
        forwardingAddsCiHighMs: delta.ciHigh,
        directP50Ms: median(directP50),
        forwardedP50Ms: median(forwardedP50),
        throughputSoloRps: median(soloRps),
        throughputThreeRps: median(spreadRps),
        throughputRatio: ratio.median,
        takeoverFirstMs: first,
        takeoverAllMs: all
      },
      details: { deltaMs: delta, directP50, forwardedP50, soloRps, spreadRps, ratios: ratio, answeredMs, rounds, perRound, summary: summarize(deltas) }
    }
  } finally {
    for (const proc of procs.reverse()) await stop(proc)
    for (const dir of dirs) removeDir(dir)
  }
}
