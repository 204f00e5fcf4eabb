// With REDIS_URL, this instance is one of a cluster sharing its state in
// Redis: the session store is the Redis one, the instance advertises itself
// (liveness key with its URL and free room), takes back its sessions' state
// when Redis returns, and reaps the expired sessions of instances that are
// gone. Which instance answers which request is plugins/cluster-routes.ts.

import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import { hostname } from 'node:os'
import fp from 'fastify-plugin'
import { Type, type Static } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import type { Redis } from 'ioredis'
import { defaultInstanceUrl } from '../lib/cluster/instance-url.js'
import { Membership, type ClusterView } from '../lib/cluster/membership.js'
import { ClusterKeys, createRedis } from '../lib/cluster/redis.js'
import { RedisStore } from '../lib/cluster/redis-store.js'

export interface AgentSessionsCluster {
  instanceId: string
  redis: Redis
  keys: ClusterKeys
  store: RedisStore
  membership: Membership
  /** Whether Redis answers now. */
  available: () => boolean
}

declare module 'fastify' {
  interface FastifyInstance {
    /** null unless REDIS_URL is set. */
    agentSessionsCluster: AgentSessionsCluster | null
  }
}

/** The cluster as GET /api/health shows it (with the token). */
export const ClusterHealthSchema = Type.Object({
  instance_id: Type.String({ description: 'This instance' }),
  redis: Type.Union([Type.Literal('ok'), Type.Literal('unreachable')]),
  instances: Type.Array(Type.Object({
    id: Type.String(),
    url: Type.String({ description: 'INSTANCE_URL: how the others reach it' }),
    sessions: Type.Integer(),
    free_sessions: Type.Integer({ description: 'Sessions it can still start (MAX_SESSIONS)' }),
    free_live_agents: Type.Integer({ description: 'Live agents it can still start without waiting (MAX_LIVE_AGENTS)' }),
    draining: Type.Boolean({ description: 'Stopping: takes no new sessions' })
  }), { description: 'The live instances' }),
  dead_instances: Type.Integer({ description: 'Instances whose liveness expired while they owned sessions' }),
  sessions: Type.Integer({ description: 'Sessions across the cluster' }),
  orphaned_sessions: Type.Integer({ description: 'Sessions no live instance runs; the next request for one takes it over' }),
  as_of: Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: 'When this view was read from Redis' })
}, { description: 'The cluster (REDIS_URL)' })

export type ClusterHealth = Static<typeof ClusterHealthSchema>

export function clusterHealth (cluster: AgentSessionsCluster): ClusterHealth {
  const view: ClusterView = cluster.membership.view()
  return {
    instance_id: cluster.instanceId,
    redis: cluster.available() ? 'ok' : 'unreachable',
    instances: view.instances.map((i) => ({
      id: i.id, url: i.url, sessions: i.sessions, free_sessions: i.freeSessions, free_live_agents: i.freeLiveAgents, draining: i.draining
    })),
    dead_instances: view.deadInstances.length,
    sessions: view.instances.reduce((sum, i) => sum + i.sessions, 0) + view.orphanedSessions,
    orphaned_sessions: view.orphanedSessions,
    as_of: view.at === null ? null : new Date(view.at).toISOString()
  }
}

