// A minimal direct ACP client over stdio, on the official SDK: spawn the agent
// as the leader of its own process group, initialize, authenticate when asked,
// session/new (or session/load), prompt, collect the agent_message_chunk text.
// It is the baseline the benchmarks compare the service against (what an ask
// costs with nothing in between), and the smoke test of the real agents.
//
// Script: node --import tsx bench/acp-direct-client.ts [codex|gemini] [--turns N]
//   starts the mock model, drives the agent through N prompts and prints the
//   timings and the group's idle RSS as JSON.

import { spawn, type ChildProcess } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { Readable, Writable } from 'node:stream'
import * as acp from '@agentclientprotocol/sdk'

export interface DirectClientOptions {
  argv: readonly string[]
  /** The whole environment of the agent (nothing is inherited). */
  env: Record<string, string>
  cwd: string
  /** The `authenticate` method to use when the agent asks for it (or lists it). */
  authMethod?: string | null
  /** How to answer session/request_permission: pick an option of this kind. */
  permission?: 'reject' | 'allow'
}

export interface TurnResult {
  text: string
  stopReason: acp.StopReason
  /** Every session/update of the turn, in arrival order. */
  updates: acp.SessionUpdate[]
  /** From sending session/prompt to the first agent_message_chunk (null when none came). */
  firstChunkMs: number | null
  /** From sending session/prompt to its answer. */
  turnMs: number
}

export interface Timings {
  /** spawn -> initialize answered. */
  initializeMs: number
  /** spawn -> the first session/new (or session/load) answered: the agent can take a prompt. */
  readyMs: number | null
}

export interface GroupMember { pid: number, state: string, comm: string }

const FIRST_CHUNK_KINDS = new Set(['agent_message_chunk'])

export class DirectAcpClient {
  readonly child: ChildProcess
  readonly pid: number
  readonly connection: acp.ClientConnection
  readonly exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  initializeResponse: acp.InitializeResponse | null = null
  readonly timings: Timings = { initializeMs: NaN, readyMs: null }
  /** Everything the agent said on stderr (its log), capped. */
  stderr = ''
  /** Every session/update received, by session id (a load's replay included). */
  readonly updates = new Map<string, acp.SessionUpdate[]>()
  /** Requests the agent sent us, by method. */
  readonly agentRequests: Array<{ method: string, params: unknown }> = []

  private readonly spawnedAt: number
  private readonly options: DirectClientOptions
  private authenticated = false
  private readonly listeners = new Set<(sessionId: string, update: acp.SessionUpdate) => void>()

