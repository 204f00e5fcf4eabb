// The session store of a cluster: every session in Redis with its owner (the
// instance that runs it), the ended ids with their reasons. The same
// interface as the embedded file store, plus what a cluster needs beyond it:
// a session's record and owner, an atomic claim, the release of every
// session when the instance stops, and the reaping of sessions whose owner is
// gone. Activity times are batched (at most one write per session per
// batchMs); creations are written before the start answers; ends at once, and
// again later while Redis cannot be reached.

import { randomUUID } from 'node:crypto'
import type { Redis } from 'ioredis'
import { AgentSessionError, type SessionEndReason } from '../errors.js'
import type { Logger } from '../logger.js'
import type { SessionStore, StoreHealth, StoreSnapshot, StoreSource, StoredEnded, StoredSession } from '../sessions/store.js'
import { ClusterKeys, queueScript, runScript } from './redis.js'

export interface RedisStoreOptions {
  redis: Redis
  keys: ClusterKeys
  instanceId: string
  log: Logger
  /** How long ended ids are remembered (the manager's own memory of them). */
  endedTtlMs?: number
  /** Longest a change of activity times waits before it is written. */
  batchMs?: number
}

/** What the store knows of a session: its record and who runs it. */
export type Lookup =
  /** Not in Redis; `secret` is the cluster's secret as Redis has it now ('' when it has none). */
  | { kind: 'unknown', secret: string }
  | { kind: 'ended', reason: SessionEndReason, idleMs: number }
  /** A live instance runs it. */
  | { kind: 'owned', owner: string, url: string }
  /** Its owner is gone, or released it when it stopped ('' then): any instance may claim it. `secret` as for unknown. */
  | { kind: 'orphan', owner: string, secret: string }

export type Claim =
  | { outcome: 'claimed', from: string, stored: StoredSession }
  | { outcome: 'owned', owner: string }
  | { outcome: 'gone' }

const DEFAULT_BATCH_MS = 1000
const DEFAULT_ENDED_TTL_MS = 60 * 60_000

export function stateUnavailable (cause?: unknown): AgentSessionError {
  return new AgentSessionError('STATE_UNAVAILABLE',
    'The cluster\'s shared state (Redis) cannot be reached: try again shortly', { retryAfterSeconds: 2, cause })
}

export class RedisStore implements SessionStore {
  readonly #redis: Redis
  readonly #keys: ClusterKeys
  readonly #me: string
  readonly #log: Logger
  readonly #batchMs: number
  readonly #endedTtlMs: number
  #source: StoreSource | null = null
  /** Sessions whose activity (or history) changed since the last batch. */
  readonly #touched = new Map<string, StoredSession>()
  /** Ends not written yet (Redis unreachable): retried with every batch. */
  readonly #ended = new Map<string, StoredEnded>()
  /** What was last written of each session's history: unchanged history is not sent again. */
  readonly #historyMark = new Map<string, string>()
  #timer: NodeJS.Timeout | null = null
  /** Something pending must go out at once (an end, a turn, a flush), not with the next batch. */
  #urgent = false
  #writing: Promise<void> | null = null
  #lastError: string | null = null
  #closed: Promise<void> | null = null
  /** Called for a session this instance holds that another instance owns now (it lost touch for too long). */
  onLost: (sessionId: string) => void = () => {}
  /** Called on close right before the sessions are released (the liveness key must stop being written first). */
  beforeRelease: () => void = () => {}

  constructor (options: RedisStoreOptions) {
    this.#redis = options.redis
    this.#keys = options.keys
    this.#me = options.instanceId
    this.#log = options.log
    this.#batchMs = options.batchMs ?? DEFAULT_BATCH_MS
    this.#endedTtlMs = options.endedTtlMs ?? DEFAULT_ENDED_TTL_MS
  }

  get instanceId (): string {
    return this.#me
  }

  /** Nothing to restore: a session another instance ran is taken over when a request for it comes (claim). */
  async load (): Promise<StoreSnapshot> {
    return { sessions: [], ended: [] }
  }

  attach (source: StoreSource): void {
    this.#source = source
  }