async function clusterPlugin (fastify: FastifyInstance): Promise<void> {
  const config = fastify.agentSessionsConfig
  if (config.redisUrl === undefined) {
    fastify.decorate('agentSessionsCluster', null)
    return
  }
  const log = fastify.log.child({ component: 'agent-sessions-cluster' })
  // Readable in logs and keys; random, so a restarted instance never mistakes another's sessions for its own.
  const instanceId = `${hostname().replace(/[^\w.-]/g, '-').slice(0, 40)}-${randomBytes(4).toString('hex')}`
  // A stalled Redis must fail a request well within the liveness TTL.
  const redis = createRedis({ url: config.redisUrl, commandTimeoutMs: Math.max(250, Math.min(2000, Math.floor(config.instanceTtlMs / 4))), log })
  const keys = new ClusterKeys(config.redisPrefix)
  const store = new RedisStore({ redis, keys, instanceId, log })
  fastify.agentSessionsState.store = store

  let lastConnectionError = ''
  redis.on('error', (err: Error) => {
    // Without a listener an error event would end the process; logged once per kind of failure.
    if (err.message !== lastConnectionError) log.error({ err }, 'Redis connection error')
    lastConnectionError = err.message
  })
  redis.on('ready', () => {
    if (lastConnectionError !== '') log.info({}, 'Redis connection ready again')
    lastConnectionError = ''
  })

  const membership = new Membership({
    redis,
    keys,
    instanceId,
    ttlMs: config.instanceTtlMs,
    log,
    capacity: () => ({ ...fastify.agentSessions.capacity(), active: fastify.agentSessions.counts().active })
  })
  store.beforeRelease = () => { membership.stop() }

  const cluster: AgentSessionsCluster = {
    instanceId,
    redis,
    keys,
    store,
    membership,
    available: () => redis.status === 'ready'
  }
  fastify.decorate('agentSessionsCluster', cluster)

  let sweep: NodeJS.Timeout | null = null
  let sweeping: Promise<void> | null = null
  const reapOrphans = async (): Promise<void> => {
    if (!cluster.available()) return
    try {
      const reaped = await membership.reapOrphans(store)
      if (reaped.length > 0) log.info({ reaped: reaped.length, sessionIds: reaped }, 'expired sessions of lost instances reaped')
    } catch (err) {
      log.error({ err }, 'reaping the sessions of lost instances failed')
    }
  }

  fastify.addHook('onReady', async () => {
    const manager = fastify.agentSessions
    store.onLost = (sessionId) => { void manager.evict(sessionId) }
    const reconcile = async (why: string): Promise<void> => {
      try {
        const result = await store.reconcile()
        if (result.rewritten + result.lost > 0) log.info({ ...result, why }, 'sessions of this instance checked against Redis')
      } catch (err) {
        log.error({ err, why }, 'writing this instance\'s sessions to Redis again failed')
      }
    }
    membership.on('reconnected', ({ dataLost }) => { void reconcile(dataLost ? 'Redis lost its data' : 'Redis reconnected') })
    membership.on('liveness-lost', () => { void reconcile('liveness key had expired') })
    for (const event of ['session-started', 'session-ended', 'session-hibernated', 'session-resumed', 'session-adopted'] as const) {
      manager.on(event, () => { membership.changed() })
    }
    try {
      await redis.connect()
    } catch (err) {
      // Not fatal: the client keeps trying; until then what needs Redis answers 503 STATE_UNAVAILABLE.
      log.error({ err }, 'Redis cannot be reached yet: serving what needs no shared state, reconnecting')
    }
    if (config.instanceUrl !== undefined) membership.start(config.instanceUrl)
    sweep = setTimeout(function run () {
      sweeping = reapOrphans().finally(() => {
        sweeping = null
        sweep?.refresh()
      })
    }, config.cleanupIntervalMs)
    sweep.unref()
  })

  fastify.addHook('onListen', async () => {
    if (config.instanceUrl !== undefined || membership.url !== null) return
    const address = fastify.server.address() as AddressInfo | null
    if (address === null || typeof address === 'string') return
    membership.start(defaultInstanceUrl(address.address, address.port))
  })

  fastify.addHook('preClose', async () => {
    // No new session is sent here any more; the sessions stay ours until they are hibernated and released.
    membership.drain()
  })

  fastify.addHook('onClose', async () => {
    // The reaper's close (registered later, so run earlier) hibernated every session and the store released them.
    if (sweep !== null) clearTimeout(sweep)
    sweep = null
    await sweeping
    membership.stop()
    await store.close()
    try {
      await redis.quit()
    } catch {
      redis.disconnect()
    }
  })
  log.info({ instanceId, prefix: config.redisPrefix, ttlMs: config.instanceTtlMs }, 'clustering through Redis')
}

export default fp(clusterPlugin, {
  name: 'agent-sessions-cluster',
  fastify: '5.x',
  dependencies: ['agent-sessions-config', 'agent-sessions-state']
})
