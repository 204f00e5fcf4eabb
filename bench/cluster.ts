// npm run bench:cluster: what clustering costs, against a baseline from the
// same run. Needs redis-server (Debian's package) and dist/ (built if missing).
//
// 1. Forwarding: heartbeat latency of a session asked through an instance
//    that forwards it to its owner, against the owner asked directly (one
//    client, sequential keep-alive requests, rounds alternating). Target: the
//    forwarding adds <= 1 ms at p50.
// 2. Losing an instance: from the SIGKILL of the owner to each of its
//    sessions answering through another instance, against INSTANCE_TTL.
//
// Not measured (yet): throughput over three instances against one, which on
// a 2-core machine measures the load generator more than the service.

import { spawn, type ChildProcess } from 'node:child_process'
import { execFileSync } from 'node:child_process'
import { mkdtempSync } from 'node:fs'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { cleanEnv } from '../test/helpers/server-process.js'
import { QUICK, ROOT, SIMULATOR, fmt, median, removeDir, sleep, spread, summarize, tempRoot } from './lib.js'

const TTL_MS = 2000

interface Proc { child: ChildProcess, exited: Promise<void> }

async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

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
    START_RATE_LIMIT: '1000',
    CURSOR_AGENT_BIN: SIMULATOR,
    FAKE_AGENT_STATE_DIR: agentState,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  }))
  const url = `http://127.0.0.1:${port}`
  await until(async () => (await fetch(`${url}/api/health/ready`)).status === 200, 'an instance to be ready')
  return { ...proc, url }
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

async function main (): Promise<void> {
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
    const a = await instance(redisUrl, agentState, dirs)
    const b = await instance(redisUrl, agentState, dirs)
    procs.push(a, b)
    const id = (await post(`${a.url}/api/session/start`)).json.session_id as string
    const direct = `${a.url}/api/heartbeat?session_id=${id}`
    const forwarded = `${b.url}/api/heartbeat?session_id=${id}`
    await latencies(direct, 200)
    await latencies(forwarded, 200)

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

    // Losing an instance: sessions on A, A killed, each asked through B.
    const sessions: string[] = []
    for (let i = 0; i < (QUICK ? 2 : 5); i++) sessions.push((await post(`${a.url}/api/session/start`)).json.session_id as string)
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

    const rows = [
      ['heartbeat p50, owner asked directly (ms)', fmt(median(directP50), 3)],
      ['heartbeat p50, forwarded by another instance (ms)', fmt(median(forwardedP50), 3)],
      ['forwarding adds at p50 (ms; median of paired rounds, 95% CI)', `${fmt(delta.median, 3)} (${fmt(delta.ciLow, 3)} to ${fmt(delta.ciHigh, 3)})`],
      ['target: <= 1 ms', delta.ciHigh <= 1 ? 'met' : delta.median <= 1 ? 'median within; the 95% interval reaches past 1 ms' : 'missed'],
      [`SIGKILL to first session answering elsewhere (ms; INSTANCE_TTL ${TTL_MS} ms)`, fmt(first, 0)],
      [`SIGKILL to all ${sessions.length} sessions answering elsewhere (ms)`, fmt(all, 0)],
      ['target: within INSTANCE_TTL + 1 s', all <= TTL_MS + 1000 ? 'met' : 'missed']
    ]
    for (const [label, value] of rows) console.log(`${label.padEnd(72)} ${value}`)
    console.log(JSON.stringify({ deltaMs: delta, directP50, forwardedP50, answeredMs, rounds, perRound, summary: summarize(deltas) }))
  } finally {
    for (const proc of procs.reverse()) await stop(proc)
    for (const dir of dirs) removeDir(dir)
  }
}

await main()