  private constructor (options: DirectClientOptions) {
    this.options = options
    const [bin, ...args] = options.argv
    if (bin === undefined) throw new Error('empty agent command')
    this.spawnedAt = performance.now()
    // Its own process group, so a signal to -pid reaches everything it starts.
    this.child = spawn(bin, args, { cwd: options.cwd, env: options.env, detached: true, stdio: ['pipe', 'pipe', 'pipe'] })
    if (this.child.pid === undefined) throw new Error(`could not spawn ${bin}`)
    this.pid = this.child.pid
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })))
    this.child.stdin!.on('error', () => {})
    this.child.stderr!.setEncoding('utf8').on('data', (d: string) => {
      this.stderr = (this.stderr + d).slice(-64 * 1024)
    })

    const app = acp.client({ name: 'acp-direct-client' })
      .onNotification('session/update', ({ params }) => {
        // Synchronous on purpose: the SDK starts handlers in arrival order, so the log stays in order.
        const list = this.updates.get(params.sessionId) ?? []
        list.push(params.update)
        this.updates.set(params.sessionId, list)
        for (const listener of this.listeners) listener(params.sessionId, params.update)
      })
      .onRequest('session/request_permission', ({ params }) => {
        this.agentRequests.push({ method: 'session/request_permission', params })
        const want = this.options.permission === 'allow' ? ['allow_once', 'allow_always'] : ['reject_once', 'reject_always']
        const option = params.options.find((o) => want.includes(o.kind))
        return option === undefined
          ? { outcome: { outcome: 'cancelled' } }
          : { outcome: { outcome: 'selected', optionId: option.optionId } }
      })
      .onRequest('*', ({ method, params }) => {
        // Anything else (cursor/*, fs/*, terminal/*: none declared) gets -32601, or the turn would strand.
        this.agentRequests.push({ method, params })
        throw acp.RequestError.methodNotFound(method)
      })
    const stream = acp.ndJsonStream(
      Writable.toWeb(this.child.stdin!) as WritableStream<Uint8Array>,
      Readable.toWeb(this.child.stdout!) as unknown as ReadableStream<Uint8Array>
    )
    this.connection = app.connect(stream)
    // A dead agent closes the connection; pending requests then reject.
    this.child.once('exit', () => this.connection.close(new Error('agent exited')))
  }

  /** Spawns the agent and runs initialize (and authenticate when a method is given and offered). */
  static async start (options: DirectClientOptions): Promise<DirectAcpClient> {
    const client = new DirectAcpClient(options)
    try {
      client.initializeResponse = await client.connection.agent.request('initialize', {
        protocolVersion: acp.PROTOCOL_VERSION,
        clientCapabilities: { fs: { readTextFile: false, writeTextFile: false }, terminal: false },
        clientInfo: { name: 'acp-direct-client', version: '1.0.0' }
      })
      client.timings.initializeMs = performance.now() - client.spawnedAt
      const offered = client.initializeResponse.authMethods ?? []
      if (options.authMethod != null && offered.some((m) => m.id === options.authMethod)) await client.authenticate()
    } catch (err) {
      await client.kill()
      throw err
    }
    return client
  }

  private async authenticate (): Promise<void> {
    if (this.options.authMethod == null) throw new Error('the agent requires authentication and no auth method was given')
    await this.connection.agent.request('authenticate', { methodId: this.options.authMethod })
    this.authenticated = true
  }

  /** Runs fn; when the agent answers auth_required and we have not authenticated yet, authenticates and runs it again. */
  private async withAuth<T> (fn: () => Promise<T>): Promise<T> {
    try {
      return await fn()
    } catch (err) {
      if ((err as { code?: number }).code !== -32000 || this.authenticated || this.options.authMethod == null) throw err
      await this.authenticate()
      return await fn()
    }
  }

  private markReady (): void {
    this.timings.readyMs ??= performance.now() - this.spawnedAt
  }

  async newSession (cwd = this.options.cwd): Promise<string> {
    const res = await this.withAuth(async () => await this.connection.agent.request('session/new', { cwd, mcpServers: [] }))
    this.markReady()
    return res.sessionId
  }

  /**
   * session/load: returns the updates the agent replayed before it answered.
   * Not necessarily all of them: gemini-cli 0.61.0 answers after the first one
   * and streams the rest afterwards (waitForUpdates waits for what you expect).
   */
  async loadSession (sessionId: string, cwd = this.options.cwd): Promise<acp.SessionUpdate[]> {
    const replay: acp.SessionUpdate[] = []
    const listener = (id: string, update: acp.SessionUpdate): void => { if (id === sessionId) replay.push(update) }
    this.listeners.add(listener)
    try {
      await this.withAuth(async () => await this.connection.agent.request('session/load', { sessionId, cwd, mcpServers: [] }))
    } finally {
      this.listeners.delete(listener)
    }
    this.markReady()
    return replay
  }

  /** Every update of the session this process sent so far, once `until` holds for them (rejects after timeoutMs). */
  async waitForUpdates (sessionId: string, until: (updates: acp.SessionUpdate[]) => boolean, timeoutMs: number): Promise<acp.SessionUpdate[]> {
    const current = (): acp.SessionUpdate[] => this.updates.get(sessionId) ?? []
    if (until(current())) return current()
    return await new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.listeners.delete(listener)
        reject(new Error(`timed out after ${timeoutMs} ms waiting for updates of session ${sessionId}`))
      }, timeoutMs)
      const listener = (id: string): void => {
        if (id !== sessionId || !until(current())) return
        clearTimeout(timer)
        this.listeners.delete(listener)
        resolve(current())
      }
      this.listeners.add(listener)
    })
  }

  async prompt (sessionId: string, text: string): Promise<TurnResult> {
    const updates: acp.SessionUpdate[] = []
    let firstChunkMs: number | null = null
    const sent = performance.now()
    const listener = (id: string, update: acp.SessionUpdate): void => {
      if (id !== sessionId) return
      updates.push(update)
      if (firstChunkMs === null && FIRST_CHUNK_KINDS.has(update.sessionUpdate)) firstChunkMs = performance.now() - sent
    }
    this.listeners.add(listener)
    try {
      const res = await this.connection.agent.request('session/prompt', { sessionId, prompt: [{ type: 'text', text }] })
      return { text: textOf(updates), stopReason: res.stopReason, updates, firstChunkMs, turnMs: performance.now() - sent }
    } finally {
      this.listeners.delete(listener)
    }
  }

  async cancel (sessionId: string): Promise<void> {
    await this.connection.agent.notify('session/cancel', { sessionId })
  }

  /** Every live process of the agent's group. */
  group (): GroupMember[] {
    return groupMembers(this.pid)
  }

  /** VmRSS summed over the group, in kB. */
  rssKb (): number {
    return groupRssKb(this.pid)
  }

  /** SIGTERM to the group; SIGKILL after graceMs if anything is left. Resolves when the group is empty. */
  async stop (graceMs = 5000): Promise<'exited' | 'signalled' | 'killed'> {
    if (groupMembers(this.pid).length === 0) return this.finish('exited')
    signalGroup(this.pid, 'SIGTERM')
    if (await waitForEmptyGroup(this.pid, graceMs)) return this.finish('signalled')
    signalGroup(this.pid, 'SIGKILL')
    await waitForEmptyGroup(this.pid, 5000)
    return this.finish('killed')
  }

  /** SIGKILL to the group at once (cleanup on failure). */
  async kill (): Promise<void> {
    signalGroup(this.pid, 'SIGKILL')
    await waitForEmptyGroup(this.pid, 5000)
    this.finish('killed')
  }

  private finish<T> (stage: T): T {
    this.connection.close()
    this.child.stdout?.destroy()
    this.child.stderr?.destroy()
    this.child.stdin?.destroy()
    return stage
  }
}

