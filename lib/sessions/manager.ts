// Sessions: create / get / touch / ask / cancel / end / endAll / sweep. Framework-free.
//
// A session owns one agent conversation (lib/agents). Ending a session removes
// it from the map synchronously, before its processes are torn down, so a
// request racing an end or a reap sees 404 at once and can never revive it or
// start a process in it.

import { randomUUID } from 'node:crypto'
import { EventEmitter, setMaxListeners } from 'node:events'
import type {
  AgentConversation, AgentDriver, AgentExit, ConversationRef, PermissionDecision, PermissionRequest, ProcessReport,
  StopReason, TurnEvent, TurnResult
} from '../agents/types.js'
import { AgentSessionError, formatDuration, sessionNotFound, shuttingDown, type SessionEndReason } from '../errors.js'
import { silentLogger, type Logger } from '../logger.js'
import type { TeardownStage } from '../processes/terminate.js'
import { SessionEvents, type NumberedEvent, type SessionState, type StreamEvent } from './events.js'
import { decideByPolicy, PendingPermissions, type PermissionPolicy } from './permissions.js'

export type { SessionState }

/** One turn of the conversation, as GET /api/session/history shows it. Times are epoch milliseconds. */
export interface TurnRecord {
  question: string
  /** What the agent said (also the part that arrived before a cancel); '' when the turn failed. */
  answer: string
  stopReason: StopReason | null
  /** The error code when the turn failed (AGENT_EXITED, REQUEST_TIMEOUT, ...). */
  error: string | null
  startedAt: number
  endedAt: number
}

/** A read-only view of a session. Times are epoch milliseconds. */
export interface SessionInfo {
  id: string
  ref: ConversationRef
  state: SessionState
  createdAt: number
  lastActivity: number
  idleTimeoutMs: number
  expiresAt: number
}

export interface EndReport {
  sessionId: string
  reason: SessionEndReason
  idleMs: number
  ageMs: number
  /** How its processes ended: exited by themselves, after the polite signal, or after SIGKILL. */
  stage: TeardownStage
  teardownMs: number
}

export interface SweepReport {
  checked: number
  reaped: EndReport[]
  failed: number
  durationMs: number
}

export type TurnOutcome = 'answered' | 'failed' | 'timeout' | 'cancelled'

export interface AskResult extends TurnResult {}

export interface SessionManagerEvents {
  'session-started': [SessionInfo]
  'session-ended': [EndReport]
  'turn-finished': [{ sessionId: string, outcome: TurnOutcome, durationMs: number, code?: string }]
  /** Every event of every turn, in order (what streams and logs follow). */
  'turn-event': [{ sessionId: string, event: TurnEvent }]
  /** A live agent died without being asked to. */
  'agent-exited': [{ sessionId: string } & AgentExit]
  'process-finished': [ProcessReport]
}

export interface SessionManagerOptions {
  driver: AgentDriver
  maxSessions: number
  sessionTimeoutMs: number
  maxSessionTimeoutMs: number
  askTimeoutMs: number
  /** How long starting (or bringing back) an agent may take; defaults to askTimeoutMs. */
  startTimeoutMs?: number
  /** What agents' permission requests are answered with (default reject). */
  permissionPolicy?: PermissionPolicy
  /** How long a person has to answer a permission request (PERMISSION_POLICY=ask). */
  permissionTimeoutMs?: number
  /** How long before its expiry a session's subscribers are warned. */
  expiryWarningMs?: number
  /** Largest conversation log kept per session (oldest entries dropped). */
  maxHistory?: number
  /** How many ended ids, and for how long, are remembered to say why they are gone. */
  endedMemory?: { maxEntries: number, ttlMs: number }
  now?: () => number
  log?: Logger
}

interface Session {
  readonly id: string
  readonly createdAt: number
  readonly idleTimeoutMs: number
  readonly ref: ConversationRef
  state: SessionState
  lastActivity: number
  /** null once it is gone for good; a dead one (not alive) is resumed by the next ask. */
  conversation: AgentConversation | null
  /** Aborts the ask in flight (end, shutdown); set only while busy. */
  turn: AbortController | null
  /** A cancel that came before the turn reached the agent (while its agent was being brought back). */
  cancelRequested: boolean
  history: TurnRecord[] | null
  /** Warns the session's subscribers before the reaper would end it; set only while someone listens. */
  expiryTimer: NodeJS.Timeout | null
}

