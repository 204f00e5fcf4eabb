// ACP agents behind the service, against the minimal direct stdio client
// (bench/acp-direct-client.ts) driving the same agent, with the same argv,
// environment and workspace, in the same run. Per agent:
//   1. ask latency added by the service (POST /api/ask on a real keep-alive
//      socket vs session/prompt sent directly): p50 (target <= 2 ms), p99;
//   2. a warm ask on the live agent vs the same agent spawned per turn
//      (spawn + initialize (+ authenticate) + session/load or session/new +
//      prompt): what the live model buys;
//   3. the idle RSS of one live session (its whole process group, from /proc)
//      against the same agent started by the direct client, and what ending
//      the session frees;
//   4. time to first chunk through the service's SSE (POST /api/ask with
//      Accept: text/event-stream) vs the first agent_message_chunk read
//      directly: <= 2 ms added at p50.
// The ACP simulator (test/fixtures/fake-acp-agent.mjs: fast, deterministic)
// gives the headline figures; codex-acp and gemini-cli against the mock model
// (test/fixtures/mock-model-server.mjs) run too when test/agents is installed,
// except in --quick. Turns alternate service / direct (order swapped every
// other turn) so that drift on a shared machine hits both sides alike.

import { Agent, request } from 'node:http'
import { mkdirSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { DirectAcpClient, groupMembers, groupRssKb } from './acp-direct-client.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import { isProcessAlive } from '../lib/processes/terminate.js'
import { startMockModel, type MockModel } from '../test/fixtures/mock-model-server.mjs'
import { realAgents, realAgentsInstalled } from '../test/helpers/real-agents.js'
import { fmt, QUICK, removeDir, round, sandbox, serviceApp, signed, sleep, summarize, type BenchResult, type Summary, type TableRow } from './lib.js'

const TARGET_ADDED_P50_MS = 2
const ACP_SIMULATOR = fileURLToPath(new URL('../test/fixtures/fake-acp-agent.mjs', import.meta.url))

interface Subject {
  name: 'simulator' | 'codex' | 'gemini'
  argv: string[]
  /** The agent's own variables on top of the service's environment (agentEnv). */
  env: Record<string, string>
  authMethod: string | null
  workspace: string
  /**
   * Whether a turn spawned on its own continues the conversation with
   * session/load. gemini-cli 0.61.0 loses a session loaded in the UTC minute
   * it was created (test/helpers/real-agents.ts): it starts a new one instead.
   */
  coldLoads: boolean
  warmup: number
  turns: number
  sseTurns: number
  coldTurns: number
  /** How long the agent sits idle before its RSS is read. */
  settleMs: number
}

interface SubjectFigures {
  subject: Subject
  start: { serviceMs: number, directMs: number }
  ask: { service: Summary, direct: Summary, pairedAddedP50: number, serviceCpuP50Ms: number, directCpuP50Ms: number }
  sse: { service: Summary, direct: Summary, pairedAddedP50: number }
  live: { warm: Summary, cold: Summary, coldHow: 'session/load' | 'session/new' }
  rss: { serviceKb: number, directKb: number, processes: number, freedKb: number, endToGoneMs: number }
  raw: Record<string, number[]>
}

export async function run (): Promise<BenchResult> {
  const box = sandbox('acp')
  const mocks: MockModel[] = []
  const figures: SubjectFigures[] = []
  try {
    const simulatorWorkspace = join(box.dir, 'workspace')
    mkdirSync(simulatorWorkspace)
    const subjects: Subject[] = [{
      name: 'simulator',
      argv: [process.execPath, ACP_SIMULATOR],
      env: { FAKE_AGENT_STATE_DIR: box.dir },
      authMethod: null,
      workspace: simulatorWorkspace,
      coldLoads: true,
      warmup: QUICK ? 1 : 20,
      turns: QUICK ? 5 : 300,
      sseTurns: QUICK ? 5 : 300,
      coldTurns: QUICK ? 2 : 20,
      settleMs: QUICK ? 100 : 2000
    }]
    if (!QUICK && realAgentsInstalled()) {
      const mock = await startMockModel()
      mocks.push(mock)
      const agents = realAgents(mock.url, join(box.dir, 'agents'))
      for (const agent of [agents.codex, agents.gemini]) {
        const workspace = join(box.dir, `workspace-${agent.name}`)
        mkdirSync(workspace)
        subjects.push({
          name: agent.name,
          argv: agent.argv,
          env: agent.env,
          authMethod: agent.authMethod,
          workspace,
          coldLoads: agent.name !== 'gemini',
          warmup: 3,
          turns: 30,
          sseTurns: 30,
          coldTurns: agent.name === 'gemini' ? 3 : 10,
          settleMs: 5000
        })
      }
    }
    for (const subject of subjects) figures.push(await measure(subject))
  } finally {
    for (const mock of mocks) await mock.close()
    const left = box.pids().map((p) => p.pid).filter(isProcessAlive)
    removeDir(box.dir)
    if (left.length > 0) throw new Error(`ACP simulator processes left running: ${left.join(', ')}`)
  }
  return report(figures)
}

async function measure (subject: Subject): Promise<SubjectFigures> {
  const app = await serviceApp({
    agentProtocol: 'acp',
    agentCommand: subject.argv,
    ...(subject.authMethod === null ? {} : { agentAuthMethod: subject.authMethod }),
    agentEnv: subject.env,
    workspaceDir: subject.workspace,
    // gemini takes 10-35 s to start on a busy machine.
    startTimeout: '300s',
    askTimeout: '120s',
    killGrace: '5s'
  })
  const groups = new Set<number>()
  const clients: DirectAcpClient[] = []
  const http = new Agent({ keepAlive: true, maxSockets: 1 })
  try {
    await app.listen({ host: '127.0.0.1', port: 0 })
    const port = (app.server.address() as { port: number }).port
    // The environment the service gives the agent, for the direct client too.
    const env = agentEnvironment(process.env, { extra: subject.env })
    const startDirect = async (): Promise<DirectAcpClient> => {
      const client = await DirectAcpClient.start({ argv: subject.argv, env, cwd: subject.workspace, authMethod: subject.authMethod })
      clients.push(client)
      groups.add(client.pid)
      return client
    }

    // Start: both to the point where the agent can take a prompt.
    let t0 = performance.now()
    const started = await post(port, http, '/api/session/start')
    const serviceStartMs = performance.now() - t0
    if (started.status !== 200) throw new Error(`${subject.name}: session start failed: ${started.status} ${started.text}`)
    const sessionId = (JSON.parse(started.text) as { session_id: string }).session_id
    const [pgid] = app.agentSessions.driver.livePids()
    groups.add(pgid)
    t0 = performance.now()
    const direct = await startDirect()
    const directSession = await direct.newSession()
    const directStartMs = performance.now() - t0

    const serviceAsk = async (question: string): Promise<{ ms: number, cpuUs: number }> => {
      const cpu = process.cpuUsage()
      const t = performance.now()
      const res = await post(port, http, `/api/ask?session_id=${sessionId}`, { question })
      const ms = performance.now() - t
      if (res.status !== 200) throw new Error(`${subject.name}: ask failed: ${res.status} ${res.text}`)
      return { ms, cpuUs: cpuSince(cpu) }
    }
    const directAsk = async (question: string): Promise<{ ms: number, cpuUs: number, firstChunkMs: number }> => {
      const cpu = process.cpuUsage()
      const t = performance.now()
      const r = await direct.prompt(directSession, question)
      const ms = performance.now() - t
      if (r.stopReason !== 'end_turn' || r.firstChunkMs === null) throw new Error(`${subject.name}: direct prompt: ${r.stopReason}, ${r.text}`)
      return { ms, cpuUs: cpuSince(cpu), firstChunkMs: r.firstChunkMs }
    }
    const serviceSse = async (question: string): Promise<number> => {
      const r = await sseAsk(port, http, sessionId, question)
      if (r.firstChunkMs === null || !r.answered) throw new Error(`${subject.name}: SSE ask without chunk or answer: ${r.text.slice(-300)}`)
      return r.firstChunkMs
    }

    // 1. Ask latency, alternating.
    const raw: Record<string, number[]> = { serviceAskMs: [], directAskMs: [], serviceCpuUs: [], directCpuUs: [], serviceFirstChunkMs: [], directFirstChunkMs: [], coldMs: [] }
    for (let i = 0; i < subject.warmup + subject.turns; i++) {
      const question = `What does app.ts do? (turn ${i})`
      const pair = i % 2 === 0
        ? { s: await serviceAsk(question), d: await directAsk(question) }
        : { d: await directAsk(question), s: await serviceAsk(question) }
      if (i < subject.warmup) continue
      raw.serviceAskMs.push(pair.s.ms)
      raw.directAskMs.push(pair.d.ms)
      raw.serviceCpuUs.push(pair.s.cpuUs)
      raw.directCpuUs.push(pair.d.cpuUs)
    }

    // 4. Time to first chunk, alternating.
    for (let i = 0; i < subject.warmup + subject.sseTurns; i++) {
      const question = `Stream the answer (turn ${i})`
      let s: number
      let d: number
      if (i % 2 === 0) {
        s = await serviceSse(question)
        d = (await directAsk(question)).firstChunkMs
      } else {
        d = (await directAsk(question)).firstChunkMs
        s = await serviceSse(question)
      }
      if (i < subject.warmup) continue
      raw.serviceFirstChunkMs.push(s)
      raw.directFirstChunkMs.push(d)
    }

    // 3. Idle RSS of the live session's group, against the same agent started directly.
    await sleep(subject.settleMs)
    const serviceKb = groupRssKb(pgid)
    const directKb = direct.rssKb()
    const processes = groupMembers(pgid).length
    t0 = performance.now()
    const ended = await post(port, http, `/api/session/end?session_id=${sessionId}`)
    if (ended.status !== 200) throw new Error(`${subject.name}: end failed: ${ended.status} ${ended.text}`)
    while (groupMembers(pgid).length > 0) {
      if (performance.now() - t0 > 60_000) throw new Error(`${subject.name}: the ended session's agent group is still there after 60 s`)
      await sleep(5)
    }
    const endToGoneMs = performance.now() - t0
    const freedKb = serviceKb - groupRssKb(pgid)
    await direct.stop()

    // 2. The same agent spawned per turn: spawn, initialize, session/load (or new), prompt; its teardown is not counted.
    let coldSession: string | null = null
    for (let i = 0; i < subject.coldTurns; i++) {
      const t = performance.now()
      const client = await startDirect()
      if (coldSession === null || !subject.coldLoads) coldSession = await client.newSession()
      else await client.loadSession(coldSession)
      const r = await client.prompt(coldSession, `A turn of its own (${i})`)
      raw.coldMs.push(performance.now() - t)
      if (r.stopReason !== 'end_turn') throw new Error(`${subject.name}: cold turn: ${r.stopReason}`)
      await client.stop()
    }

    const serviceAsk_ = summarize(raw.serviceAskMs)
    const directAsk_ = summarize(raw.directAskMs)
    return {
      subject,
      start: { serviceMs: serviceStartMs, directMs: directStartMs },
      ask: {
        service: serviceAsk_,
        direct: directAsk_,
        pairedAddedP50: summarize(raw.serviceAskMs.map((v, i) => v - raw.directAskMs[i])).p50,
        serviceCpuP50Ms: summarize(raw.serviceCpuUs).p50 / 1000,
        directCpuP50Ms: summarize(raw.directCpuUs).p50 / 1000
      },
      sse: {
        service: summarize(raw.serviceFirstChunkMs),
        direct: summarize(raw.directFirstChunkMs),
        pairedAddedP50: summarize(raw.serviceFirstChunkMs.map((v, i) => v - raw.directFirstChunkMs[i])).p50
      },
      live: { warm: serviceAsk_, cold: summarize(raw.coldMs), coldHow: subject.coldLoads ? 'session/load' : 'session/new' },
      rss: { serviceKb, directKb, processes, freedKb, endToGoneMs },
      raw
    }
  } finally {
    await app.close()
    for (const client of clients) await client.stop().catch(() => {})
    http.destroy()
    const left = [...groups].filter((g) => groupMembers(g).length > 0)
    for (const g of left) {
      try { process.kill(-g, 'SIGKILL') } catch {}
    }
    if (left.length > 0) throw new Error(`${subject.name}: agent process groups left running: ${left.join(', ')}`)
  }
}

function report (all: SubjectFigures[]): BenchResult {
  const rows: TableRow[] = []
  const figures: Record<string, number> = {}
  const details: Record<string, unknown> = {}
  let met = true
  for (const f of all) {
    const name = f.subject.name
    const headline = name === 'simulator'
    const askAdded = f.ask.service.p50 - f.ask.direct.p50
    const sseAdded = f.sse.service.p50 - f.sse.direct.p50
    const askMet = headline ? askAdded <= TARGET_ADDED_P50_MS : null
    const sseMet = headline ? sseAdded <= TARGET_ADDED_P50_MS : null
    if (askMet === false || sseMet === false) met = false
    const target = headline ? `<= ${TARGET_ADDED_P50_MS} ms` : '(reported)'
    const mb = (kb: number): string => `${fmt(kb / 1024, 1)} MB`
    rows.push({
      benchmark: `ACP ask overhead p50 (${name}, ${f.subject.turns} turns)`,
      measured: `${fmt(f.ask.service.p50)} ms`,
      baseline: `direct ACP client ${fmt(f.ask.direct.p50)} ms`,
      figure: `${signed(askAdded)} ms (paired ${signed(f.ask.pairedAddedP50)})`,
      target,
      met: askMet
    }, {
      benchmark: `ACP ask overhead p99 (${name}, ${f.subject.turns} turns)`,
      measured: `${fmt(f.ask.service.p99)} ms`,
      baseline: `direct ACP client ${fmt(f.ask.direct.p99)} ms`,
      figure: `${signed(f.ask.service.p99 - f.ask.direct.p99)} ms`,
      target: '(reported)',
      met: null
    }, {
      benchmark: `ACP time to first chunk over SSE p50 (${name}, ${f.subject.sseTurns} turns)`,
      measured: `${fmt(f.sse.service.p50)} ms (p99 ${fmt(f.sse.service.p99)})`,
      baseline: `direct ACP client ${fmt(f.sse.direct.p50)} ms (p99 ${fmt(f.sse.direct.p99)})`,
      figure: `${signed(sseAdded)} ms (paired ${signed(f.sse.pairedAddedP50)})`,
      target,
      met: sseMet
    }, {
      benchmark: `ACP warm ask vs agent spawned per turn (${name}, p50)`,
      measured: `${fmt(f.live.warm.p50)} ms (live agent, via the service)`,
      baseline: `spawn + initialize + ${f.live.coldHow} + prompt ${fmt(f.live.cold.p50)} ms (${f.subject.coldTurns} turns)`,
      figure: `${fmt(f.live.cold.p50 / f.live.warm.p50, 1)}x faster live`,
      target: '(reported)',
      met: null
    }, {
      benchmark: `ACP idle live session RSS (${name})`,
      measured: `${mb(f.rss.serviceKb)} (${f.rss.processes} process${f.rss.processes === 1 ? '' : 'es'})`,
      baseline: `same agent started directly ${mb(f.rss.directKb)}`,
      figure: `ratio ${fmt(f.rss.serviceKb / f.rss.directKb, 2)}; end frees ${mb(f.rss.freedKb)} in ${fmt(f.rss.endToGoneMs, 0)} ms`,
      target: '(reported)',
      met: null
    })
    const p = name
    Object.assign(figures, {
      [`${p}AskServiceP50Ms`]: round(f.ask.service.p50, 3),
      [`${p}AskServiceP99Ms`]: round(f.ask.service.p99, 3),
      [`${p}AskDirectP50Ms`]: round(f.ask.direct.p50, 3),
      [`${p}AskDirectP99Ms`]: round(f.ask.direct.p99, 3),
      [`${p}AskAddedP50Ms`]: round(askAdded, 3),
      [`${p}AskAddedP99Ms`]: round(f.ask.service.p99 - f.ask.direct.p99, 3),
      [`${p}AskPairedAddedP50Ms`]: round(f.ask.pairedAddedP50, 3),
      [`${p}AskServiceCpuP50Ms`]: round(f.ask.serviceCpuP50Ms, 3),
      [`${p}AskDirectCpuP50Ms`]: round(f.ask.directCpuP50Ms, 3),
      [`${p}FirstChunkServiceP50Ms`]: round(f.sse.service.p50, 3),
      [`${p}FirstChunkServiceP99Ms`]: round(f.sse.service.p99, 3),
      [`${p}FirstChunkDirectP50Ms`]: round(f.sse.direct.p50, 3),
      [`${p}FirstChunkDirectP99Ms`]: round(f.sse.direct.p99, 3),
      [`${p}FirstChunkAddedP50Ms`]: round(sseAdded, 3),
      [`${p}FirstChunkPairedAddedP50Ms`]: round(f.sse.pairedAddedP50, 3),
      [`${p}WarmAskP50Ms`]: round(f.live.warm.p50, 3),
      [`${p}SpawnPerTurnP50Ms`]: round(f.live.cold.p50, 3),
      [`${p}LiveSpeedup`]: round(f.live.cold.p50 / f.live.warm.p50, 2),
      [`${p}IdleGroupRssKb`]: f.rss.serviceKb,
      [`${p}IdleGroupRssDirectKb`]: f.rss.directKb,
      [`${p}IdleGroupProcesses`]: f.rss.processes,
      [`${p}EndFreesKb`]: f.rss.freedKb,
      [`${p}EndToGroupGoneMs`]: round(f.rss.endToGoneMs, 1),
      [`${p}StartServiceMs`]: round(f.start.serviceMs, 1),
      [`${p}StartDirectMs`]: round(f.start.directMs, 1)
    })
    details[name] = {
      coldHow: f.live.coldHow,
      ...Object.fromEntries(Object.entries(f.raw).map(([k, v]) => [k, v.map((x) => round(x, 3))]))
    }
  }
  return {
    name: 'acp',
    title: 'ACP agents: service vs direct stdio client',
    baseline: 'bench/acp-direct-client.ts driving the same agent (argv, environment, workspace) in the same run',
    met,
    rows,
    figures,
    details
  }
}

// ---------------------------------------------------------------------------

function cpuSince (start: NodeJS.CpuUsage): number {
  const used = process.cpuUsage(start)
  return used.user + used.system
}

function post (port: number, agent: Agent, path: string, body?: object): Promise<{ status: number, text: string }> {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? '' : JSON.stringify(body)
    const req = request({
      host: '127.0.0.1',
      port,
      path,
      method: 'POST',
      agent,
      headers: body === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => { text += chunk })
      res.on('end', () => { resolve({ status: res.statusCode ?? 0, text }) })
    })
    req.on('error', reject)
    req.end(payload)
  })
}

/** An ask as Server-Sent Events: the time to the first `chunk` event, and whether an `answer` ended it. */
function sseAsk (port: number, agent: Agent, sessionId: string, question: string): Promise<{ firstChunkMs: number | null, answered: boolean, text: string }> {
  return new Promise((resolve, reject) => {
    const payload = JSON.stringify({ question })
    const sent = performance.now()
    let firstChunkMs: number | null = null
    const req = request({
      host: '127.0.0.1',
      port,
      path: `/api/ask?session_id=${sessionId}`,
      method: 'POST',
      agent,
      headers: { accept: 'text/event-stream', 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) }
    }, (res) => {
      let text = ''
      res.setEncoding('utf8')
      res.on('data', (chunk: string) => {
        text += chunk
        if (firstChunkMs === null && /^event: chunk$/m.test(text)) firstChunkMs = performance.now() - sent
      })
      res.on('end', () => { resolve({ firstChunkMs, answered: /^event: answer$/m.test(text), text }) })
    })
    req.on('error', reject)
    req.end(payload)
  })
}