/** The text of the agent_message_chunk updates, in order. */
export function textOf (updates: readonly acp.SessionUpdate[], kind: 'agent_message_chunk' | 'user_message_chunk' | 'agent_thought_chunk' = 'agent_message_chunk'): string {
  let text = ''
  for (const u of updates) {
    if (u.sessionUpdate === kind && u.content.type === 'text') text += u.content.text
  }
  return text
}

// ---------------------------------------------------------------------------
// Process groups, read from /proc (no zombies: they hold no memory and cannot be signalled away).

interface ProcStat { pid: number, comm: string, state: string, pgid: number }

function readStat (pid: number): ProcStat | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const close = stat.lastIndexOf(')')
    const rest = stat.slice(close + 2).split(' ')
    return { pid, comm: stat.slice(stat.indexOf('(') + 1, close), state: rest[0], pgid: Number(rest[2]) }
  } catch {
    return null
  }
}

/** Live (non-zombie) processes whose process group is pgid. */
export function groupMembers (pgid: number): GroupMember[] {
  const out: GroupMember[] = []
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue
    const s = readStat(Number(name))
    if (s !== null && s.pgid === pgid && s.state !== 'Z' && s.state !== 'X') out.push({ pid: s.pid, state: s.state, comm: s.comm })
  }
  return out
}

export function rssKbOf (pid: number): number {
  try {
    const line = readFileSync(`/proc/${pid}/status`, 'utf8').split('\n').find((l) => l.startsWith('VmRSS:'))
    return line === undefined ? 0 : Number(line.split(/\s+/)[1])
  } catch {
    return 0
  }
}

export function groupRssKb (pgid: number): number {
  return groupMembers(pgid).reduce((sum, m) => sum + rssKbOf(m.pid), 0)
}

function signalGroup (pgid: number, signal: NodeJS.Signals): void {
  try { process.kill(-pgid, signal) } catch {}
}

async function waitForEmptyGroup (pgid: number, timeoutMs: number): Promise<boolean> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    if (groupMembers(pgid).length === 0) return true
    if (performance.now() >= deadline) return false
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

// ---------------------------------------------------------------------------
// Script mode: one agent, the mock, N turns; figures as JSON.

async function main (): Promise<void> {
  const { mkdtempSync, rmSync } = await import('node:fs')
  const { tmpdir } = await import('node:os')
  const { join } = await import('node:path')
  const { startMockModel } = await import('../test/fixtures/mock-model-server.mjs')
  const { agentEnv, realAgents, realAgentsInstalled } = await import('../test/helpers/real-agents.js')
  const which = (process.argv[2] ?? 'codex') as 'codex' | 'gemini'
  const turnsArg = process.argv.indexOf('--turns')
  const turns = turnsArg === -1 ? 3 : Number(process.argv[turnsArg + 1])
  if (!realAgentsInstalled()) throw new Error('real agents not installed: run test/agents/install.sh')
  const mock = await startMockModel()
  const dir = mkdtempSync(join(tmpdir(), 'acp-direct-'))
  const agent = realAgents(mock.url, dir)[which]
  const client = await DirectAcpClient.start({ argv: agent.argv, env: agentEnv(agent), cwd: dir, authMethod: agent.authMethod })
  try {
    const sessionId = await client.newSession()
    const results = []
    for (let i = 1; i <= turns; i++) {
      const r = await client.prompt(sessionId, `question ${i}`)
      results.push({ turn: i, stopReason: r.stopReason, firstChunkMs: round(r.firstChunkMs), turnMs: round(r.turnMs), text: r.text })
    }
    const agentInfo = client.initializeResponse?.agentInfo
    console.log(JSON.stringify({
      agent: which,
      agentInfo,
      initializeMs: round(client.timings.initializeMs),
      readyMs: round(client.timings.readyMs),
      idleGroupRssKb: client.rssKb(),
      groupSize: client.group().length,
      turns: results,
      modelRequests: mock.modelRequests().length
    }, null, 2))
  } finally {
    await client.stop()
    await mock.close()
    rmSync(dir, { recursive: true, force: true })
  }
}

function round (ms: number | null): number | null {
  return ms === null ? null : Math.round(ms * 10) / 10
}

if (import.meta.url === `file://${process.argv[1]}`) {
  main().catch((err) => {
    console.error(err)
    process.exitCode = 1
  })
}