interface EndedRecord { reason: SessionEndReason, idleMs: number, endedAt: number }

const EXITED: ProcessReport = { pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }

export class SessionManager extends EventEmitter<SessionManagerEvents> {
  readonly #sessions = new Map<string, Session>()
  readonly #ended = new Map<string, EndedRecord>()
  readonly #closing = new Map<string, Promise<EndReport>>()
  readonly #shutdown = new AbortController()
  readonly #events = new SessionEvents()
  readonly #permissions: PendingPermissions
  #starting = 0
  #closed = false

  readonly #driver: AgentDriver
  readonly #now: () => number
  readonly #log: Logger
  readonly #options: Required<Omit<SessionManagerOptions, 'driver' | 'now' | 'log'>>

  constructor (options: SessionManagerOptions) {
    super()
    // Every start and turn in flight listens on the shutdown signal.
    setMaxListeners(0, this.#shutdown.signal)
    this.#driver = options.driver
    this.#now = options.now ?? Date.now
    this.#log = options.log ?? silentLogger
    this.#options = {
      maxSessions: options.maxSessions,
      sessionTimeoutMs: options.sessionTimeoutMs,
      maxSessionTimeoutMs: options.maxSessionTimeoutMs,
      askTimeoutMs: options.askTimeoutMs,
      startTimeoutMs: options.startTimeoutMs ?? options.askTimeoutMs,
      permissionPolicy: options.permissionPolicy ?? 'reject',
      permissionTimeoutMs: options.permissionTimeoutMs ?? 60_000,
      expiryWarningMs: options.expiryWarningMs ?? 60_000,
      maxHistory: options.maxHistory ?? 100,
      endedMemory: options.endedMemory ?? { maxEntries: 10_000, ttlMs: 60 * 60_000 }
    }
    this.#permissions = new PendingPermissions(this.#options.permissionTimeoutMs)
    this.#driver.onProcessFinished((report) => this.emit('process-finished', report))
  }

  get closed (): boolean {
    return this.#closed
  }

  get defaultTimeoutMs (): number {
    return this.#options.sessionTimeoutMs
  }

  get driver (): AgentDriver {
    return this.#driver
  }

