// One live agent process per session, over the Agent Client Protocol (ACP):
// JSON-RPC on the agent's stdin/stdout, through the official SDK.
//
// The agent is spawned as the leader of its own process group and every exit
// path (close, suspend, a failed start, a cancel the agent ignores, a turn
// that never ends, the agent dying) goes through one teardown: the group
// ladder. ACP has no timeouts of its own: every request here has a deadline.

import { Writable } from 'node:stream'
import { client, ndJsonStream, RequestError, type ClientConnection, type SessionNotification, type RequestPermissionRequest, type RequestPermissionResponse, type InitializeResponse, type NewSessionResponse, type StopReason as AcpStopReason } from '@agentclientprotocol/sdk'
import { AgentSessionError } from '../errors.js'
import type { Logger } from '../logger.js'
import { packageInfo } from '../package-info.js'
import type { AgentUser } from '../processes/agent-user.js'
import type { GroupRecorder } from '../processes/records.js'
import { releaseGroup, spawnGroup, type GroupProcess } from '../processes/spawn.js'
import { terminateProcessGroup, type TeardownReport } from '../processes/terminate.js'
import { jsonLines } from './json-lines.js'
import type {
  AgentConversation, AgentDriver, AgentExit, AgentInfo, ConversationRef, OpenOptions, PermissionDecision, PermissionRequest,
  ProcessReport, PromptOptions, StopReason, ToolCallStatus, TurnEvent, TurnResult
} from './types.js'

export interface AcpDriverOptions {
  /** The agent's argv (AGENT_COMMAND, already split). */
  command: readonly string[]
  workspaceDir: string
  /** Environment of every agent process, exactly. */
  env: Record<string, string | undefined>
  /** The OS user agents run as (AGENT_USER), or undefined for the service's own. */
  user: Pick<AgentUser, 'uid' | 'gid'> | undefined
  killSignal: NodeJS.Signals
  killGraceMs: number
  /** ACP authenticate method id, used when the agent lists it or asks for authentication. */
  authMethod?: string
  /** Largest JSON-RPC line and largest answer a turn may produce. */
  maxMessageBytes: number
  log: Logger
  /** Where agent process groups are recorded while they live. */
  recorder?: GroupRecorder
}

const STDERR_TAIL_BYTES = 16 * 1024
// Re-probe an agent that could not start at most this often (health is polled).
const PROBE_RETRY_MS = 30_000
const PROBE_TIMEOUT_MS = 30_000
// session/close is a courtesy before the ladder: it gets part of KILL_GRACE, never all of it.
const CLOSE_REQUEST_MAX_MS = 2000
// JSON-RPC error code ACP uses for "authentication required".
const AUTH_REQUIRED = -32000
// After session/load answers, replayed history may still trickle in: the
// first prompt waits until none came for REPLAY_QUIET_MS (at most REPLAY_MAX_WAIT_MS).
const REPLAY_QUIET_MS = 250
const REPLAY_MAX_WAIT_MS = 5000
// How long a closed connection waits to learn whether the process exited with
// it (then one more loop turn, so an exit already signalled is seen however
// late the timer fires).
const EXIT_AFTER_EOF_MS = 200
const KNOWN_STOP_REASONS = new Set<string>(['end_turn', 'max_tokens', 'max_turn_requests', 'refusal', 'cancelled'])

export class AcpDriver implements AgentDriver {
  readonly protocol = 'acp' as const
  readonly keepsProcesses = true
  readonly #options: AcpDriverOptions
  readonly #processes = new Set<AgentProcess>()
  readonly #finishedListeners: Array<(report: ProcessReport) => void> = []
  #initialize: InitializeResponse | null = null
  #lastStartFailure: { at: number, spawn: boolean } | null = null
  #probing: Promise<void> | null = null

  constructor (options: AcpDriverOptions) {
    if (options.command.length === 0) throw new Error('AcpDriver needs a command')
    this.#options = options
  }

