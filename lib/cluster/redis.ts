// The Redis a cluster of instances shares: the client's settings, the key
// layout, and the Lua scripts that make every change of ownership atomic.
//
// Keys (P = REDIS_PREFIX):
//   P session:<id>    hash: owner (an instance id; '' once released), ref, workspaceDir, createdAt,
//                     idleTimeoutMs, lastActivity, lastTurnEndedAt, history (JSON)
//   P owned:<inst>    set of the session ids an instance owns
//   P unowned         set of the session ids released by an instance that stopped (SIGTERM)
//   P ended:<id>      why a session ended (JSON), expiring after the ended-id memory
//   P instance:<inst> liveness key: the instance's URL and free capacity (JSON), expiring after INSTANCE_TTL
//   P instances       set of instance ids that may still own sessions
//   P client:<addr>   set of the session ids a client address holds (MAX_SESSIONS_PER_CLIENT across the cluster)
//   P client-starting:<addr>  sorted set of the client's starts in flight (score: when the place lapses, ms)
//   P secret          marks requests one instance forwards to another (never sent to clients)
//   P rate:...        the start rate limit (@fastify/rate-limit's Redis store)
//
// The scripts compute some keys from their arguments (the owner's liveness
// key, its owned set), so they need a standalone Redis (or Sentinel), not
// Redis Cluster.

import { Redis, type ChainableCommander } from 'ioredis'
import type { Logger } from '../logger.js'

export class ClusterKeys {
  readonly prefix: string
  constructor (prefix: string) {
    this.prefix = prefix
  }

  session (id: string): string { return `${this.prefix}session:${id}` }
  owned (instanceId: string): string { return `${this.prefix}owned:${instanceId}` }
  ended (id: string): string { return `${this.prefix}ended:${id}` }
  instance (instanceId: string): string { return `${this.prefix}instance:${instanceId}` }
  client (address: string): string { return `${this.prefix}client:${address}` }
  clientStarting (address: string): string { return `${this.prefix}client-starting:${address}` }
  get unowned (): string { return `${this.prefix}unowned` }
  get instances (): string { return `${this.prefix}instances` }
  get secret (): string { return `${this.prefix}secret` }
  get rateLimit (): string { return `${this.prefix}rate:` }
}

