// Sessions: create / get / touch / ask / end / endAll / sweep. Framework-free.
//
// Ending a session removes it from the map synchronously, before its processes
// are torn down, so a request racing an end or a reap sees 404 at once and can
// never revive it or start a process in it.

import { randomUUID } from 'node:crypto'
import { EventEmitter, setMaxListeners } from 'node:events'
import type { AgentRun, AgentRunner, RunReport } from '../agents/types.js'
import { AgentSessionError, formatDuration, sessionNotFound, shuttingDown, type SessionEndReason } from '../errors.js'
import { silentLogger, type Logger } from '../logger.js'
import type { TeardownStage } from '../processes/terminate.js'

export type SessionState = 'idle' | 'busy' | 'closing'

export interface ConversationEntry {
  role: 'user' | 'assistant'
  content: string
  timestamp: number
}

/** A read-only view of a session. Times are epoch milliseconds. */
export interface SessionInfo {
  id: string
  chatId: string
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

export interface SessionManagerEvents {
  'session-started': [SessionInfo]
  'session-ended': [EndReport]
  'turn-finished': [{ sessionId: string, outcome: TurnOutcome, durationMs: number, code?: string }]
  'process-finished': [RunReport]
}

export interface SessionManagerOptions {
  runner: AgentRunner
  maxSessions: number
  sessionTimeoutMs: number
  maxSessionTimeoutMs: number
  askTimeoutMs: number
  /** Largest conversation log kept per session (oldest entries dropped). */
  maxHistory?: number
  /** How many ended ids, and for how long, are remembered to say why they are gone. */
  endedMemory?: { maxEntries: number, ttlMs: number }
  now?: () => number
  log?: Logger
}

interface Session {
  readonly id: string
  readonly chatId: string
  readonly createdAt: number
  readonly idleTimeoutMs: number
  state: SessionState
  lastActivity: number
  /** Cancels the turn in flight; set only while busy. */
  turn: AbortController | null
  /** Resolves when the last turn's processes are gone (a turn answers before its teardown ends). */
  settling: Promise<RunReport> | null
  history: ConversationEntry[] | null
}

interface EndedRecord { reason: SessionEndReason, idleMs: number, endedAt: number }

export class SessionManager extends EventEmitter<SessionManagerEvents> {
  readonly #sessions = new Map<string, Session>()
  readonly #ended = new Map<string, EndedRecord>()
  readonly #closing = new Map<string, Promise<EndReport>>()
  // Agent processes (create-chat, turns) whose teardown has not finished yet.
  readonly #running = new Set<Promise<RunReport>>()
  readonly #shutdown = new AbortController()
  #starting = 0
  #closed = false

  readonly #runner: AgentRunner
  readonly #now: () => number
  readonly #log: Logger
  readonly #options: Required<Omit<SessionManagerOptions, 'runner' | 'now' | 'log'>>

  constructor (options: SessionManagerOptions) {
    super()
    // Every start and turn in flight listens on the shutdown signal.
    setMaxListeners(0, this.#shutdown.signal)
    this.#runner = options.runner
    this.#now = options.now ?? Date.now
    this.#log = options.log ?? silentLogger
    this.#options = {
      maxSessions: options.maxSessions,
      sessionTimeoutMs: options.sessionTimeoutMs,
      maxSessionTimeoutMs: options.maxSessionTimeoutMs,
      askTimeoutMs: options.askTimeoutMs,
      maxHistory: options.maxHistory ?? 100,
      endedMemory: options.endedMemory ?? { maxEntries: 10_000, ttlMs: 60 * 60_000 }
    }
  }

  get closed (): boolean {
    return this.#closed
  }

