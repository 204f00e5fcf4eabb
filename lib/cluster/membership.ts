// This instance as a member of the cluster: its liveness key (URL and free
// capacity, expiring after INSTANCE_TTL, refreshed three times within it), the
// cluster's view (which instances are live, what room each has), the secret
// that marks forwarded requests, and the reaping of sessions whose instance is
// gone. Framework-free: the plugin wires it to Fastify.

import { randomBytes } from 'node:crypto'
import { EventEmitter } from 'node:events'
import type { Redis } from 'ioredis'
import type { Logger } from '../logger.js'
import { ClusterKeys, runScript } from './redis.js'
import type { RedisStore } from './redis-store.js'

/** What an instance advertises in its liveness key. */
export interface InstanceRecord {
  id: string
  url: string
  /** Sessions it can still start (MAX_SESSIONS minus those it runs). */
  freeSessions: number
  /** Live agents it can still start without waiting (MAX_LIVE_AGENTS). */
  freeLiveAgents: number
  /** Sessions it runs. */
  sessions: number
  /** Stopping: takes no new sessions. */
  draining: boolean
  startedAt: number
}

export interface ClusterView {
  /** The live instances (this one included once it advertises itself). */
  instances: InstanceRecord[]
  /** Instances whose liveness expired while they still own sessions. */
  deadInstances: Array<{ id: string, sessions: number }>
  /** Sessions no live instance runs: of dead instances, or released by stopped ones. */
  orphanedSessions: number
  /** When this view was read (epoch ms); null before the first read. */
  at: number | null
}

export interface MembershipEvents {
  /** Redis answers (again): the shared state may have to be written again. */
  reconnected: [{ dataLost: boolean }]
  /** This instance's liveness key had expired: other instances may have taken sessions over. */
  'liveness-lost': []
}

export interface MembershipOptions {
  redis: Redis
  keys: ClusterKeys
  instanceId: string
  ttlMs: number
  log: Logger
  /** This instance's room now. */
  capacity: () => { sessions: number, liveAgents: number, active: number }
  now?: () => number
}

export class Membership extends EventEmitter<MembershipEvents> {
  readonly #redis: Redis
  readonly #keys: ClusterKeys
  readonly #me: string
  readonly #ttlMs: number
  readonly #log: Logger
  readonly #capacity: MembershipOptions['capacity']
  readonly #now: () => number
  readonly #startedAt: number
  #url: string | null = null
  #draining = false
  #stopped = false
  #timer: NodeJS.Timeout | null = null
  #soon: NodeJS.Timeout | null = null
  #published = false
  #secret: string | null = null
  #view: ClusterView = { instances: [], deadInstances: [], orphanedSessions: 0, at: null }
  /** Until then, an id Redis does not know may be one whose owner has not written it again yet (Redis lost its data). */
  #recoveringUntil = 0
  #lastPublishOk = false
  /** A resync after a lookup saw another secret (one at a time). */
  #resync: Promise<void> | null = null

  constructor (options: MembershipOptions) {
    super()
    this.#redis = options.redis
    this.#keys = options.keys
    this.#me = options.instanceId
    this.#ttlMs = options.ttlMs
    this.#log = options.log
    this.#capacity = options.capacity
    this.#now = options.now ?? Date.now
    this.#startedAt = this.#now()
    this.#redis.on('ready', () => { void this.#onReady() })
  }

  get instanceId (): string {
    return this.#me
  }

  get url (): string | null {
    return this.#url
  }

  /** Marks forwarded requests; null until Redis answered once. */
  get secret (): string | null {
    return this.#secret
  }

  get ttlMs (): number {
    return this.#ttlMs
  }

  /** Whether Redis lost its data a moment ago and the instances are still writing theirs again. */
  get recovering (): boolean {
    return this.#now() < this.#recoveringUntil
  }

