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
import type { SessionStore, StoredSession, StoredTurn } from './store.js'

export type { SessionState }

/**
 * One turn of the conversation, as GET /api/session/history shows it: the
 * answer is '' when the turn failed (then `error` holds its code).
 */
export type TurnRecord = StoredTurn

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
  /** A session's live agent was stopped; the next ask brings it back with the conversation. */
  'session-hibernated': [{ sessionId: string, why: HibernateReason }]
  /** A hibernated session's agent was brought back (or could not be). */
  'session-resumed': [{ sessionId: string, ok: boolean, durationMs: number }]
  /** A session another instance of the cluster ran is now run here (hibernated until its next ask). */
  'session-adopted': [SessionInfo]
}

/** Why a live agent was stopped: idle past AGENT_IDLE_TIMEOUT, to make room under MAX_LIVE_AGENTS, or the server stopping with a store. */
export type HibernateReason = 'idle' | 'capacity' | 'shutdown'

export interface SessionManagerOptions {
  driver: AgentDriver
  maxSessions: number
  /** Sessions one client may hold at once (starts in progress count); only creates that name a client are counted. */
  maxSessionsPerClient?: number
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
  /** A live agent whose last turn ended this long ago is stopped (hibernated); 0 never. */
  agentIdleTimeoutMs?: number
  /** Most live agent processes at once; to make room the least recently used idle one hibernates. */
  maxLiveAgents?: number
  /** How long a start or resume waits for a live agent to free up when every one is busy. */
  liveAgentWaitMs?: number
  /** Where sessions are kept across restarts; without one, a shutdown ends them. */
  store?: SessionStore
  /** The working directory agents run in (kept with each stored session). */
  workspaceDir?: string
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
  /** When its last turn ended (its start before the first): the clock AGENT_IDLE_TIMEOUT runs on. */
  lastTurnEndedAt: number
  /** The live agent being stopped (hibernation): a resume waits for it to be gone first. */
  suspending: Promise<unknown> | null
  /** null once it is gone for good; a dead one (not alive) is resumed by the next ask. */
  conversation: AgentConversation | null
  /** Aborts the ask in flight (end, shutdown); set only while busy. */
  turn: AbortController | null
  /** A cancel that came before the turn reached the agent (while its agent was being brought back). */
  cancelRequested: boolean
  history: TurnRecord[] | null
  /** Warns the session's subscribers before the reaper would end it; set only while someone listens. */
  expiryTimer: NodeJS.Timeout | null
  /**
   * Taken over from another instance that is gone (a cluster), and not yet
   * brought back here: if its conversation cannot be continued on this
   * instance, the session ends with reason instance_lost.
   */
  adopted: boolean
  /** Whose per-client budget the session counts against; null when created without a client. */
  readonly client: ClientSlot | null
}

/** One client's count of sessions (and starts in progress); shared by its sessions. */
interface ClientSlot { readonly key: string, count: number }

interface EndedRecord { reason: SessionEndReason, idleMs: number, endedAt: number }

const EXITED: ProcessReport = { pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }

export class SessionManager extends EventEmitter<SessionManagerEvents> {
  readonly #sessions = new Map<string, Session>()
  readonly #ended = new Map<string, EndedRecord>()
  readonly #closing = new Map<string, Promise<EndReport>>()
  readonly #clients = new Map<string, ClientSlot>()
  readonly #shutdown = new AbortController()
  readonly #events = new SessionEvents()
  readonly #permissions: PendingPermissions
  readonly #store: SessionStore | null
  // Wakes starts and resumes waiting for a live agent slot.
  readonly #slotFreed = new EventEmitter()
  #starting = 0
  // Live agents being started or brought back: each will hold a slot under MAX_LIVE_AGENTS.
  #pendingLive = 0
  #closed = false

  readonly #driver: AgentDriver
  readonly #now: () => number
  readonly #log: Logger
  readonly #options: Required<Omit<SessionManagerOptions, 'driver' | 'now' | 'log' | 'store'>>