  async create (options: { idleTimeoutMs?: number } = {}): Promise<SessionInfo> {
    if (this.#closed) throw shuttingDown()
    const idleTimeoutMs = options.idleTimeoutMs ?? this.#options.sessionTimeoutMs
    if (idleTimeoutMs > this.#options.maxSessionTimeoutMs) {
      throw new AgentSessionError('INVALID_REQUEST',
        `idle_timeout may be at most ${formatDuration(this.#options.maxSessionTimeoutMs)} (MAX_SESSION_TIMEOUT)`)
    }
    // Starts in progress count: a burst of starts must not overshoot the limit.
    if (this.#sessions.size + this.#starting >= this.#options.maxSessions) {
      throw new AgentSessionError('SESSION_LIMIT_REACHED',
        `The server already runs its maximum of ${this.#options.maxSessions} sessions (MAX_SESSIONS): end one or try again later`,
        { retryAfterSeconds: 30 })
    }
    this.#starting++
    let conversation: AgentConversation
    try {
      conversation = await this.#driver.open({ timeoutMs: this.#options.startTimeoutMs, signal: this.#shutdown.signal })
    } finally {
      this.#starting--
    }
    if (this.#closed) {
      void conversation.close()
      throw shuttingDown()
    }

    const now = this.#now()
    const session: Session = {
      id: newSessionId(),
      createdAt: now,
      idleTimeoutMs,
      ref: conversation.ref,
      state: 'idle',
      lastActivity: now,
      conversation,
      turn: null,
      cancelRequested: false,
      history: null,
      expiryTimer: null
    }
    this.#sessions.set(session.id, session)
    this.#watch(session, conversation)
    const info = toInfo(session)
    this.#log.info({ sessionId: session.id, agent: session.ref, pid: conversation.pid, idleTimeoutMs, activeSessions: this.#sessions.size }, 'session started')
    this.emit('session-started', info)
    return info
  }

  get (sessionId: string): SessionInfo {
    return toInfo(this.#active(sessionId))
  }

  /** Records activity (a heartbeat): the idle clock starts again. */
  touch (sessionId: string): SessionInfo {
    const session = this.#active(sessionId)
    session.lastActivity = this.#now()
    this.#scheduleExpiryWarning(session)
    return toInfo(session)
  }

  /** The session's answered, cancelled and failed turns, oldest first (a copy). */
  history (sessionId: string): TurnRecord[] {
    return (this.#active(sessionId).history ?? []).map((turn) => ({ ...turn }))
  }

  /**
   * Follows the session's stream: its current state and waiting permission
   * requests first (no id), then what was missed after `lastEventId`, then
   * everything as it happens. Subscribing is not activity.
   */
  subscribe (sessionId: string, listener: (event: NumberedEvent | { id: null, event: StreamEvent }) => void, lastEventId?: number): () => void {
    const session = this.#active(sessionId)
    const { missed, unsubscribe } = this.#events.subscribe(sessionId, listener, lastEventId)
    listener({ id: null, event: { type: 'state', state: session.state } })
    for (const request of this.#permissions.waiting(sessionId)) listener({ id: null, event: { type: 'turn', event: { type: 'permission', request } } })
    for (const event of missed) listener(event)
    this.#scheduleExpiryWarning(session)
    return () => {
      unsubscribe()
      if (!this.#events.hasSubscribers(sessionId)) this.#clearExpiryWarning(session)
    }
  }

  /** A person's answer to a permission request (PERMISSION_POLICY=ask). */
  answerPermission (sessionId: string, requestId: string, optionId: string): void {
    this.#active(sessionId)
    this.#permissions.answer(sessionId, requestId, optionId)
  }

  /**
   * One turn. `onAccepted` runs once the session took the question (it exists
   * and was not busy), before the agent runs; `onEvent` gets every event of
   * the turn as it arrives.
   */
  async ask (sessionId: string, question: string, options: { onEvent?: (event: TurnEvent) => void, onAccepted?: () => void } = {}): Promise<AskResult> {
    const session = this.#active(sessionId)
    if (session.state === 'busy') {
      throw new AgentSessionError('SESSION_BUSY', 'This session is already answering a question: wait for it, then ask again',
        { retryAfterSeconds: 1 })
    }
    const controller = new AbortController()
    this.#setState(session, 'busy')
    session.turn = controller
    session.cancelRequested = false
    const startedAt = this.#now()
    session.lastActivity = startedAt
    options.onAccepted?.()
    const started = performance.now()
    const onEvent = (event: TurnEvent): void => {
      options.onEvent?.(event)
      this.#events.publish(sessionId, { type: 'turn', event })
      this.emit('turn-event', { sessionId, event })
    }
    const record = (answer: string, stopReason: StopReason | null, error: string | null): void => {
      this.#remember(session, { question, answer, stopReason, error, startedAt, endedAt: this.#now() })
    }
    try {
      // The usual case starts the turn without waiting a tick; a dead agent is brought back first.
      const conversation = session.conversation?.alive === true
        ? session.conversation
        : await untilAborted(this.#liveConversation(session, controller.signal), controller.signal)
      let result: AskResult
      if (session.cancelRequested) {
        result = { answer: '', stopReason: 'cancelled', durationMs: Math.round(performance.now() - started) }
      } else {
        result = await untilAborted(conversation.prompt(question, {
          timeoutMs: this.#options.askTimeoutMs,
          onEvent,
          decidePermission: async (request, signal) => await this.#decidePermission(sessionId, request, signal, onEvent)
        }), controller.signal)
      }
      record(result.answer, result.stopReason, null)
      this.#events.publish(sessionId, { type: 'answer', answer: result.answer, stopReason: result.stopReason })
      const outcome: TurnOutcome = result.stopReason === 'cancelled' ? 'cancelled' : 'answered'
      this.emit('turn-finished', { sessionId, outcome, durationMs: performance.now() - started })
      return result
    } catch (err) {
      const apiError = err instanceof AgentSessionError ? err : undefined
      const code = apiError?.code ?? 'INTERNAL_SERVER_ERROR'
      const outcome: TurnOutcome = code === 'REQUEST_TIMEOUT'
        ? 'timeout'
        : controller.signal.aborted ? 'cancelled' : 'failed'
      record('', null, code)
      this.#events.publish(sessionId, { type: 'error', error: code, details: apiError?.message ?? 'Internal server error' })
      this.emit('turn-finished', { sessionId, outcome, durationMs: performance.now() - started, code })
      throw err
    } finally {
      // An end during the turn has moved it on to closing: then it stays so.
      if ((session.state as SessionState) === 'busy') {
        session.turn = null
        session.lastActivity = this.#now()
        this.#setState(session, 'idle')
        this.#scheduleExpiryWarning(session)
        // A dead agent that cannot be brought back ends the session now, not at the next ask.
        if (session.conversation?.alive === false) void this.#endIfUnresumable(session)
      }
    }
  }

  /** Cancels the turn in flight; false when the session is not answering anything. */
  cancel (sessionId: string): boolean {
    const session = this.#active(sessionId)
    if (session.state !== 'busy') return false
    if (session.conversation?.cancel() !== true) session.cancelRequested = true
    this.#log.info({ sessionId }, 'turn cancelled by the client')
    return true
  }

  /**
   * Ends an active session: it is gone at once, its turn (if any) is answered
   * with an error, and the returned promise resolves when its processes are.
   */
  end (sessionId: string, reason: SessionEndReason): Promise<EndReport> {
    const session = this.#active(sessionId)
    const now = this.#now()
    const idleMs = session.state === 'busy' ? 0 : now - session.lastActivity
    this.#sessions.delete(sessionId)
    this.#setState(session, 'closing')
    this.#clearExpiryWarning(session)
    this.#events.publish(sessionId, { type: 'ended', reason })
    this.#events.close(sessionId)
    this.#rememberEnded(sessionId, { reason, idleMs, endedAt: now })
    session.turn?.abort(reason === 'shutdown'
      ? shuttingDown()
      : sessionNotFound(sessionId, { reason, idleMs }))
    const conversation = session.conversation
    session.conversation = null

    const teardown = (async (): Promise<EndReport> => {
      let processes = EXITED
      try {
        if (conversation !== null) processes = await conversation.close()
      } catch (err) {
        this.#log.error({ err, sessionId }, 'closing the agent conversation failed')
      }
      const report: EndReport = {
        sessionId,
        reason,
        idleMs,
        ageMs: now - session.createdAt,
        stage: processes.teardown.stage,
        teardownMs: Math.round(this.#now() - now)
      }
      this.#log.info({
        sessionId,
        reason,
        idleMs,
        idle: formatDuration(idleMs),
        processes: report.stage,
        teardownMs: report.teardownMs,
        activeSessions: this.#sessions.size
      }, 'session ended')
      this.emit('session-ended', report)
      return report
    })()
    this.#closing.set(sessionId, teardown)
    const forget = (): void => { this.#closing.delete(sessionId) }
    teardown.then(forget, forget)
    return teardown
  }

  /** Ends every session whose idle time passed its timeout; waits for their teardowns. */
  async sweep (): Promise<SweepReport> {
    const started = performance.now()
    const now = this.#now()
    const ending: Array<Promise<EndReport>> = []
    let checked = 0
    for (const session of this.#sessions.values()) {
      checked++
      if (session.state === 'idle' && now - session.lastActivity >= session.idleTimeoutMs) {
        ending.push(this.end(session.id, 'expired'))
      }
    }
    const results = await Promise.allSettled(ending)
    const reaped: EndReport[] = []
    let failed = 0
    for (const r of results) {
      if (r.status === 'fulfilled') {
        reaped.push(r.value)
      } else {
        failed++
        this.#log.error({ err: r.reason }, 'reaping a session failed')
      }
    }
    return { checked, reaped, failed, durationMs: performance.now() - started }
  }

  /** Ends every session in parallel and waits until no agent process is left. */
  async endAll (reason: SessionEndReason): Promise<EndReport[]> {
    const ending = [...this.#sessions.keys()].map((id) => this.end(id, reason))
    // One failure must not stop the wait for the others.
    const results = await Promise.allSettled([...ending, ...this.#closing.values()])
    await this.#driver.drain()
    const reports = new Map<string, EndReport>()
    for (const result of results) {
      if (result.status === 'fulfilled') reports.set(result.value.sessionId, result.value)
      else this.#log.error({ err: result.reason }, 'ending a session failed')
    }
    return [...reports.values()]
  }

  /** Refuses new work, cancels everything in flight and ends every session. */
  shutdown (): Promise<EndReport[]> {
    if (!this.#closed) {
      this.#closed = true
      this.#shutdown.abort(shuttingDown())
    }
    return this.endAll('shutdown')
  }

  list (): SessionInfo[] {
    return [...this.#sessions.values()].map(toInfo)
  }

  counts (): { active: number, busy: number, starting: number, closing: number } {
    let busy = 0
    for (const session of this.#sessions.values()) if (session.state === 'busy') busy++
    return { active: this.#sessions.size, busy, starting: this.#starting, closing: this.#closing.size }
  }

  /** Why a recently ended id is gone, while it is remembered. */
  endedReason (sessionId: string): SessionEndReason | undefined {
    return this.#endedRecord(sessionId)?.reason
  }

  /** The session's conversation, brought back in a new process when its agent died. */
  async #liveConversation (session: Session, signal: AbortSignal): Promise<AgentConversation> {
    const current = session.conversation
    if (current?.alive === true) return current
    const info = await this.#driver.info()
    if (!info.canResume) {
      await this.#endIfUnresumable(session)
      throw sessionNotFound(session.id, this.#endedRecord(session.id))
    }
    let conversation: AgentConversation
    try {
      conversation = await this.#driver.resume(session.ref, { timeoutMs: this.#options.startTimeoutMs, signal })
    } catch (err) {
      if (signal.aborted) throw err
      this.#log.error({ err, sessionId: session.id, agent: session.ref }, 'resuming the agent failed')
      if (this.#sessions.get(session.id) === session) void this.end(session.id, 'resume_failed')
      throw new AgentSessionError('RESUME_FAILED',
        'The agent could not continue this conversation in a new process; the session has ended: start a new one', { cause: err })
    }
    if (signal.aborted || this.#sessions.get(session.id) !== session) {
      void conversation.close()
      throw signal.reason
    }
    session.conversation = conversation
    this.#watch(session, conversation)
    this.#log.info({ sessionId: session.id, agent: session.ref, pid: conversation.pid }, 'agent restarted with the conversation')
    return conversation
  }

  #watch (session: Session, conversation: AgentConversation): void {
    conversation.onExit((exit) => {
      this.#log.warn({ sessionId: session.id, ...exit }, exit.duringTurn ? 'agent exited during a turn' : 'agent exited between turns')
      this.emit('agent-exited', { sessionId: session.id, ...exit })
      if (!exit.duringTurn && session.state === 'idle') void this.#endIfUnresumable(session)
    })
  }

  /** Ends a session whose agent died when the agent cannot continue it elsewhere. */
  async #endIfUnresumable (session: Session): Promise<void> {
    let canResume = false
    try {
      canResume = (await this.#driver.info()).canResume
    } catch {}
    if (canResume || this.#sessions.get(session.id) !== session || session.state === 'busy') return
    await this.end(session.id, 'agent_exited')
  }

  async #decidePermission (sessionId: string, request: PermissionRequest, signal: AbortSignal, onEvent: (event: TurnEvent) => void): Promise<PermissionDecision> {
    const policy = this.#options.permissionPolicy
    onEvent({ type: 'permission', request })
    const decided = policy === 'ask'
      ? await this.#permissions.wait(sessionId, request, signal)
      : { decision: decideByPolicy(policy, request.options), outcome: decideByPolicy(policy, request.options).outcome }
    const optionId = decided.decision.outcome === 'selected' ? decided.decision.optionId : null
    this.#log.info({ sessionId, requestId: request.requestId, title: request.title, policy, outcome: decided.outcome, optionId },
      'agent permission request decided')
    onEvent({ type: 'permission_decided', requestId: request.requestId, outcome: decided.outcome, optionId })
    return decided.decision
  }

  #setState (session: Session, state: SessionState): void {
    if (session.state === state) return
    session.state = state
    this.#events.publish(session.id, { type: 'state', state })
  }

  /** Arms the warning EXPIRY_WARNING before the reaper would end the session, while someone listens. */
  #scheduleExpiryWarning (session: Session): void {
    this.#clearExpiryWarning(session)
    if (session.state !== 'idle' || !this.#events.hasSubscribers(session.id)) return
    const expiresAt = session.lastActivity + session.idleTimeoutMs
    const delayMs = Math.max(0, expiresAt - this.#options.expiryWarningMs - this.#now())
    session.expiryTimer = setTimeout(() => {
      session.expiryTimer = null
      if (session.state !== 'idle' || this.#sessions.get(session.id) !== session) return
      const expiresAtNow = session.lastActivity + session.idleTimeoutMs
      this.#events.publish(session.id, {
        type: 'expiring',
        expiresAt: expiresAtNow,
        secondsLeft: Math.max(0, Math.round((expiresAtNow - this.#now()) / 1000))
      })
    }, delayMs)
    session.expiryTimer.unref()
  }

  #clearExpiryWarning (session: Session): void {
    if (session.expiryTimer === null) return
    clearTimeout(session.expiryTimer)
    session.expiryTimer = null
  }

  #active (sessionId: string): Session {
    const session = this.#sessions.get(sessionId)
    if (session !== undefined) return session
    throw sessionNotFound(sessionId, this.#endedRecord(sessionId))
  }

  #endedRecord (sessionId: string): EndedRecord | undefined {
    const record = this.#ended.get(sessionId)
    if (record !== undefined && this.#now() - record.endedAt > this.#options.endedMemory.ttlMs) {
      this.#ended.delete(sessionId)
      return undefined
    }
    return record
  }

  #rememberEnded (sessionId: string, record: EndedRecord): void {
    const { maxEntries, ttlMs } = this.#options.endedMemory
    this.#ended.set(sessionId, record)
    // Insertion order is end order: drop from the front what is too old or too many.
    for (const [id, old] of this.#ended) {
      if (this.#ended.size <= maxEntries && record.endedAt - old.endedAt <= ttlMs) break
      this.#ended.delete(id)
    }
  }

  #remember (session: Session, turn: TurnRecord): void {
    session.history ??= []
    session.history.push(turn)
    if (session.history.length > this.#options.maxHistory) session.history.shift()
  }
}

/** The promise's outcome, or the signal's reason as soon as it aborts (the work itself is stopped elsewhere). */
function untilAborted<T> (promise: Promise<T>, signal: AbortSignal): Promise<T> {
  if (signal.aborted) {
    promise.catch(() => {})
    return Promise.reject(signal.reason)
  }
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => { reject(signal.reason) }
    signal.addEventListener('abort', onAbort, { once: true })
    promise.then((value) => {
      signal.removeEventListener('abort', onAbort)
      resolve(value)
    }, (err: unknown) => {
      signal.removeEventListener('abort', onAbort)
      reject(err)
    })
  })
}

export type { StopReason }

/**
 * A random UUID as a flat string. randomUUID() concatenates its result piece by
 * piece, which V8 keeps as a rope of ~15 nodes (~400 bytes of heap); copied once
 * it is a 56-byte string, and a session id lives as long as its session.
 */
export function newSessionId (): string {
  return Buffer.from(randomUUID(), 'latin1').toString('latin1')
}

function toInfo (session: Session): SessionInfo {
  return {
    id: session.id,
    ref: session.ref,
    state: session.state,
    createdAt: session.createdAt,
    lastActivity: session.lastActivity,
    idleTimeoutMs: session.idleTimeoutMs,
    expiresAt: session.lastActivity + session.idleTimeoutMs
  }
}