  get defaultTimeoutMs (): number {
    return this.#options.sessionTimeoutMs
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
    let chatId: string
    try {
      chatId = await this.#track(this.#runner.createChat({ timeoutMs: this.#options.askTimeoutMs, signal: this.#shutdown.signal }))
    } finally {
      this.#starting--
    }
    if (this.#closed) throw shuttingDown()

    const now = this.#now()
    const session: Session = {
      id: newSessionId(),
      chatId,
      createdAt: now,
      idleTimeoutMs,
      state: 'idle',
      lastActivity: now,
      turn: null,
      settling: null,
      history: null
    }
    this.#sessions.set(session.id, session)
    const info = toInfo(session)
    this.#log.info({ sessionId: session.id, chatId, idleTimeoutMs, activeSessions: this.#sessions.size }, 'session started')
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
    return toInfo(session)
  }

  history (sessionId: string): ConversationEntry[] {
    return [...(this.#active(sessionId).history ?? [])]
  }

  /**
   * One turn. `onAccepted` runs once the session took the question (it exists
   * and was not busy), before the agent runs: where the caller logs it.
   */
  async ask (sessionId: string, question: string, options: { onAccepted?: () => void } = {}): Promise<{ answer: string, durationMs: number }> {
    const session = this.#active(sessionId)
    if (session.state === 'busy') {
      throw new AgentSessionError('SESSION_BUSY', 'This session is already answering a question: wait for it, then ask again',
        { retryAfterSeconds: 1 })
    }
    const controller = new AbortController()
    session.state = 'busy'
    session.turn = controller
    session.lastActivity = this.#now()
    const started = performance.now()
    try {
      options.onAccepted?.()
      // The previous turn answered but may still be tearing down; never run
      // two agent processes on one chat.
      if (session.settling !== null) await session.settling
      if (controller.signal.aborted) throw controller.signal.reason
      const run = this.#runner.startTurn({
        chatId: session.chatId,
        prompt: question,
        timeoutMs: this.#options.askTimeoutMs,
        signal: controller.signal
      })
      session.settling = this.#trackFinished(run.finished)
      const answer = await run.result
      this.#remember(session, 'user', question)
      this.#remember(session, 'assistant', answer.answer)
      this.emit('turn-finished', { sessionId, outcome: 'answered', durationMs: performance.now() - started })
      return answer
    } catch (err) {
      const code = err instanceof AgentSessionError ? err.code : 'INTERNAL_SERVER_ERROR'
      const outcome: TurnOutcome = code === 'REQUEST_TIMEOUT'
        ? 'timeout'
        : controller.signal.aborted ? 'cancelled' : 'failed'
      this.emit('turn-finished', { sessionId, outcome, durationMs: performance.now() - started, code })
      throw err
    } finally {
      if (session.state === 'busy') {
        session.state = 'idle'
        session.turn = null
        session.lastActivity = this.#now()
      }
    }
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
    session.state = 'closing'
    this.#rememberEnded(sessionId, { reason, idleMs, endedAt: now })
    session.turn?.abort(reason === 'shutdown'
      ? shuttingDown()
      : sessionNotFound(sessionId, { reason, idleMs }))

    const teardown = (async (): Promise<EndReport> => {
      const run = session.settling === null ? null : await session.settling
      const report: EndReport = {
        sessionId,
        reason,
        idleMs,
        ageMs: now - session.createdAt,
        stage: run?.teardown.stage ?? 'exited',
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
    await Promise.all(this.#running)
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

  /** The agent's version, or null when its binary does not answer (for health checks). */
  agentVersion (): Promise<string | null> {
    return this.#runner.version()
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

  #remember (session: Session, role: ConversationEntry['role'], content: string): void {
    session.history ??= []
    session.history.push({ role, content, timestamp: this.#now() })
    if (session.history.length > this.#options.maxHistory) session.history.shift()
  }

  #track<T> (run: AgentRun<T>): Promise<T> {
    void this.#trackFinished(run.finished)
    return run.result
  }

  #trackFinished (finished: Promise<RunReport>): Promise<RunReport> {
    this.#running.add(finished)
    return finished.then((report) => {
      this.#running.delete(finished)
      this.emit('process-finished', report)
      return report
    })
  }
}

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
    chatId: session.chatId,
    state: session.state,
    createdAt: session.createdAt,
    lastActivity: session.lastActivity,
    idleTimeoutMs: session.idleTimeoutMs,
    expiresAt: session.lastActivity + session.idleTimeoutMs
  }
}
