// The session stores under steady heartbeats: activity goes out with its
// batch (at most once per batchMs), never back to back, while creations and
// ends still go out at once. A store that rewrote itself after every write
// under load cost the standalone server a third of its heartbeat throughput
// (issue 15: the writes tipped V8 into pretenuring the request path).

import t from 'tap'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { setImmediate as turn } from 'node:timers/promises'
import { silentLogger } from '../lib/logger.js'
import { FileStore } from '../lib/sessions/file-store.js'
import type { StoredSession } from '../lib/sessions/store.js'
import { ClusterKeys, createRedis } from '../lib/cluster/redis.js'
import { RedisStore } from '../lib/cluster/redis-store.js'
import { redisMissing, startRedis } from './helpers/redis.js'

const BATCH_MS = 100
const LOAD_MS = 1000

function storedSession (id: string): StoredSession {
  const now = Date.now()
  return {
    id,
    ref: { protocol: 'cursor', chatId: `chat-${id}` },
    workspaceDir: '/tmp',
    createdAt: now,
    lastActivity: now,
    lastTurnEndedAt: now,
    idleTimeoutMs: 600_000,
    history: []
  }
}

/** Heartbeats back to back (one per event-loop turn) for LOAD_MS; how long it really took. */
async function steadyHeartbeats (touch: () => void): Promise<number> {
  const started = performance.now()
  while (performance.now() - started < LOAD_MS) {
    touch()
    await turn()
  }
  return performance.now() - started
}

t.test('file store: steady activity is written once per batch, a creation at once', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-store-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  const file = join(dir, 'sessions.json')
  const store = new FileStore({ file, log: silentLogger, batchMs: BATCH_MS })
  const session = storedSession('a')
  let writes = 0
  store.attach({
    sessions: () => { writes++; return [session] },
    ended: () => []
  })
  await store.saved()
  t.equal(writes, 1, 'a creation is written before saved() resolves')

  const elapsed = await steadyHeartbeats(() => {
    session.lastActivity = Date.now()
    store.touched()
  })
  const batches = Math.floor(elapsed / BATCH_MS)
  t.ok(writes - 1 <= batches + 1, `${writes - 1} writes in ${Math.round(elapsed)} ms of steady heartbeats: at most one per ${BATCH_MS} ms batch (${batches + 1})`)
  t.ok(writes - 1 >= 1, 'and the activity does go out')

  const last = Date.now()
  session.lastActivity = last
  store.touched()
  await store.close()
  const written = JSON.parse(readFileSync(file, 'utf8')) as { sessions: StoredSession[] }
  t.equal(written.sessions[0].lastActivity, last, 'close writes the latest activity')
})

const missing = redisMissing()
t.test('redis store: steady activity is written once per batch, an end at once', { skip: missing ?? false }, async (t) => {
  const server = await startRedis(t)
  const redis = createRedis({ url: server.url, commandTimeoutMs: 2000, log: silentLogger })
  t.teardown(() => { redis.disconnect() })
  await redis.connect()
  const keys = new ClusterKeys('store-test:')
  const store = new RedisStore({ redis, keys, instanceId: 'me', log: silentLogger, batchMs: BATCH_MS })
  const session = storedSession('b')
  store.attach({ sessions: () => [session], ended: () => [] })
  await store.saved(session)

  const scriptCalls = async (): Promise<number> => {
    const stats = await redis.info('commandstats')
    return Number(/cmdstat_evalsha:calls=(\d+)/.exec(stats)?.[1] ?? 0) + Number(/cmdstat_eval:calls=(\d+)/.exec(stats)?.[1] ?? 0)
  }
  const before = await scriptCalls()
  const elapsed = await steadyHeartbeats(() => {
    session.lastActivity = Date.now()
    store.touched({ ...session })
  })
  await store.flush()
  const writes = await scriptCalls() - before
  const batches = Math.floor(elapsed / BATCH_MS)
  t.ok(writes <= batches + 2, `${writes} writes in ${Math.round(elapsed)} ms of steady heartbeats: at most one per ${BATCH_MS} ms batch, and the flush (${batches + 2})`)
  t.equal(Number(await redis.hget(keys.session('b'), 'lastActivity')), session.lastActivity, 'the latest activity is in Redis after a flush')

  await store.close()

  // An end does not wait for the batch: with a batch of an hour, only a write at once lands within the deadline.
  const slow = new RedisStore({ redis, keys, instanceId: 'me', log: silentLogger, batchMs: 3_600_000 })
  const ending = storedSession('c')
  slow.attach({ sessions: () => [ending], ended: () => [] })
  await slow.saved(ending)
  slow.touched({ ...ending, lastActivity: ending.lastActivity + 1 })
  slow.ended({ id: 'c', reason: 'ended', idleMs: 0, endedAt: Date.now() })
  const deadline = Date.now() + 60_000
  while (await redis.exists(keys.ended('c')) === 0 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 10))
  t.equal(await redis.exists(keys.ended('c')), 1, 'the end is written without waiting for the batch')
  t.equal(await redis.exists(keys.session('c')), 0, 'and the session is gone from Redis')
  await slow.close()
})