  constructor (options: SessionManagerOptions) {
    super()
    // Every start and turn in flight listens on the shutdown signal.
    setMaxListeners(0, this.#shutdown.signal)
    this.#driver = options.driver
    this.#now = options.now ?? Date.now
    this.#log = options.log ?? silentLogger
    this.#options = {
      maxSessions: options.maxSessions,
      maxSessionsPerClient: options.maxSessionsPerClient ?? Number.POSITIVE_INFINITY,
      sessionTimeoutMs: options.sessionTimeoutMs,
      maxSessionTimeoutMs: options.maxSessionTimeoutMs,
      askTimeoutMs: options.askTimeoutMs,
      startTimeoutMs: options.startTimeoutMs ?? options.askTimeoutMs,
      permissionPolicy: options.permissionPolicy ?? 'reject',
      permissionTimeoutMs: options.permissionTimeoutMs ?? 60_000,
      expiryWarningMs: options.expiryWarningMs ?? 60_000,
      maxHistory: options.maxHistory ?? 100,
      endedMemory: options.endedMemory ?? { maxEntries: 10_000, ttlMs: 60 * 60_000 },
      agentIdleTimeoutMs: options.agentIdleTimeoutMs ?? 0,
      maxLiveAgents: options.maxLiveAgents ?? Infinity,
      liveAgentWaitMs: options.liveAgentWaitMs ?? 5000,
      workspaceDir: options.workspaceDir ?? ''
    }
    this.#slotFreed.setMaxListeners(0)
    this.#store = options.store ?? null
    this.#store?.attach({
      sessions: () => [...this.#sessions.values()].map((session) => this.#stored(session)),
      ended: () => [...this.#ended].map(([id, record]) => ({ id, ...record }))
    })
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

  /**
   * Starts a session. `client` (the caller's address) puts it in that client's
   * budget of maxSessionsPerClient, so one client cannot hold every slot.
   */
  async create (options: { idleTimeoutMs?: number, client?: string } = {}): Promise<SessionInfo> {
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
    const client = options.client === undefined ? null : this.#clientSlot(options.client)
    if (client !== null && client.count >= this.#options.maxSessionsPerClient) {
      throw new AgentSessionError('CLIENT_SESSION_LIMIT_REACHED',
        `This client already holds its maximum of ${this.#options.maxSessionsPerClient} sessions (MAX_SESSIONS_PER_CLIENT): ` +
        'end one or try again later', { retryAfterSeconds: 30 })
    }
    this.#starting++
    if (client !== null) client.count++
    let conversation: AgentConversation
    try {
      conversation = await this.#withLiveSlot(this.#shutdown.signal,
        async () => await this.#driver.open({ timeoutMs: this.#options.startTimeoutMs, signal: this.#shutdown.signal }))
    } catch (err) {
      if (client !== null) this.#releaseClient(client)
      throw err
    } finally {
      this.#starting--
    }
    if (this.#closed) {
      if (client !== null) this.#releaseClient(client)
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
      lastTurnEndedAt: now,
      suspending: null,
      conversation,
      turn: null,
      cancelRequested: false,
      history: null,
      expiryTimer: null,
      adopted: false,
      client
    }
    this.#sessions.set(session.id, session)
    this.#watch(session, conversation)
    // The id a client gets must survive a crash right after it: the start answers once it is written.
    try {
      await this.#store?.saved(this.#stored(session))
    } catch (err) {
      // A shared store that cannot register the session (a cluster without Redis): no id nobody else could find.
      if (this.#sessions.get(session.id) === session) {
        this.#sessions.delete(session.id)
        if (session.client !== null) this.#releaseClient(session.client)
        void conversation.close().catch(() => {})
      }
      throw err
    }
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
    this.#store?.touched(this.#stored(session))
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
  subscribe (sessionId: string, listener: (event: NumberedEvent | { id: null, event: StreamEvent } | null) => void, lastEventId?: number): () => void {
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
    const wasHibernated = session.state === 'hibernated'
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
      // The usual case starts the turn without waiting a tick; a hibernated or dead agent is brought back first.
      const conversation = session.conversation?.alive === true
        ? session.conversation
        : await untilAborted(this.#liveConversation(session, controller.signal, wasHibernated), controller.signal)
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
      session.adopted = false
      this.#events.publish(sessionId, { type: 'answer', answer: result.answer, stopReason: result.stopReason })
      const outcome: TurnOutcome = result.stopReason === 'cancelled' ? 'cancelled' : 'answered'
      this.emit('turn-finished', { sessionId, outcome, durationMs: performance.now() - started })
      return result
    } catch (caught) {
      let err = caught
      // An agent without a live process (cursor) finds out on the first turn that the lost instance's chat is not here.
      if (session.adopted && err instanceof AgentSessionError && err.code === 'AGENT_CHAT_NOT_FOUND') err = instanceLost(sessionId, err)
      const apiError = err instanceof AgentSessionError ? err : undefined
      const code = apiError?.code ?? 'INTERNAL_SERVER_ERROR'
      const outcome: TurnOutcome = code === 'REQUEST_TIMEOUT'
        ? 'timeout'
        : controller.signal.aborted ? 'cancelled' : 'failed'
      record('', null, code)
      this.#events.publish(sessionId, { type: 'error', error: code, details: apiError?.message ?? 'Internal server error' })
      this.emit('turn-finished', { sessionId, outcome, durationMs: performance.now() - started, code })
      // Never a blank conversation instead of the one that could not come back.
      if (code === 'RESUME_FAILED' && this.#sessions.get(sessionId) === session) void this.end(sessionId, 'resume_failed')
      if (apiError?.extra.reason === 'instance_lost' && this.#sessions.get(sessionId) === session) void this.end(sessionId, 'instance_lost')
      throw err
    } finally {
      // An end during the turn has moved it on to closing: then it stays so.
      if ((session.state as SessionState) === 'busy') {
        session.turn = null
        session.lastActivity = this.#now()
        session.lastTurnEndedAt = session.lastActivity
        this.#store?.touched(this.#stored(session))
        this.#setState(session, session.conversation === null ? 'hibernated' : 'idle')
        this.#slotFreed.emit('freed')
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
    if (session.client !== null) this.#releaseClient(session.client)
    this.#setState(session, 'closing')
    this.#clearExpiryWarning(session)
    this.#events.publish(sessionId, { type: 'ended', reason })
    this.#events.close(sessionId)
    this.#rememberEnded(sessionId, { reason, idleMs, endedAt: now })
    this.#store?.ended({ id: sessionId, reason, idleMs, endedAt: now })
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
      this.#slotFreed.emit('freed')
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
    const hibernating: Array<Promise<void>> = []
    const idleAgentMs = this.#options.agentIdleTimeoutMs
    for (const session of this.#sessions.values()) {
      checked++
      if (session.state !== 'idle' && session.state !== 'hibernated') continue
      if (now - session.lastActivity >= session.idleTimeoutMs) {
        ending.push(this.end(session.id, 'expired'))
      } else if (idleAgentMs > 0 && session.state === 'idle' && now - session.lastTurnEndedAt >= idleAgentMs) {
        hibernating.push(this.#hibernate(session, 'idle'))
      }
    }
    if (hibernating.length > 0) await Promise.allSettled(hibernating)
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

  /**
   * Refuses new work and cancels everything in flight. With a store, every
   * session hibernates (its agent stopped without ending the conversation) and
   * is written out for the next start; without one, every session ends.
   */
  async shutdown (): Promise<EndReport[]> {
    if (!this.#closed) {
      this.#closed = true
      this.#shutdown.abort(shuttingDown())
    }
    if (this.#store === null) return await this.endAll('shutdown')
    await Promise.allSettled([...this.#sessions.values()].map(async (session) => await this.#hibernate(session, 'shutdown')))
    await Promise.allSettled(this.#closing.values())
    await this.#driver.drain()
    for (const id of this.#sessions.keys()) this.#events.close(id)
    await this.#store.close()
    return []
  }

  /** Brings back what the store kept from an earlier run: every session hibernated, the ended ids with their reasons. */
  async restore (): Promise<{ sessions: number, ended: number }> {
    if (this.#store === null) return { sessions: 0, ended: 0 }
    const snapshot = await this.#store.load()
    for (const ended of snapshot.ended.sort((a, b) => a.endedAt - b.endedAt)) {
      this.#ended.set(ended.id, { reason: ended.reason, idleMs: ended.idleMs, endedAt: ended.endedAt })
    }
    for (const stored of snapshot.sessions) {
      if (this.#sessions.has(stored.id) || this.#ended.has(stored.id)) continue
      this.#sessions.set(stored.id, this.#hibernatedFrom(stored, false))
    }
    this.#log.info({ sessions: snapshot.sessions.length, ended: snapshot.ended.length }, 'sessions restored from the store')
    return { sessions: snapshot.sessions.length, ended: snapshot.ended.length }
  }

  /**
   * Takes over a session another instance of a cluster ran (it is gone, or it
   * let the session go when it stopped): here it is hibernated, and its next
   * ask brings its agent back with the conversation, where the agent's storage
   * is shared; where it is not, that ask ends it with reason instance_lost.
   * The caller has made this instance its owner in the shared store first.
   * MAX_SESSIONS does not apply: a session that exists is never refused.
   */
  adopt (stored: StoredSession): SessionInfo {
    if (this.#closed) throw shuttingDown()
    const existing = this.#sessions.get(stored.id)
    if (existing !== undefined) return toInfo(existing)
    const session = this.#hibernatedFrom(stored, true)
    this.#sessions.set(stored.id, session)
    this.#ended.delete(stored.id)
    this.#log.info({ sessionId: stored.id, agent: stored.ref, idleMs: this.#now() - stored.lastActivity }, 'session adopted')
    this.emit('session-adopted', toInfo(session))
    return toInfo(session)
  }

  /**
   * Lets a session go without ending it: another instance owns it now (this
   * one lost touch with the cluster's store for longer than its liveness). Its
   * agent is stopped as in hibernation; nothing is written to the store.
   */
  async evict (sessionId: string): Promise<void> {
    const session = this.#sessions.get(sessionId)
    if (session === undefined) return
    this.#sessions.delete(sessionId)
    if (session.client !== null) this.#releaseClient(session.client)
    this.#clearExpiryWarning(session)
    const moved = new AgentSessionError('INSTANCE_UNREACHABLE', 'This session moved to another instance: send the request again',
      { retryAfterSeconds: 1 })
    session.turn?.abort(moved)
    session.conversation?.cancel()
    this.#events.close(sessionId)
    const conversation = session.conversation
    session.conversation = null
    session.state = 'closing'
    this.#log.warn({ sessionId }, 'session now owned by another instance: let go here')
    if (conversation !== null) {
      try {
        await conversation.suspend()
      } catch (err) {
        this.#log.error({ err, sessionId }, 'stopping the agent failed')
      }
    }
    this.#slotFreed.emit('freed')
  }

  /** Whether this instance runs the session now. */
  has (sessionId: string): boolean {
    return this.#sessions.has(sessionId)
  }

  /**
   * Room for one more session here: free session slots under MAX_SESSIONS,
   * and live agents that could start without waiting (free slots under
   * MAX_LIVE_AGENTS, plus idle live agents that would hibernate to make room).
   */
  capacity (): { sessions: number, liveAgents: number } {
    const sessions = Math.max(0, this.#options.maxSessions - this.#sessions.size - this.#starting)
    if (!this.#driver.keepsProcesses || this.#options.maxLiveAgents === Infinity) return { sessions, liveAgents: sessions }
    let idleLive = 0
    for (const session of this.#sessions.values()) if (session.state === 'idle' && session.conversation?.pid != null) idleLive++
    const free = this.#options.maxLiveAgents - this.agentCounts().live - this.#pendingLive
    return { sessions, liveAgents: Math.max(0, free) + idleLive }
  }

  #hibernatedFrom (stored: StoredSession, adopted: boolean): Session {
    return {
      id: stored.id,
      createdAt: stored.createdAt,
      idleTimeoutMs: stored.idleTimeoutMs,
      ref: stored.ref,
      state: 'hibernated',
      lastActivity: stored.lastActivity,
      lastTurnEndedAt: stored.lastTurnEndedAt,
      suspending: null,
      conversation: null,
      turn: null,
      cancelRequested: false,
      history: stored.history.length === 0 ? null : stored.history.slice(-this.#options.maxHistory),
      expiryTimer: null,
      adopted,
      client: stored.client === undefined ? null : this.#countClient(stored.client)
    }
  }

  /** Stops idle live agents now (AGENT_IDLE_TIMEOUT's work, on demand). */
  async hibernate (sessionId: string): Promise<void> {
    await this.#hibernate(this.#active(sessionId), 'idle')
  }

  list (): SessionInfo[] {
    return [...this.#sessions.values()].map(toInfo)
  }

  /** Sessions with a live agent process, and sessions whose agent is stopped until their next ask. */
  agentCounts (): { live: number, hibernated: number } {
    let live = 0
    let hibernated = 0
    for (const session of this.#sessions.values()) {
      if (session.state === 'hibernated') hibernated++
      else if (session.conversation?.pid != null) live++
    }
    return { live, hibernated }
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

  /** The session's conversation, brought back in a new process when it was hibernated or its agent died. */
  async #liveConversation (session: Session, signal: AbortSignal, wasHibernated: boolean): Promise<AgentConversation> {
    const current = session.conversation
    if (current?.alive === true) return current
    // A hibernation still stopping the old process finishes first: never two agents on one conversation.
    if (session.suspending !== null) await session.suspending
    const info = await this.#driver.info()
    if (!info.canResume) {
      await this.#endIfUnresumable(session)
      throw sessionNotFound(session.id, this.#endedRecord(session.id))
    }
    const started = performance.now()
    let conversation: AgentConversation
    try {
      conversation = await this.#withLiveSlot(signal,
        async () => await this.#driver.resume(session.ref, { timeoutMs: this.#options.startTimeoutMs, signal }))
    } catch (err) {
      if (signal.aborted) throw err
      // A full house is not the conversation's fault: the session stays, the client retries.
      if (err instanceof AgentSessionError && err.code === 'LIVE_AGENT_LIMIT_REACHED') throw err
      this.#log.error({ err, sessionId: session.id, agent: session.ref, adopted: session.adopted }, 'resuming the agent failed')
      this.emit('session-resumed', { sessionId: session.id, ok: false, durationMs: performance.now() - started })
      // Taken over from a lost instance whose agent storage this one does not share: the conversation is gone with it.
      if (session.adopted) throw instanceLost(session.id, err)
      // The ask ends the session once it has answered with this error (an end now would answer it 404 instead).
      throw new AgentSessionError('RESUME_FAILED',
        'The agent could not continue this conversation in a new process; the session has ended: start a new one', { cause: err })
    }
    if (signal.aborted || this.#sessions.get(session.id) !== session) {
      void conversation.close()
      throw signal.reason
    }
    session.conversation = conversation
    // `adopted` stays until a turn answered: an agent without a live process (cursor) only finds out then that the chat is not here.
    this.#watch(session, conversation)
    const durationMs = performance.now() - started
    this.emit('session-resumed', { sessionId: session.id, ok: true, durationMs })
    this.#log.info({ sessionId: session.id, agent: session.ref, pid: conversation.pid, resumeMs: Math.round(durationMs), hibernated: wasHibernated },
      wasHibernated ? 'session resumed' : 'agent restarted with the conversation')
    return conversation
  }

  /** Stops a session's live agent but keeps the conversation (never session/close: it would forfeit session/load). */
  async #hibernate (session: Session, why: HibernateReason): Promise<void> {
    if (why !== 'shutdown' && (session.state !== 'idle' || session.conversation === null)) return
    if (why === 'shutdown' && (session.state === 'closing' || session.state === 'hibernated')) return
    const conversation = session.conversation
    // An agent that cannot continue a conversation in a new process is never stopped early.
    if (why !== 'shutdown' && (!this.#driver.keepsProcesses || !(await this.#driver.info()).canResume)) return
    if (why !== 'shutdown' && (session.state !== 'idle' || session.conversation !== conversation)) return
    if (session.state === 'busy') {
      // Shutting down with a store: the ask is answered 503 and its turn cancelled.
      session.turn?.abort(shuttingDown())
      conversation?.cancel()
    }
    session.conversation = null
    this.#clearExpiryWarning(session)
    this.#setState(session, 'hibernated')
    const idleMs = this.#now() - session.lastTurnEndedAt
    const stopping = conversation === null ? Promise.resolve(EXITED) : conversation.suspend()
    session.suspending = stopping
    let report = EXITED
    try {
      report = await stopping
    } catch (err) {
      this.#log.error({ err, sessionId: session.id }, 'stopping the agent failed')
    } finally {
      if (session.suspending === stopping) session.suspending = null
    }
    this.#log.info({ sessionId: session.id, why, idleMs, processes: report.teardown.stage }, 'session hibernated')
    this.emit('session-hibernated', { sessionId: session.id, why })
    this.#slotFreed.emit('freed')
  }

  /**
   * Under MAX_LIVE_AGENTS, makes room for one more live agent: the least
   * recently used idle one hibernates; when every live agent is busy, waits a
   * little for one to be free, then answers 503.
   */
  async #withLiveSlot (signal: AbortSignal, start: () => Promise<AgentConversation>): Promise<AgentConversation> {
    if (!this.#driver.keepsProcesses) return await start()
    await this.#makeRoomForLiveAgent(signal)
    this.#pendingLive++
    try {
      return await start()
    } finally {
      this.#pendingLive--
    }
  }

  async #makeRoomForLiveAgent (signal: AbortSignal): Promise<void> {
    if (this.#options.maxLiveAgents === Infinity) return
    const deadline = performance.now() + this.#options.liveAgentWaitMs
    for (;;) {
      // Agents being started or brought back hold a slot each.
      if (this.agentCounts().live + this.#pendingLive < this.#options.maxLiveAgents) return
      let oldest: Session | null = null
      for (const session of this.#sessions.values()) {
        if (session.state !== 'idle' || session.conversation?.pid == null) continue
        if (oldest === null || session.lastTurnEndedAt < oldest.lastTurnEndedAt) oldest = session
      }
      if (oldest !== null && (await this.#driver.info()).canResume) {
        await this.#hibernate(oldest, 'capacity')
        continue
      }
      const left = deadline - performance.now()
      if (left <= 0 || signal.aborted) {
        throw new AgentSessionError('LIVE_AGENT_LIMIT_REACHED',
          `All ${this.#options.maxLiveAgents} live agents (MAX_LIVE_AGENTS) are answering questions: try again shortly`,
          { retryAfterSeconds: 5 })
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(done, left)
        function done (): void {
          clearTimeout(timer)
          resolve()
        }
        this.#slotFreed.once('freed', done)
      })
    }
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

  #stored (session: Session): StoredSession {
    return {
      id: session.id,
      ref: session.ref,
      workspaceDir: this.#options.workspaceDir,
      createdAt: session.createdAt,
      lastActivity: session.lastActivity,
      lastTurnEndedAt: session.lastTurnEndedAt,
      idleTimeoutMs: session.idleTimeoutMs,
      history: session.history ?? [],
      ...(session.client === null ? {} : { client: session.client.key })
    }
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

  #clientSlot (key: string): ClientSlot {
    let slot = this.#clients.get(key)
    if (slot === undefined) {
      slot = { key, count: 0 }
      this.#clients.set(key, slot)
    }
    return slot
  }

  #countClient (key: string): ClientSlot {
    const slot = this.#clientSlot(key)
    slot.count++
    return slot
  }

  #releaseClient (slot: ClientSlot): void {
    slot.count--
    if (slot.count <= 0) this.#clients.delete(slot.key)
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

function instanceLost (sessionId: string, cause: unknown): AgentSessionError {
  const err = sessionNotFound(sessionId, { reason: 'instance_lost' })
  return new AgentSessionError(err.code, err.message, { extra: err.extra, cause })
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