  async saved (session: StoredSession): Promise<void> {
    try {
      const written = await runScript(this.#redis, 'agentSessionsSave', ...this.#saveArgs(session))
      this.#ok()
      if (written === 0) this.onLost(session.id)
    } catch (err) {
      this.#failed(err, 'registering a session in Redis failed')
      throw stateUnavailable(err)
    }
  }

  touched (session: StoredSession): void {
    this.#touched.set(session.id, session)
    // A turn that ended is written at once: an instance that dies a moment later must not take it along.
    if (this.#historyMark.get(session.id) !== historyMark(session)) {
      this.#urgent = true
      this.#writeSoon()
    } else {
      this.#schedule()
    }
  }

  ended (record: StoredEnded): void {
    this.#touched.delete(record.id)
    this.#historyMark.delete(record.id)
    this.#ended.set(record.id, record)
    // An end is written at once (other instances must answer 404 with its reason), not with the next batch.
    this.#urgent = true
    this.#writeSoon()
  }

  async flush (): Promise<void> {
    if (this.#timer !== null) {
      clearTimeout(this.#timer)
      this.#timer = null
    }
    // Everything pending now goes out, with the batch in flight or right after it.
    this.#urgent = true
    this.#writeSoon()
    while (this.#writing !== null) await this.#writing
  }

  /** Writes what is pending, then lets every session of this instance go (they are hibernated by now). */
  async close (): Promise<void> {
    this.#closed ??= (async () => {
      await this.flush()
      this.beforeRelease()
      try {
        const released = await runScript(this.#redis, 'agentSessionsRelease',
          this.#keys.owned(this.#me), this.#keys.unowned, this.#keys.instances, this.#keys.instance(this.#me),
          this.#keys.prefix, this.#me) as number
        this.#log.info({ released, instanceId: this.#me }, 'sessions released for the other instances')
      } catch (err) {
        // Then they are taken over once this instance's liveness key expires.
        this.#failed(err, 'releasing the sessions in Redis failed')
      }
    })()
    await this.#closed
  }

  health (): StoreHealth {
    const connected = this.#redis.status === 'ready'
    return { kind: 'redis', ok: connected && this.#lastError === null, lastError: connected ? this.#lastError : this.#lastError ?? `Redis connection ${this.#redis.status}` }
  }

  /** Where a session is: unknown, ended (with why), run by a live instance (with its URL), or orphaned. */
  async lookup (sessionId: string): Promise<Lookup> {
    let reply: string[]
    try {
      reply = await runScript(this.#redis, 'agentSessionsLookup', this.#keys.session(sessionId), this.#keys.ended(sessionId), this.#keys.prefix) as string[]
      this.#ok()
    } catch (err) {
      this.#failed(err, 'looking a session up in Redis failed')
      throw stateUnavailable(err)
    }
    switch (reply[0]) {
      case 'ended': {
        const ended = parseJson(reply[1]) as { reason?: SessionEndReason, idleMs?: number } | null
        return { kind: 'ended', reason: ended?.reason ?? 'ended', idleMs: Number(ended?.idleMs ?? 0) }
      }
      case 'owned': {
        const live = parseJson(reply[2]) as { url?: string } | null
        if (typeof live?.url === 'string') return { kind: 'owned', owner: reply[1], url: live.url }
        // A liveness record that cannot be read: as good as none (the secret is not at hand; '' never matches).
        return { kind: 'orphan', owner: reply[1], secret: '' }
      }
      case 'orphan':
        return { kind: 'orphan', owner: reply[1], secret: String(reply[2] ?? '') }
      default:
        return { kind: 'unknown', secret: String(reply[1] ?? '') }
    }
  }

  /**
   * Takes a place in the client's budget of `limit` sessions across the
   * cluster for a start in flight: its token, or null when the client's
   * sessions and starts in flight already fill it. The place lapses after
   * ttlMs unless given back (releaseClientPlace) first.
   */
  async reserveClientPlace (client: string, limit: number, ttlMs: number): Promise<string | null> {
    const token = `${this.#me}:${randomUUID()}`
    try {
      const taken = await runScript(this.#redis, 'agentSessionsReserveClient',
        this.#keys.client(client), this.#keys.clientStarting(client), limit, token, Math.max(1, Math.ceil(ttlMs)))
      this.#ok()
      return taken === 1 ? token : null
    } catch (err) {
      // The script may still have run (a reply that came too late): the place must not stay held until it lapses.
      this.#redis.zrem(this.#keys.clientStarting(client), token).catch(() => {})
      this.#failed(err, 'counting a client\'s sessions in Redis failed')
      throw stateUnavailable(err)
    }
  }

  /** Gives back a place taken by reserveClientPlace (the start answered: its session, if any, counts itself now). */
  async releaseClientPlace (client: string, token: string): Promise<void> {
    try {
      await this.#redis.zrem(this.#keys.clientStarting(client), token)
    } catch (err) {
      // It lapses by itself.
      this.#failed(err, 'giving back a client\'s place in Redis failed')
    }
  }

  /** Makes this instance the session's owner, atomically: only when no live instance owns it. */
  async claim (sessionId: string): Promise<Claim> {
    let reply: Array<string | number>
    try {
      reply = await runScript(this.#redis, 'agentSessionsClaim',
        this.#keys.session(sessionId), this.#keys.owned(this.#me), this.#keys.unowned, this.#me, this.#keys.prefix, sessionId) as Array<string | number>
      this.#ok()
    } catch (err) {
      this.#failed(err, 'claiming a session in Redis failed')
      throw stateUnavailable(err)
    }
    if (Number(reply[0]) === 0) return { outcome: 'gone' }
    if (Number(reply[0]) === 2) return { outcome: 'owned', owner: String(reply[1]) }
    const fields: Record<string, string> = {}
    for (let i = 2; i + 1 < reply.length; i += 2) fields[String(reply[i])] = String(reply[i + 1])
    const stored = parseStored(sessionId, fields)
    if (stored === null) return { outcome: 'gone' }
    this.#historyMark.set(sessionId, historyMark(stored))
    return { outcome: 'claimed', from: String(reply[1]), stored }
  }

  /**
   * Ends the sessions that expired while no live instance owned them (their
   * instance died, or stopped and released them). Each is ended by exactly one
   * caller however many instances sweep at once. Returns the ids this call ended.
   */
  async reapOrphans (sessionIds: Iterable<string>, now: number): Promise<string[]> {
    const ids = [...sessionIds]
    if (ids.length === 0) return []
    const pipeline = this.#redis.pipeline()
    for (const id of ids) {
      queueScript(pipeline, 'agentSessionsReap', this.#keys.session(id), this.#keys.ended(id), this.#keys.unowned,
        this.#keys.prefix, id, now, this.#endedTtlMs, this.#me)
    }
    const results = await pipeline.exec() ?? []
    return ids.filter((_id, i) => results[i]?.[0] === null && results[i]?.[1] === 1)
  }

  /**
   * After Redis was out of reach (or came back empty): writes again every
   * session this instance runs, and lets go (onLost) of those another instance
   * has taken over or ended meanwhile.
   */
  async reconcile (): Promise<{ rewritten: number, lost: number }> {
    if (this.#source === null) return { rewritten: 0, lost: 0 }
    const sessions = [...this.#source.sessions()]
    if (sessions.length === 0) return { rewritten: 0, lost: 0 }
    const pipeline = this.#redis.pipeline()
    for (const session of sessions) queueScript(pipeline, 'agentSessionsSave', ...this.#saveArgs(session))
    const results = await pipeline.exec() ?? []
    let lost = 0
    for (const [i, session] of sessions.entries()) {
      const [err, written] = results[i] ?? [new Error('no reply'), null]
      if (err !== null) throw err
      if (written === 0) {
        lost++
        this.onLost(session.id)
      }
    }
    this.#ok()
    return { rewritten: sessions.length - lost, lost }
  }

  #saveArgs (session: StoredSession): Array<string | number> {
    const mark = historyMark(session)
    this.#historyMark.set(session.id, mark)
    return [
      this.#keys.session(session.id), this.#keys.owned(this.#me), this.#keys.unowned, this.#keys.ended(session.id),
      this.#keys.client(session.client ?? ''),
      this.#me, session.id,
      'ref', JSON.stringify(session.ref),
      'workspaceDir', session.workspaceDir,
      'createdAt', session.createdAt,
      'idleTimeoutMs', session.idleTimeoutMs,
      'lastActivity', session.lastActivity,
      'lastTurnEndedAt', session.lastTurnEndedAt,
      'history', JSON.stringify(session.history),
      'client', session.client ?? ''
    ]
  }

  #schedule (): void {
    if (this.#timer !== null || this.#closed !== null) return
    this.#timer = setTimeout(() => {
      this.#timer = null
      this.#writeSoon()
    }, this.#batchMs)
    this.#timer.unref()
  }

  #writeSoon (): void {
    if (this.#writing !== null) return
    const writing = this.#write()
    this.#writing = writing
    void writing.finally(() => { if (this.#writing === writing) this.#writing = null })
  }

  async #write (): Promise<void> {
    while (this.#touched.size > 0 || this.#ended.size > 0) {
      this.#urgent = false
      if (!(await this.#writeBatch())) return
      // An end or a turn that came during the batch goes out right after it; mere activity
      // waits for its batch (under steady heartbeats Redis would be written back to back otherwise).
      if (!this.#urgent && this.#closed === null) {
        if (this.#touched.size > 0) this.#schedule()
        return
      }
    }
  }

  /** One pipeline of what is pending; false when it failed (then it is retried after batchMs). */
  async #writeBatch (): Promise<boolean> {
    const touched = [...this.#touched.values()]
    const ended = [...this.#ended.values()]
    this.#touched.clear()
    this.#ended.clear()
    const pipeline = this.#redis.pipeline()
    for (const record of ended) {
      queueScript(pipeline, 'agentSessionsEnd', this.#keys.session(record.id), this.#keys.owned(this.#me), this.#keys.unowned,
        this.#keys.ended(record.id), this.#me, record.id,
        JSON.stringify({ reason: record.reason, idleMs: record.idleMs, endedAt: record.endedAt }), this.#endedTtlMs, this.#keys.prefix)
    }
    const marks: string[] = []
    for (const session of touched) {
      const fields: Array<string | number> = ['lastActivity', session.lastActivity, 'lastTurnEndedAt', session.lastTurnEndedAt]
      const mark = historyMark(session)
      marks.push(mark)
      if (this.#historyMark.get(session.id) !== mark) fields.push('history', JSON.stringify(session.history))
      queueScript(pipeline, 'agentSessionsTouch', this.#keys.session(session.id), this.#me, ...fields)
    }
    try {
      const results = await pipeline.exec() ?? []
      const failure = results.find(([err]) => err !== null)?.[0]
      if (failure != null) throw failure
      this.#ok()
      for (const [i, session] of touched.entries()) {
        const written = results[ended.length + i]?.[1]
        if (written === 1) this.#historyMark.set(session.id, marks[i])
        // Not ours in Redis any more, or gone from it (Redis came back empty): find out which.
        else void this.#recheck(session)
      }
    } catch (err) {
      this.#failed(err, 'writing sessions to Redis failed')
      // Kept for the next attempt, unless something newer came meanwhile.
      for (const record of ended) if (!this.#ended.has(record.id)) this.#ended.set(record.id, record)
      for (const session of touched) if (!this.#touched.has(session.id) && !this.#ended.has(session.id)) this.#touched.set(session.id, session)
      if (this.#closed === null) this.#schedule()
      return false
    }
    return true
  }

  /** A touch that did not land: the session is written again where it is still ours, let go where not. */
  async #recheck (session: StoredSession): Promise<void> {
    const current = [...(this.#source?.sessions() ?? [])].find((s) => s.id === session.id)
    if (current === undefined) return
    try {
      await this.saved(current)
    } catch {}
  }

  #ok (): void {
    if (this.#lastError !== null) this.#log.info({}, 'Redis answers again')
    this.#lastError = null
  }

  #failed (err: unknown, what: string): void {
    const message = (err as Error).message
    // Once per outage, not once per request.
    if (this.#lastError === null) this.#log.error({ err }, what)
    this.#lastError = message
  }
}

function historyMark (session: StoredSession): string {
  const last = session.history.at(-1)
  return `${session.history.length}:${last?.endedAt ?? 0}`
}

function parseJson (text: string | undefined): unknown {
  if (text === undefined) return null
  try {
    return JSON.parse(text)
  } catch {
    return null
  }
}

function parseStored (id: string, fields: Record<string, string>): StoredSession | null {
  const ref = parseJson(fields.ref) as StoredSession['ref'] | null
  const history = parseJson(fields.history)
  const numbers = ['createdAt', 'idleTimeoutMs', 'lastActivity', 'lastTurnEndedAt'].map((name) => Number(fields[name]))
  if (ref === null || typeof ref !== 'object' || numbers.some((n) => !Number.isFinite(n))) return null
  return {
    id,
    ref,
    workspaceDir: fields.workspaceDir ?? '',
    createdAt: numbers[0],
    idleTimeoutMs: numbers[1],
    lastActivity: numbers[2],
    lastTurnEndedAt: numbers[3],
    history: Array.isArray(history) ? history : [],
    ...(fields.client === undefined || fields.client === '' ? {} : { client: fields.client })
  }
}