  /**
   * Whether the cluster's secret as a lookup just read it is the one this
   * instance knows. When not, Redis lost its data without this instance
   * seeing a reconnect (a flush, a failover to an empty replica, a restart
   * between two commands): it recovers as after a reconnect.
   */
  secretCurrent (seen: string): boolean {
    if (this.#secret === null || seen === this.#secret) return true
    this.#recoveringUntil = Math.max(this.#recoveringUntil, this.#now() + this.#ttlMs + 2000)
    // Replies in flight when a resync ends still carry the old secret: each resync reads it again, and only a loss is news.
    this.#resync ??= this.#syncSecret().then((dataLost) => {
      if (dataLost === true) this.#reconnected(dataLost)
    }).finally(() => { this.#resync = null })
    return false
  }

  /** The last view read (refreshed with every liveness write). */
  view (): ClusterView {
    return this.#view
  }

  /** Starts advertising this instance at `url` (once it listens). */
  start (url: string): void {
    this.#url = url
    if (this.#stopped) return
    this.#schedule(0)
  }

  /** Advertises no room any more (the instance is stopping); its sessions stay until they are released. */
  drain (): void {
    this.#draining = true
    this.changed()
  }

  /** The room changed (a start, an end): advertised within a moment rather than at the next refresh. */
  changed (): void {
    if (this.#url === null || this.#stopped || this.#soon !== null) return
    this.#soon = setTimeout(() => {
      this.#soon = null
      void this.#publish()
    }, 50)
    this.#soon.unref()
  }

  stop (): void {
    this.#stopped = true
    if (this.#timer !== null) clearTimeout(this.#timer)
    if (this.#soon !== null) clearTimeout(this.#soon)
    this.#timer = null
    this.#soon = null
  }

  /** Reads the cluster's view now. */
  async refreshView (): Promise<ClusterView> {
    const reply = await runScript(this.#redis, 'agentSessionsView', this.#keys.instances, this.#keys.unowned, this.#keys.prefix) as Array<string | number>
    const instances: InstanceRecord[] = []
    const dead: Array<{ id: string, sessions: number }> = []
    let orphaned = Number(reply[reply.length - 1] ?? 0)
    for (let i = 0; i + 2 < reply.length; i += 3) {
      const id = String(reply[i])
      const owned = Number(reply[i + 2])
      const record = parseRecord(String(reply[i + 1]))
      if (record !== null) {
        instances.push(record)
      } else if (id !== this.#me) {
        dead.push({ id, sessions: owned })
        orphaned += owned
      }
    }
    instances.sort((a, b) => a.id.localeCompare(b.id))
    this.#view = { instances, deadInstances: dead, orphanedSessions: orphaned, at: this.#now() }
    return this.#view
  }

  /**
   * Ends the sessions of dead instances (and released ones) whose idle time
   * passed their timeout; atomically, so whichever instance sweeps first
   * reaps each, and none twice. Forgets a dead instance once it owns nothing.
   */
  async reapOrphans (store: RedisStore): Promise<string[]> {
    const view = await this.refreshView()
    const now = this.#now()
    const reaped: string[] = []
    for (const dead of view.deadInstances) {
      const ids = await this.#redis.smembers(this.#keys.owned(dead.id))
      reaped.push(...await store.reapOrphans(ids, now))
      await runScript(this.#redis, 'agentSessionsForget', this.#keys.instances, this.#keys.owned(dead.id), this.#keys.instance(dead.id), dead.id)
    }
    const released = await this.#redis.smembers(this.#keys.unowned)
    reaped.push(...await store.reapOrphans(released, now))
    return reaped
  }

  #record (): InstanceRecord {
    const room = this.#capacity()
    return {
      id: this.#me,
      url: this.#url ?? '',
      freeSessions: this.#draining ? 0 : room.sessions,
      freeLiveAgents: this.#draining ? 0 : room.liveAgents,
      sessions: room.active,
      draining: this.#draining,
      startedAt: this.#startedAt
    }
  }

  #schedule (delayMs: number): void {
    if (this.#stopped) return
    if (this.#timer !== null) clearTimeout(this.#timer)
    this.#timer = setTimeout(() => {
      this.#timer = null
      void this.#publish().finally(() => {
        // Three writes within one TTL; after a failure, sooner (the key must not lapse for a short outage).
        this.#schedule(this.#lastPublishOk ? Math.floor(this.#ttlMs / 3) : Math.min(250, Math.floor(this.#ttlMs / 10)))
      })
    }, delayMs)
    this.#timer.unref()
  }

  async #publish (): Promise<void> {
    if (this.#url === null || this.#stopped) return
    try {
      const existed = await runScript(this.#redis, 'agentSessionsAlive', this.#keys.instance(this.#me), this.#keys.instances,
        JSON.stringify(this.#record()), this.#ttlMs, this.#me)
      if (this.#stopped) return
      if (!this.#lastPublishOk && this.#published) this.#log.info({ instanceId: this.#me }, 'liveness key written again')
      this.#lastPublishOk = true
      if (existed === 0 && this.#published) {
        this.#log.warn({ instanceId: this.#me, ttlMs: this.#ttlMs }, 'this instance\'s liveness key had expired: checking which sessions are still ours')
        // Redis may have lost everything, the secret too.
        await this.#syncSecret()
        this.emit('liveness-lost')
      }
      if (!this.#published) this.#log.info({ instanceId: this.#me, url: this.#url, ttlMs: this.#ttlMs }, 'instance joined the cluster')
      this.#published = true
      await this.refreshView()
    } catch (err) {
      if (this.#lastPublishOk || !this.#published) this.#log.error({ err, instanceId: this.#me }, 'writing the liveness key failed')
      this.#lastPublishOk = false
    }
  }

  async #onReady (): Promise<void> {
    const dataLost = await this.#syncSecret()
    if (dataLost !== null) this.#reconnected(dataLost)
  }

  /** Tells the listeners (the cluster plugin checks this instance's sessions against Redis) and advertises at once. */
  #reconnected (dataLost: boolean): void {
    this.emit('reconnected', { dataLost })
    if (this.#url !== null) this.#schedule(0)
  }

  /** Reads the cluster's secret (creating it in an empty Redis): whether Redis lost its data, null when it cannot be read. */
  async #syncSecret (): Promise<boolean | null> {
    try {
      const fresh = randomBytes(24).toString('base64url')
      const created = await this.#redis.set(this.#keys.secret, fresh, 'NX')
      const secret = created === 'OK' ? fresh : await this.#redis.get(this.#keys.secret)
      // A secret that changed under us, or that we had to create again: Redis lost its data (restarted without persistence).
      const dataLost = this.#secret !== null && secret !== this.#secret
      if (dataLost) {
        this.#recoveringUntil = this.#now() + this.#ttlMs + 2000
        this.#log.warn({ instanceId: this.#me }, 'Redis came back without its data: every instance writes its sessions again')
      }
      this.#secret = secret
      return dataLost
    } catch (err) {
      this.#log.error({ err }, 'reading the cluster secret failed')
      return null
    }
  }
}

function parseRecord (text: string): InstanceRecord | null {
  if (text === '') return null
  try {
    const record = JSON.parse(text) as InstanceRecord
    return typeof record.url === 'string' && typeof record.id === 'string' ? record : null
  } catch {
    return null
  }
}