  async open (options: OpenOptions): Promise<AgentConversation> {
    const agent = await this.#start(options)
    try {
      const sessionId = await agent.newSession(options)
      return new AcpConversation(agent, sessionId, this.#options)
    } catch (err) {
      await agent.stop('start failed')
      throw err
    }
  }

  async resume (ref: ConversationRef, options: OpenOptions): Promise<AgentConversation> {
    if (ref.protocol !== 'acp') throw new AgentSessionError('RESUME_FAILED', `A ${ref.protocol} conversation cannot continue over ACP`)
    const agent = await this.#start(options)
    try {
      await agent.loadSession(ref.sessionId, options)
      return new AcpConversation(agent, ref.sessionId, this.#options)
    } catch (err) {
      await agent.stop('resume failed')
      throw err
    }
  }

  async info (options: { refresh?: boolean } = {}): Promise<AgentInfo> {
    const stale = this.#lastStartFailure !== null && Date.now() - this.#lastStartFailure.at > PROBE_RETRY_MS
    if (this.#initialize === null && (this.#lastStartFailure === null || stale || options.refresh === true)) {
      this.#probing ??= this.#probe().finally(() => { this.#probing = null })
      await this.#probing
    }
    const init = this.#initialize
    return {
      protocol: 'acp',
      name: init?.agentInfo?.title ?? init?.agentInfo?.name ?? null,
      version: init?.agentInfo?.version ?? null,
      available: init !== null && this.#lastStartFailure === null,
      canResume: init !== null && canLoad(init)
    }
  }

  livePids (): number[] {
    const pids: number[] = []
    for (const agent of this.#processes) if (agent.running) pids.push(agent.pid)
    return pids
  }

  onProcessFinished (listener: (report: ProcessReport) => void): void {
    this.#finishedListeners.push(listener)
  }

  async drain (): Promise<void> {
    while (this.#processes.size > 0) await Promise.all([...this.#processes].map(async (agent) => await agent.finished))
  }

  /** Spawns the agent and runs initialize (and authenticate when configured and offered). */
  async #start (options: OpenOptions): Promise<AgentProcess> {
    const agent = new AgentProcess(this.#options)
    this.#processes.add(agent)
    void agent.finished.then((report) => {
      this.#processes.delete(agent)
      for (const listener of this.#finishedListeners) listener(report)
    })
    try {
      this.#initialize = await agent.initialize(options)
      this.#lastStartFailure = null
      return agent
    } catch (err) {
      if (!(options.signal?.aborted ?? false)) {
        this.#lastStartFailure = { at: Date.now(), spawn: err instanceof AgentSessionError && err.code === 'PROCESS_SPAWN_FAILED' }
      }
      await agent.stop('start failed')
      throw err
    }
  }

  /** Learns the agent's name, version and capabilities once, without opening a session. */
  async #probe (): Promise<void> {
    try {
      const agent = await this.#start({ timeoutMs: PROBE_TIMEOUT_MS })
      await agent.stop('probe done')
    } catch (err) {
      this.#options.log.warn({ err, command: this.#options.command[0] }, 'the ACP agent did not start')
    }
  }
}

function canLoad (init: InitializeResponse): boolean {
  return init.agentCapabilities?.loadSession === true || init.agentCapabilities?.sessionCapabilities?.resume != null
}

interface TurnState {
  text: string
  bytes: number
  onEvent: (event: TurnEvent) => void
  decidePermission: PromptOptions['decidePermission']
  /** Aborted when the turn ends or is cancelled: pending permission questions are then answered `cancelled`. */
  controller: AbortController
  tools: Map<string, { title: string, kind: string, status: ToolCallStatus }>
}

/** One agent process and its ACP connection. */
class AgentProcess {
  readonly pid: number
  readonly finished: Promise<ProcessReport>
  readonly exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  readonly #options: AcpDriverOptions
  readonly #child: GroupProcess
  readonly #connection: ClientConnection
  readonly #spawnFailure: Promise<string | null>
  #init: InitializeResponse | null = null
  #stderrTail = ''
  #running = true
  #stopping: Promise<TeardownReport> | null = null
  #resolveFinished!: (report: ProcessReport) => void
  #exitListener: ((exit: { code: number | null, signal: NodeJS.Signals | null }) => void) | null = null
  #exit: { code: number | null, signal: NodeJS.Signals | null } | null = null
  readonly #exitWatchers = new Set<(exit: { code: number | null, signal: NodeJS.Signals | null }) => void>()
  /** Where session/update notifications of the turn in flight go; null drops them (history replayed by session/load). */
  turn: TurnState | null = null
  #lastUpdateAt = 0

  constructor (options: AcpDriverOptions) {
    this.#options = options
    const [bin, ...args] = options.command
    this.#child = spawnGroup(bin, args, { cwd: options.workspaceDir, env: options.env, user: options.user, recorder: options.recorder })
    this.pid = this.#child.pid ?? -1
    this.finished = new Promise((resolve) => { this.#resolveFinished = resolve })
    // Never left unawaited: execa settles once the process exited and its pipes closed.
    const completion = this.#child.then((r) => r, (err: unknown) => err)
    this.exited = new Promise((resolve) => {
      this.#child.once('exit', (code, signal) => {
        this.#running = false
        resolve({ code, signal })
        this.#exitListener?.({ code, signal })
        this.#notifyExit({ code, signal })
      })
      // A missing or non-executable binary never emits 'exit'.
      void completion.then((r) => {
        const failure = r as { failed?: boolean, exitCode?: number }
        if (this.#running && failure.failed === true && failure.exitCode === undefined) {
          this.#running = false
          resolve({ code: null, signal: null })
          this.#notifyExit({ code: null, signal: null })
        }
      })
    })
    this.#child.stdin?.on('error', () => {})
    this.#child.stderr?.setEncoding('utf8')
    this.#child.stderr?.on('data', (chunk: string) => {
      this.#stderrTail = (this.#stderrTail + chunk).slice(-STDERR_TAIL_BYTES)
    })
    // A spawn failure settles with no exit code and no signal, and an errno code (ENOENT, EACCES).
    this.#spawnFailure = completion.then((r) => {
      const result = r as { failed?: boolean, exitCode?: number, signal?: string, code?: string }
      return result.failed === true && result.exitCode === undefined && result.signal === undefined ? result.code ?? 'unknown' : null
    })

    const log = options.log
    const input = jsonLines(this.#child.stdout!, {
      maxLineBytes: options.maxMessageBytes,
      onSkip: (why, sample) => { log.debug({ pid: this.pid, why, sample }, 'agent stdout line skipped') }
    })
    const output = Writable.toWeb(this.#child.stdin!) as WritableStream<Uint8Array>
    this.#connection = client({ name: packageInfo.name })
      .onNotification('session/update', ({ params }) => { this.#onUpdate(params) })
      .onRequest('session/request_permission', async ({ params, signal }) => await this.#onPermission(params, signal))
      .onRequest('*', async ({ method, params }) => await this.#onOtherRequest(method, params))
      .connect(ndJsonStream(output, input, { maxMessageBytes: options.maxMessageBytes }))
    void this.exited.then(() => { this.#connection.close(new Error('the agent process exited')) })
  }

  get running (): boolean {
    return this.#running
  }

  get stderrTail (): string {
    return this.#stderrTail
  }

  get capabilities (): InitializeResponse | null {
    return this.#init
  }

  onExit (listener: (exit: { code: number | null, signal: NodeJS.Signals | null }) => void): void {
    this.#exitListener = listener
  }

  /**
   * Calls fn once when the process exits (soon, if it already has); returns
   * what stops the watch. For what lives shorter than the process (a request,
   * a turn): a `.then` on `exited` would keep each one reachable, and all it
   * holds (the turn's text), for as long as the process runs.
   */
  whenExited (fn: (exit: { code: number | null, signal: NodeJS.Signals | null }) => void): () => void {
    const exit = this.#exit
    if (exit !== null) {
      queueMicrotask(() => { fn(exit) })
      return () => {}
    }
    this.#exitWatchers.add(fn)
    return () => { this.#exitWatchers.delete(fn) }
  }

  #notifyExit (exit: { code: number | null, signal: NodeJS.Signals | null }): void {
    this.#exit = exit
    // After the exit listener, as `.then` callbacks on `exited` would run.
    queueMicrotask(() => {
      for (const fn of this.#exitWatchers) fn(exit)
      this.#exitWatchers.clear()
    })
  }

  async initialize (options: OpenOptions): Promise<InitializeResponse> {
    const init = await this.request('initialize', {
      protocolVersion: 1,
      // No fs or terminal: the agent uses its own tools, inside its own process group.
      clientCapabilities: { fs: { readTextFile: false, writeTextFile: false }, terminal: false },
      clientInfo: { name: packageInfo.name, version: packageInfo.version }
    }, options, 'initialize')
    if (init.protocolVersion !== 1) {
      throw new AgentSessionError('AGENT_START_FAILED', `The agent speaks ACP version ${String(init.protocolVersion)}; this service speaks version 1`)
    }
    this.#init = init
    const method = this.#options.authMethod
    if (method !== undefined && (init.authMethods ?? []).some((m) => m.id === method)) await this.#authenticate(method, options)
    return init
  }

  async newSession (options: OpenOptions): Promise<string> {
    const params = { cwd: this.#options.workspaceDir, mcpServers: [] }
    try {
      return (await this.request('session/new', params, options, 'session/new')).sessionId
    } catch (err) {
      if (!isAuthRequired(err)) throw err
      const method = this.#options.authMethod
      const offered = (this.#init?.authMethods ?? []).map((m) => m.id)
      if (method === undefined) {
        throw new AgentSessionError('AGENT_AUTH_FAILED',
          `The agent needs authentication: set AGENT_AUTH_METHOD to one of its methods (${offered.join(', ') || 'none offered'})`)
      }
      await this.#authenticate(method, options)
      return (await this.request('session/new', params, options, 'session/new')).sessionId
    }
  }

  async loadSession (sessionId: string, options: OpenOptions): Promise<void> {
    const init = this.#init
    const params = { sessionId, cwd: this.#options.workspaceDir, mcpServers: [] }
    // The replayed history arrives as session/update while no turn is set, so it is dropped.
    if (init?.agentCapabilities?.loadSession === true) {
      await this.request('session/load', params, options, 'session/load')
      // Some agents (gemini-cli) go on replaying after answering: wait for the replay to go quiet.
      await this.#replayQuiet()
    } else if (init?.agentCapabilities?.sessionCapabilities?.resume != null) {
      await this.request('session/resume', params, options, 'session/resume')
    } else {
      throw new AgentSessionError('RESUME_FAILED', 'The agent cannot continue a conversation in a new process (no loadSession)')
    }
  }

  /** Ends the agent's session politely (when it supports session/close) within the deadline. */
  async closeSession (sessionId: string, deadlineMs: number): Promise<void> {
    if (this.#init?.agentCapabilities?.sessionCapabilities?.close == null || !this.#running) return
    try {
      await this.request('session/close', { sessionId }, { timeoutMs: deadlineMs }, 'session/close')
    } catch (err) {
      this.#options.log.debug({ err, pid: this.pid }, 'session/close was not answered')
    }
  }

  /**
   * One request with a deadline, the caller's abort signal, and the process's
   * death: whichever comes first. Failures become the API's errors.
   */
  async request<M extends keyof RequestResults> (method: M, params: Record<string, unknown>, options: OpenOptions, what: string): Promise<RequestResults[M]> {
    const signal = options.signal
    if (signal?.aborted === true) throw signal.reason
    let timer: NodeJS.Timeout | undefined
    let onAbort: (() => void) | undefined
    let pending = true
    let stopWatchingExit = (): void => {}
    const failure = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => {
        reject(new AgentSessionError('REQUEST_TIMEOUT', `The agent did not answer ${what} within ${options.timeoutMs}ms`))
      }, options.timeoutMs)
      onAbort = () => { reject(signal?.reason) }
      signal?.addEventListener('abort', onAbort, { once: true })
      stopWatchingExit = this.whenExited((exit) => {
        void this.#exitError(exit, what).then((err) => { if (pending) reject(err) })
      })
    })
    failure.catch(() => {})
    try {
      const request = (this.#connection.agent.request as (m: string, p: unknown) => Promise<unknown>)(method, params)
        .catch(async (err: unknown) => {
          // The connection closes when stdout ends, which can come just before the exit itself.
          const exit = await Promise.race([this.exited, exitWait()])
          throw exit !== undefined ? await this.#exitError(exit, what) : this.#requestError(err, what)
        })
      return await Promise.race([request, failure]) as RequestResults[M]
    } finally {
      pending = false
      clearTimeout(timer)
      stopWatchingExit()
      if (onAbort !== undefined) signal?.removeEventListener('abort', onAbort)
    }
  }

  /** session/prompt without a deadline: the conversation runs the turn's watchdog. */
  prompt (sessionId: string, text: string): Promise<{ stopReason: AcpStopReason }> {
    return this.#connection.agent.request('session/prompt', { sessionId, prompt: [{ type: 'text', text }] })
  }

  cancel (sessionId: string): void {
    this.#connection.agent.notify('session/cancel', { sessionId }).catch(() => {})
  }

  /** Tears the process group down through the ladder (once); resolves when nothing of it is left. */
  stop (why: string, graceMs = this.#options.killGraceMs): Promise<TeardownReport> {
    this.#stopping ??= (async () => {
      this.#exitListener = null
      this.#connection.close(new Error(`the agent is being stopped: ${why}`))
      // Some agents exit on stdin EOF; none is relied on to.
      this.#child.stdin?.end()
      let report: TeardownReport
      try {
        report = this.pid > 0
          ? await terminateProcessGroup(this.pid, { signal: this.#options.killSignal, graceMs })
          : { stage: 'exited', signal: null, durationMs: 0 }
      } finally {
        this.#child.stdout?.destroy()
        this.#child.stderr?.destroy()
        if (this.pid > 0) releaseGroup(this.pid, this.#options.recorder)
      }
      this.#options.log.debug({ pid: this.pid, why, stage: report.stage, teardownMs: report.durationMs }, 'agent process group torn down')
      await this.#child.then(() => {}, () => {})
      this.#resolveFinished({ pid: this.pid > 0 ? this.pid : null, teardown: report })
      return report
    })()
    return this.#stopping
  }

  async #authenticate (methodId: string, options: OpenOptions): Promise<void> {
    try {
      await this.request('authenticate', { methodId }, options, 'authenticate')
    } catch (err) {
      // A JSON-RPC error answer is a refusal; a timeout or the agent dying stays what it is.
      const rpcCode = (err as { cause?: { code?: unknown } }).cause?.code
      if (typeof rpcCode !== 'number') throw err
      throw new AgentSessionError('AGENT_AUTH_FAILED', `The agent refused authentication with method ${methodId} (AGENT_AUTH_METHOD)`, { cause: err })
    }
  }

  async #exitError (exit: { code: number | null, signal: NodeJS.Signals | null }, what: string): Promise<AgentSessionError> {
    // execa settles right after the exit once the pipes close; a process whose pipes a grandchild holds is not a spawn failure.
    const spawnFailure = await Promise.race([this.#spawnFailure, new Promise<null>((resolve) => setTimeout(() => { resolve(null) }, 50).unref())])
    if (spawnFailure !== null) {
      const why = spawnFailure === 'ENOENT' ? 'was not found' : spawnFailure === 'EACCES' ? 'is not executable' : 'could not be started'
      this.#options.log.error({ command: this.#options.command[0], code: spawnFailure }, 'the ACP agent could not be spawned')
      return new AgentSessionError('PROCESS_SPAWN_FAILED', `The agent's program ${why}: check AGENT_COMMAND`)
    }
    const how = exit.signal !== null ? `was killed by ${exit.signal}` : `exited with code ${String(exit.code)}`
    this.#options.log.warn({ pid: this.pid, code: exit.code, signal: exit.signal, stderr: lastLines(this.#stderrTail) }, `agent exited during ${what}`)
    return new AgentSessionError(what === 'the turn' ? 'AGENT_EXITED' : 'AGENT_START_FAILED', `The agent ${how} during ${what}`)
  }

  #requestError (err: unknown, what: string): AgentSessionError {
    if (err instanceof AgentSessionError) return err
    if (isAuthRequired(err)) return new AgentSessionError('AGENT_AUTH_FAILED', `The agent needs authentication for ${what}`, { cause: err })
    const rpc = err as { code?: unknown, message?: unknown }
    this.#options.log.warn({ pid: this.pid, what, code: rpc.code, message: rpc.message }, 'the agent answered with an error')
    return new AgentSessionError(what === 'session/load' || what === 'session/resume' ? 'RESUME_FAILED' : 'AGENT_START_FAILED',
      `The agent refused ${what}${typeof rpc.code === 'number' ? ` (JSON-RPC error ${rpc.code})` : ''}`, { cause: err })
  }

  async #replayQuiet (): Promise<void> {
    const until = performance.now() + REPLAY_MAX_WAIT_MS
    while (this.#running && performance.now() < until) {
      const quietFor = performance.now() - this.#lastUpdateAt
      if (quietFor >= REPLAY_QUIET_MS) return
      await delay(REPLAY_QUIET_MS - quietFor)
    }
  }

  #onUpdate (notification: SessionNotification): void {
    this.#lastUpdateAt = performance.now()
    // Handlers are synchronous, so updates reach the turn in the order they arrived.
    const turn = this.turn
    if (turn === null) return
    const update = notification.update
    switch (update.sessionUpdate) {
      case 'agent_message_chunk':
        if (update.content.type === 'text') {
          turn.text += update.content.text
          turn.bytes += Buffer.byteLength(update.content.text)
          turn.onEvent({ type: 'chunk', text: update.content.text })
        }
        break
      case 'agent_thought_chunk':
        if (update.content.type === 'text') turn.onEvent({ type: 'thought', text: update.content.text })
        break
      case 'tool_call': {
        const call = { title: update.title, kind: update.kind ?? 'other', status: update.status ?? 'pending' }
        turn.tools.set(update.toolCallId, call)
        turn.onEvent({ type: 'tool_call', id: update.toolCallId, ...call })
        break
      }
      case 'tool_call_update': {
        const known = turn.tools.get(update.toolCallId) ?? { title: '', kind: 'other', status: 'pending' as ToolCallStatus }
        const call = { title: update.title ?? known.title, kind: update.kind ?? known.kind, status: update.status ?? known.status }
        turn.tools.set(update.toolCallId, call)
        turn.onEvent({ type: 'tool_call', id: update.toolCallId, ...call })
        break
      }
      case 'plan':
        turn.onEvent({ type: 'plan', entries: update.entries.map((e) => ({ content: e.content, priority: e.priority, status: e.status })) })
        break
      case 'usage_update':
        turn.onEvent({ type: 'usage', usage: { used: update.used, size: update.size, ...(update.cost == null ? {} : { cost: update.cost }) } })
        break
      default:
        // New update kinds appear over time: ignored.
    }
  }

  async #onPermission (params: RequestPermissionRequest, signal: AbortSignal): Promise<RequestPermissionResponse> {
    const turn = this.turn
    if (turn === null || turn.controller.signal.aborted) return { outcome: { outcome: 'cancelled' } }
    const request: PermissionRequest = {
      requestId: newRequestId(),
      title: params.toolCall.title ?? 'The agent asks for permission',
      options: params.options.map((o) => ({ optionId: o.optionId, name: o.name, kind: o.kind }))
    }
    const decision = await this.#decide(turn, request, signal)
    return { outcome: decision.outcome === 'selected' ? { outcome: 'selected', optionId: decision.optionId } : { outcome: 'cancelled' } }
  }

  /** Cursor's own blocking requests (`cursor/*`) are answered so a turn never strands; the rest get -32601. */
  async #onOtherRequest (method: string, params: unknown): Promise<unknown> {
    const turn = this.turn
    switch (method) {
      case 'cursor/ask_question':
        // Nobody is at a keyboard to answer the agent's question mid-turn.
        return { outcome: { outcome: 'skipped', reason: 'No one can answer questions during this turn; continue with your best judgement' } }
      case 'cursor/create_plan': {
        if (turn === null) return { outcome: { outcome: 'cancelled' } }
        // Approving a plan lets the agent go on to act on it: the permission policy decides.
        const plan = params as { plan?: unknown, name?: unknown }
        const decision = await this.#decide(turn, {
          requestId: newRequestId(),
          title: typeof plan.name === 'string' ? `Approve the plan: ${plan.name}` : 'Approve the agent\'s plan',
          options: [
            { optionId: 'accept', name: 'Accept the plan', kind: 'allow_once' },
            { optionId: 'reject', name: 'Reject the plan', kind: 'reject_once' }
          ]
        }, turn.controller.signal)
        if (decision.outcome === 'cancelled') return { outcome: { outcome: 'cancelled' } }
        return decision.optionId === 'accept'
          ? { outcome: { outcome: 'accepted' } }
          : { outcome: { outcome: 'rejected', reason: 'The plan was not approved' } }
      }
      case 'cursor/update_todos':
        return {}
      default:
        throw RequestError.methodNotFound(method)
    }
  }

  async #decide (turn: TurnState, request: PermissionRequest, signal: AbortSignal): Promise<PermissionDecision> {
    const both = AbortSignal.any([signal, turn.controller.signal])
    if (both.aborted) return { outcome: 'cancelled' }
    try {
      const decision = await turn.decidePermission(request, both)
      // The turn may have been cancelled while a person was deciding.
      return both.aborted ? { outcome: 'cancelled' } : decision
    } catch {
      return { outcome: 'cancelled' }
    }
  }
}

interface RequestResults {
  initialize: InitializeResponse
  authenticate: unknown
  'session/new': NewSessionResponse
  'session/load': unknown
  'session/resume': unknown
  'session/close': unknown
}

/** A conversation held by one live agent process; brought back by session/load in a new one. */
class AcpConversation implements AgentConversation {
  readonly ref: ConversationRef
  readonly #agent: AgentProcess
  readonly #sessionId: string
  readonly #options: AcpDriverOptions
  #alive = true
  #closed = false
  #turnInFlight: Promise<void> | null = null
  #cancelTurn: (() => void) | null = null
  #prompting = false
  // A cancel that came while the prompt still waited for the previous turn to wind down.
  #cancelledEarly = false
  #exitListeners: Array<(exit: AgentExit) => void> = []

  constructor (agent: AgentProcess, sessionId: string, options: AcpDriverOptions) {
    this.#agent = agent
    this.#sessionId = sessionId
    this.#options = options
    this.ref = { protocol: 'acp', sessionId }
    agent.onExit((exit) => {
      this.#alive = false
      const report: AgentExit = { pid: agent.pid, code: exit.code, signal: exit.signal, duringTurn: this.#turnInFlight !== null }
      for (const listener of this.#exitListeners) listener(report)
      // Whatever is left of its group (grandchildren) goes through the ladder.
      void agent.stop('exited by itself')
    })
  }

  get alive (): boolean {
    return this.#alive && this.#agent.running
  }

  get pid (): number | null {
    return this.alive ? this.#agent.pid : null
  }

  async prompt (text: string, options: PromptOptions): Promise<TurnResult> {
    this.#prompting = true
    this.#cancelledEarly = false
    try {
      return await this.#prompt(text, options)
    } finally {
      this.#prompting = false
    }
  }

  async #prompt (text: string, options: PromptOptions): Promise<TurnResult> {
    // A cancelled or timed-out turn may still be winding down.
    if (this.#turnInFlight !== null) await this.#turnInFlight
    if (this.#cancelledEarly) return { answer: '', stopReason: 'cancelled', durationMs: 0 }
    if (!this.alive) throw new AgentSessionError('AGENT_EXITED', 'The agent process is gone')
    const agent = this.#agent
    const started = performance.now()
    const turn: TurnState = {
      text: '',
      bytes: 0,
      onEvent: options.onEvent,
      decidePermission: options.decidePermission,
      controller: new AbortController(),
      tools: new Map()
    }
    agent.turn = turn

    let settle!: (outcome: { stopReason: StopReason } | AgentSessionError) => void
    const outcome = new Promise<{ stopReason: StopReason } | AgentSessionError>((resolve) => { settle = resolve })
    let done = false
    const finish = (value: { stopReason: StopReason } | AgentSessionError): void => {
      if (done) return
      done = true
      settle(value)
    }
    let forceTimer: NodeJS.Timeout | undefined
    // Cancel, then give the agent KILL_GRACE to answer it before the group goes.
    const cancelThenForce = (onForced: () => void): void => {
      if (turn.controller.signal.aborted) return
      turn.controller.abort()
      agent.cancel(this.#sessionId)
      forceTimer = setTimeout(() => {
        this.#options.log.warn({ pid: agent.pid }, 'the agent ignored the cancel: tearing it down')
        this.#alive = false
        void agent.stop('ignored the cancel')
        onForced()
      }, this.#options.killGraceMs)
    }
    this.#cancelTurn = () => { cancelThenForce(() => { finish({ stopReason: 'cancelled' }) }) }

    const watchdog = setTimeout(() => {
      finish(new AgentSessionError('REQUEST_TIMEOUT', `The agent did not answer within ${options.timeoutMs}ms`))
      cancelThenForce(() => {})
    }, options.timeoutMs)

    const answered = agent.prompt(this.#sessionId, text).then((response) => {
      const stopReason = KNOWN_STOP_REASONS.has(response.stopReason) ? response.stopReason as StopReason : 'end_turn'
      finish({ stopReason: turn.controller.signal.aborted ? 'cancelled' : stopReason })
    }, async (err: unknown) => {
      // The connection closes when stdout ends, which can come just before the exit itself.
      const exit = await Promise.race([agent.exited, exitWait()])
      if (exit !== undefined || !this.#alive) {
        const how = exit === undefined ? 'was stopped' : exit.signal !== null ? `was killed by ${exit.signal}` : `exited with code ${String(exit.code)}`
        finish(new AgentSessionError('AGENT_EXITED', `The agent ${how} during the turn`))
        return
      }
      this.#options.log.warn({ pid: agent.pid, err }, 'session/prompt failed')
      finish(new AgentSessionError('PROCESS_COMMUNICATION_FAILED', 'The agent failed to answer the question'))
    })
    // The process dying ends the turn at once, whatever the connection does.
    let agentGone!: () => void
    const gone = new Promise<void>((resolve) => { agentGone = resolve })
    const stopWatchingExit = agent.whenExited((exit) => {
      const how = exit.signal !== null ? `was killed by ${exit.signal}` : `exited with code ${String(exit.code)}`
      finish(new AgentSessionError('AGENT_EXITED', `The agent ${how} during the turn`))
      agentGone()
    })
    const sizeCheck = setInterval(() => {
      if (turn.bytes > this.#options.maxMessageBytes) {
        finish(new AgentSessionError('PROCESS_COMMUNICATION_FAILED', `The agent produced more than ${this.#options.maxMessageBytes} bytes of answer`))
        cancelThenForce(() => {})
      }
    }, 100)

    // The turn is over for the caller at `outcome`; for the process only once the prompt answered or the agent is gone.
    // Nothing of the turn may stay reachable from the process once it is over (see whenExited).
    this.#turnInFlight = Promise.race([answered, gone]).finally(() => {
      stopWatchingExit()
      clearTimeout(forceTimer)
      this.#turnInFlight = null
    })
    const result = await outcome
    clearTimeout(watchdog)
    clearInterval(sizeCheck)
    this.#cancelTurn = null
    if (!turn.controller.signal.aborted) turn.controller.abort()
    if (agent.turn === turn) agent.turn = null
    if (result instanceof AgentSessionError) throw result
    return { answer: turn.text, stopReason: result.stopReason, durationMs: Math.round(performance.now() - started) }
  }

  cancel (): boolean {
    if (this.#cancelTurn !== null) {
      this.#cancelTurn()
      return true
    }
    if (this.#prompting) this.#cancelledEarly = true
    return this.#prompting
  }

  async suspend (): Promise<ProcessReport> {
    // Never session/close: the agent must still be able to load this session.
    this.#alive = false
    await this.#agent.stop('suspended')
    return await this.#agent.finished
  }

  async close (): Promise<ProcessReport> {
    if (!this.#closed) {
      this.#closed = true
      const started = performance.now()
      if (this.alive) {
        this.#cancelTurn?.()
        await this.#agent.closeSession(this.#sessionId, Math.min(CLOSE_REQUEST_MAX_MS, Math.floor(this.#options.killGraceMs / 2)))
      }
      this.#alive = false
      // The polite request took part of the grace: the whole close stays within about KILL_GRACE.
      void this.#agent.stop('closed', Math.max(0, this.#options.killGraceMs - (performance.now() - started)))
    }
    return await this.#agent.finished
  }

  onExit (listener: (exit: AgentExit) => void): void {
    this.#exitListeners.push(listener)
  }
}

/** ACP's "authentication required", as the agent sent it or wrapped in our error. */
function isAuthRequired (err: unknown): boolean {
  const e = err as { code?: unknown, cause?: { code?: unknown } } | undefined
  return e?.code === AUTH_REQUIRED || e?.cause?.code === AUTH_REQUIRED
}

let requestCounter = 0
function newRequestId (): string {
  requestCounter++
  return `perm_${Date.now().toString(36)}_${requestCounter}`
}

function delay (ms: number): Promise<undefined> {
  return new Promise((resolve) => setTimeout(() => { resolve(undefined) }, ms).unref())
}

/**
 * EXIT_AFTER_EOF_MS, then the poll phase of the loop turn the timer fired in:
 * when the loop lagged past the wait, the exit already signalled is handled
 * before the wait ends, instead of being taken for a protocol failure.
 */
async function exitWait (): Promise<undefined> {
  await delay(EXIT_AFTER_EOF_MS)
  return await new Promise((resolve) => setImmediate(() => { resolve(undefined) }))
}

function lastLines (text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '')
  const message = lines.slice(-5).join(' | ')
  return message.length > 1000 ? '…' + message.slice(-1000) : message
}
