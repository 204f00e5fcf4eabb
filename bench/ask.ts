// 2. Ask overhead: turns through POST /api/ask (real socket, keep-alive) with
// the simulator, against spawning the simulator directly with the same
// arguments, environment, cwd and stdin, in its own process group, and reading
// its stream-json output up to the `result` line (when the service answers).
// Turns alternate service / direct (order swapped every other turn), and each
// waits until the previous turn's processes are gone, so neither side pays for
// the other's teardown.

import { spawn } from 'node:child_process'
import { Agent, request } from 'node:http'
import { CURSOR_AGENT_ENV_NAMES, turnArgs } from '../lib/agents/cursor-print.js'
import type { ProcessReport } from '../lib/agents/types.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import { fmt, killLeftovers, signed, QUICK, removeDir, round, sandbox, stillRunning, summarize, type BenchResult, serviceApp } from './lib.js'

const TARGET_P50_ADDED_MS = 3

export async function run (): Promise<BenchResult> {
  const turns = QUICK ? 2 : 50
  const warmup = QUICK ? 0 : 5
  const box = sandbox('ask')
  const agentEnv = { FAKE_AGENT_STATE_DIR: box.dir }

  const app = await serviceApp({
    killGrace: '2s',
    // No turn here times out: a turn takes 0.1 s, or seconds on a loaded machine.
    askTimeout: '2m',
    agentEnv
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  const port = typeof address === 'object' && address !== null ? address.port : 0
  const agent = new Agent({ keepAlive: true, maxSockets: 1 })

  const post = (path: string, body?: object): Promise<{ status: number, json: any }> => new Promise((resolve, reject) => {
    const payload = body === undefined ? '' : JSON.stringify(body)
    const req = request({
      host: '127.0.0.1',
      port,
      path,
      method: 'POST',
      agent,
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      res.on('end', () => {
        try {
          resolve({ status: res.statusCode ?? 0, json: JSON.parse(text) })
        } catch (err) {
          reject(err)
        }
      })
    })
    req.on('error', reject)
    req.end(payload)
  })

  // The same argv and environment the service builds for a turn.
  const config = app.agentSessionsConfig
  const env = agentEnvironment(process.env, { pass: [...config.agentEnvPass, ...CURSOR_AGENT_ENV_NAMES], extra: agentEnv, user: config.agentUser })
  const argvOf = (chatId: string): string[] => turnArgs(chatId, {
    workspaceDir: config.workspaceDir,
    model: config.agentModel,
    force: config.agentForce,
    trust: config.agentTrust
  })

  /** Spawns the simulator; resolves the time to its result line, and when it has exited. */
  const direct = (args: string[], input: string): Promise<{ ms: number, cpuUs: number, exited: Promise<void>, result: string }> => new Promise((resolve, reject) => {
    const cpu = process.cpuUsage()
    const started = performance.now()
    const child = spawn(config.cursorAgentBin, args, { cwd: config.workspaceDir, env, detached: true, stdio: ['pipe', 'pipe', 'pipe'] })
    const exited = new Promise<void>((resolve) => child.once('close', () => resolve()))
    let pending = ''
    let done = false
    child.on('error', reject)
    child.stderr.resume()
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => {
      if (done) return
      pending += chunk
      let newline: number
      while ((newline = pending.indexOf('\n')) !== -1) {
        const line = pending.slice(0, newline)
        pending = pending.slice(newline + 1)
        if (line.includes('"type":"result"')) {
          done = true
          const ms = performance.now() - started
          resolve({ ms, cpuUs: cpuSince(cpu), exited, result: line })
          return
        }
      }
    })
    void exited.then(() => { if (!done) reject(new Error('the simulator exited without a result')) })
    child.stdin.end(input)
  })

  // The service's turn is over for our purpose once its processes are torn down.
  let lastTurnGone: Promise<ProcessReport> = Promise.resolve({ pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } })
  const nextProcessFinished = (): Promise<ProcessReport> => new Promise((resolve) => app.agentSessions.once('process-finished', resolve))

  try {
    const start = await post('/api/session/start')
    if (start.status !== 200) throw new Error(`session start failed: ${start.status} ${JSON.stringify(start.json)}`)
    const sessionId: string = start.json.session_id
    // The baseline resumes a chat of its own, created the same way, so both chats grow alike.
    const chatId = await createChatDirect(config.cursorAgentBin, config.workspaceDir, env)
    const args = argvOf(chatId)

    const serviceMs: number[] = []
    const directMs: number[] = []
    const serviceCpuUs: number[] = []
    const directCpuUs: number[] = []
    const serviceTurn = async (question: string): Promise<Turn> => {
      const gone = nextProcessFinished()
      const cpu = process.cpuUsage()
      const started = performance.now()
      const res = await post(`/api/ask?session_id=${encodeURIComponent(sessionId)}`, { question })
      const ms = performance.now() - started
      const cpuUs = cpuSince(cpu)
      if (res.status !== 200) throw new Error(`ask failed: ${res.status} ${JSON.stringify(res.json)}`)
      lastTurnGone = gone
      await lastTurnGone
      return { ms, cpuUs }
    }
    const directTurn = async (question: string): Promise<Turn> => {
      const r = await direct(args, question)
      await r.exited
      if (!r.result.includes('"subtype":"success"')) throw new Error(`direct turn failed: ${r.result}`)
      return r
    }

    for (let i = 0; i < warmup + turns; i++) {
      const question = `What does app.ts do? (turn ${i})`
      let s: Turn
      let d: Turn
      if (i % 2 === 0) {
        s = await serviceTurn(question)
        d = await directTurn(question)
      } else {
        d = await directTurn(question)
        s = await serviceTurn(question)
      }
      if (i >= warmup) {
        serviceMs.push(s.ms)
        directMs.push(d.ms)
        serviceCpuUs.push(s.cpuUs)
        directCpuUs.push(d.cpuUs)
      }
    }

    const service = summarize(serviceMs)
    const baseline = summarize(directMs)
    const addedP50 = service.p50 - baseline.p50
    const addedP99 = service.p99 - baseline.p99
    const met = addedP50 <= TARGET_P50_ADDED_MS
    // CPU time of this process (client, server and spawn for the service; spawn for the
    // baseline) per turn: what the service adds on the event loop, far less noisy than latency.
    const serviceCpu = summarize(serviceCpuUs)
    const directCpu = summarize(directCpuUs)
    return {
      name: 'ask',
      title: 'Ask overhead',
      baseline: 'the simulator spawned directly (same argv, env, cwd, stdin; own process group) up to its result line',
      met,
      rows: [{
        benchmark: `Ask overhead p50 (${turns} turns)`,
        measured: `${fmt(service.p50)} ms`,
        baseline: `direct spawn ${fmt(baseline.p50)} ms`,
        figure: `${signed(addedP50)} ms`,
        target: `<= ${TARGET_P50_ADDED_MS} ms`,
        met
      }, {
        benchmark: `Ask overhead p99 (${turns} turns)`,
        measured: `${fmt(service.p99)} ms`,
        baseline: `direct spawn ${fmt(baseline.p99)} ms`,
        figure: `${signed(addedP99)} ms`,
        target: '(reported)',
        met: null
      }, {
        benchmark: 'Ask: CPU time on the event loop per turn (p50)',
        measured: `${fmt(serviceCpu.p50 / 1000)} ms (HTTP client + server + spawn)`,
        baseline: `direct spawn ${fmt(directCpu.p50 / 1000)} ms`,
        figure: `${signed((serviceCpu.p50 - directCpu.p50) / 1000)} ms`,
        target: '(reported)',
        met: null
      }],
      figures: {
        turns,
        serviceP50Ms: round(service.p50, 3),
        serviceP99Ms: round(service.p99, 3),
        directP50Ms: round(baseline.p50, 3),
        directP99Ms: round(baseline.p99, 3),
        addedP50Ms: round(addedP50, 3),
        addedP99Ms: round(addedP99, 3),
        // The same figure from the turn pairs (each service turn against the direct turn next to it).
        pairedMedianAddedMs: round(summarize(serviceMs.map((v, i) => v - directMs[i])).p50, 3),
        serviceCpuP50Ms: round(serviceCpu.p50 / 1000, 3),
        directCpuP50Ms: round(directCpu.p50 / 1000, 3),
        addedCpuP50Ms: round((serviceCpu.p50 - directCpu.p50) / 1000, 3)
      },
      details: { serviceMs: serviceMs.map((v) => round(v, 3)), directMs: directMs.map((v) => round(v, 3)) }
    }
  } finally {
    await lastTurnGone
    await app.close()
    agent.destroy()
    const pids = box.pids().map((p) => p.pid)
    await waitGone(pids)
    killLeftovers(pids)
    removeDir(box.dir)
  }
}

interface Turn { ms: number, cpuUs: number }

function cpuSince (start: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(start)
  return used.user + used.system
}

async function createChatDirect (bin: string, cwd: string, env: Record<string, string | undefined>): Promise<string> {
  return await new Promise((resolve, reject) => {
    const child = spawn(bin, ['create-chat'], { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout.setEncoding('utf8')
    child.stdout.on('data', (chunk: string) => { out += chunk })
    child.on('error', reject)
    child.once('close', (code) => code === 0 ? resolve(out.trim()) : reject(new Error(`create-chat exited with ${String(code)}`)))
  })
}

async function waitGone (pids: number[]): Promise<void> {
  const deadline = Date.now() + 60_000
  while (stillRunning(pids).length > 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 25))
}