const SCRIPTS = {
  // KEYS: session, owned:me, unowned, ended, client:<addr>. ARGV: me, id, field, value, ...
  // Writes a session this instance owns; 0 when it ended, or another instance owns it now.
  agentSessionsSave: {
    keys: 5,
    lua: `
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' and owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], unpack(ARGV, 3))
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
local client = redis.call('HGET', KEYS[1], 'client')
if client and client ~= '' then redis.call('SADD', KEYS[5], ARGV[2]) end
return 1`
  },
  // KEYS: client:<addr>, client-starting:<addr>. ARGV: limit, token, ttl ms.
  // Holds a place in a client's budget for a start in flight: 1 while the
  // sessions it holds plus its starts in flight stay below the limit, so two
  // starts racing on two instances cannot both take the last place. A place
  // lapses after ttl ms (an instance that died mid-start gives it back).
  agentSessionsReserveClient: {
    keys: 2,
    lua: `
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('SCARD', KEYS[1]) + redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1`
  },
  // KEYS: session. ARGV: me, field, value, ... Updates only a session this instance owns; 0 otherwise.
  agentSessionsTouch: {
    keys: 1,
    lua: `
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1`
  },
  // KEYS: session, owned:me, unowned, ended. ARGV: me, id, ended JSON, ttl ms, prefix.
  // Ends a session unless another instance owns it now (then 0: it lives on there).
  agentSessionsEnd: {
    keys: 4,
    lua: `
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= '' and owner ~= ARGV[1] then return 0 end
local client = redis.call('HGET', KEYS[1], 'client')
if client and client ~= '' then redis.call('SREM', ARGV[5] .. 'client:' .. client, ARGV[2]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[3], 'PX', ARGV[4])
return 1`
  },
  // KEYS: session, ended. ARGV: prefix.
  // {'unknown', secret} | {'ended', json} | {'owned', owner, instance JSON} | {'orphan', owner ('' when released), secret}
  // An unknown id and an orphan come with the cluster's secret ('' when none):
  // a secret other than the caller's says Redis lost its data (the id's owner
  // may not have written it, or advertised itself, again yet).
  agentSessionsLookup: {
    keys: 2,
    lua: `
local owner = redis.call('HGET', KEYS[1], 'owner')
if not owner then
  local ended = redis.call('GET', KEYS[2])
  if ended then return {'ended', ended} end
  return {'unknown', redis.call('GET', ARGV[1] .. 'secret') or ''}
end
if owner ~= '' then
  local live = redis.call('GET', ARGV[1] .. 'instance:' .. owner)
  if live then return {'owned', owner, live} end
end
return {'orphan', owner, redis.call('GET', ARGV[1] .. 'secret') or ''}`
  },
  // KEYS: session, owned:me, unowned. ARGV: me, prefix, id.
  // The claim succeeds only when the session's owner is this instance, or has
  // released it, or its liveness key is gone: of two instances racing, one wins.
  // {0} gone | {2, owner} a live instance owns it | {1, previous owner, field, value, ...}
  agentSessionsClaim: {
    keys: 3,
    lua: `
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
if owner ~= ARGV[1] then
  if owner ~= '' and redis.call('EXISTS', ARGV[2] .. 'instance:' .. owner) == 1 then return {2, owner} end
  redis.call('HSET', KEYS[1], 'owner', ARGV[1])
  if owner ~= '' then redis.call('SREM', ARGV[2] .. 'owned:' .. owner, ARGV[3]) end
  redis.call('SREM', KEYS[3], ARGV[3])
  redis.call('SADD', KEYS[2], ARGV[3])
end
local result = {1, owner}
for _, v in ipairs(redis.call('HGETALL', KEYS[1])) do table.insert(result, v) end
return result`
  },
  // KEYS: session, ended, unowned. ARGV: prefix, id, now ms, ended ttl ms, me.
  // Ends a session that expired while no live instance owned it; 1 for the one caller that did.
  agentSessionsReap: {
    keys: 3,
    lua: `
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
if owner == ARGV[5] then return 0 end
if owner ~= '' and redis.call('EXISTS', ARGV[1] .. 'instance:' .. owner) == 1 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'lastActivity'))
local idle = tonumber(redis.call('HGET', KEYS[1], 'idleTimeoutMs'))
local now = tonumber(ARGV[3])
if last == nil or idle == nil or last + idle > now then return 0 end
local client = redis.call('HGET', KEYS[1], 'client')
if client and client ~= '' then redis.call('SREM', ARGV[1] .. 'client:' .. client, ARGV[2]) end
redis.call('DEL', KEYS[1])
if owner ~= '' then redis.call('SREM', ARGV[1] .. 'owned:' .. owner, ARGV[2]) end
redis.call('SREM', KEYS[3], ARGV[2])
redis.call('SET', KEYS[2], cjson.encode({reason = 'expired', idleMs = now - last, endedAt = now}), 'PX', ARGV[4])
return 1`
  },
  // KEYS: owned:me, unowned, instances, instance:me. ARGV: prefix, me.
  // A stopping instance lets its (hibernated) sessions go, so any instance may take them over at once.
  agentSessionsRelease: {
    keys: 4,
    lua: `
local n = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[1] .. 'session:' .. id
  if redis.call('HGET', key, 'owner') == ARGV[2] then
    redis.call('HSET', key, 'owner', '')
    redis.call('SADD', KEYS[2], id)
    n = n + 1
  end
end
redis.call('DEL', KEYS[1], KEYS[4])
redis.call('SREM', KEYS[3], ARGV[2])
return n`
  },
  // KEYS: instance:me, instances. ARGV: record JSON, ttl ms, me. 1 when the key was still there.
  agentSessionsAlive: {
    keys: 2,
    lua: `
local old = redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'GET')
redis.call('SADD', KEYS[2], ARGV[3])
if old then return 1 end
return 0`
  },
  // KEYS: instances, unowned. ARGV: prefix. {id, record JSON or '', owned count, ..., unowned count}
  agentSessionsView: {
    keys: 2,
    lua: `
local out = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, id)
  table.insert(out, redis.call('GET', ARGV[1] .. 'instance:' .. id) or '')
  table.insert(out, redis.call('SCARD', ARGV[1] .. 'owned:' .. id))
end
table.insert(out, redis.call('SCARD', KEYS[2]))
return out`
  },
  // KEYS: instances, owned:x, instance:x. ARGV: x. Forgets a dead instance once it owns nothing.
  agentSessionsForget: {
    keys: 3,
    lua: `
if redis.call('EXISTS', KEYS[3]) == 1 or redis.call('SCARD', KEYS[2]) > 0 then return 0 end
redis.call('SREM', KEYS[1], ARGV[1])
return 1`
  }
} as const

export type ScriptName = keyof typeof SCRIPTS
type ScriptFn = (...args: Array<string | number>) => Promise<unknown>

/** Runs one of the scripts (EVALSHA, loaded on first use). */
export function runScript (redis: Redis, name: ScriptName, ...args: Array<string | number>): Promise<unknown> {
  return (redis as unknown as Record<ScriptName, ScriptFn>)[name](...args)
}

/** Queues one of the scripts on a pipeline. */
export function queueScript (pipeline: ChainableCommander, name: ScriptName, ...args: Array<string | number>): void {
  (pipeline as unknown as Record<ScriptName, (...a: Array<string | number>) => unknown>)[name](...args)
}

export interface RedisClientOptions {
  url: string
  /** Longest a command may take before it fails (a stalled Redis must not stall requests). */
  commandTimeoutMs: number
  log: Logger
}

/**
 * The client every part of the cluster shares. Commands fail at once while
 * the connection is down (no offline queue: a request never waits for a
 * Redis that may not come back) and after commandTimeoutMs on a stalled one;
 * the client reconnects by itself, forever, at most every 2 s.
 */
export function createRedis (options: RedisClientOptions): Redis {
  const redis = new Redis(options.url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    commandTimeout: options.commandTimeoutMs,
    connectTimeout: Math.max(1000, options.commandTimeoutMs * 2),
    maxRetriesPerRequest: 0,
    retryStrategy: (times) => Math.min(100 * times, 2000),
    // Idle connections through NATs and load balancers stay known.
    keepAlive: 10_000
  })
  for (const [name, script] of Object.entries(SCRIPTS)) {
    redis.defineCommand(name, { numberOfKeys: script.keys, lua: script.lua })
  }
  return redis
}
