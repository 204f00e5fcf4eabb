// With REDIS_URL (a real redis-server): the sessions live in Redis, the
// instance advertises itself with a liveness key, the start rate limit counts
// in Redis, health shows the cluster, and readiness follows Redis.

import t from 'tap'
import { EVENT_TIMEOUT_MS, sandbox } from './helpers/index.js'
import { call, redisClient, startInstance, until } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('the session store, the liveness key and the cluster view live in Redis', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startInstance(t, box, redis.url, { redisPrefix: 'wiring:' })
    const client = redisClient(t, redis.url)
    const cluster = a.app.agentSessionsCluster!
    t.ok(cluster, 'the cluster is decorated')

    const started = await call('POST', `${a.url}/api/session/start`)
    t.equal(started.status, 200, JSON.stringify(started.json))
    const id = started.json.session_id as string
    t.equal(await client.hget(`wiring:session:${id}`, 'owner'), cluster.instanceId, 'the session is registered in Redis, owned by A')
    t.ok(await client.sismember(`wiring:owned:${cluster.instanceId}`, id))

    const live = await until(async () => await client.get(`wiring:instance:${cluster.instanceId}`), 'the liveness key', EVENT_TIMEOUT_MS)
    const record = JSON.parse(live)
    t.equal(record.url, a.url, 'INSTANCE_URL defaults to the address it listens on')
    const ttl = await client.pttl(`wiring:instance:${cluster.instanceId}`)
    t.ok(ttl > 0 && ttl <= 2000, `the liveness key expires after INSTANCE_TTL (${ttl} ms left)`)

    const health = await call('GET', `${a.url}/api/health`)
    t.equal(health.status, 200)
    t.equal(health.json.status, 'ok')
    t.match(health.json.store, { enabled: true, ok: true })
    await until(async () => (await call('GET', `${a.url}/api/health`)).json.cluster?.sessions === 1, 'the cluster view to count the session', EVENT_TIMEOUT_MS)
    const view = (await call('GET', `${a.url}/api/health`)).json.cluster
    t.match(view, { instance_id: cluster.instanceId, redis: 'ok', sessions: 1, orphaned_sessions: 0, dead_instances: 0 })
    t.equal(view.instances.length, 1)
    t.match(view.instances[0], { id: cluster.instanceId, url: a.url, sessions: 1, draining: false })

    const ready = await call('GET', `${a.url}/api/health/ready`)
    t.equal(ready.status, 200)
    t.same(ready.json.checks, ['accepting', 'agent', 'redis'])

    const ended = await call('POST', `${a.url}/api/session/end?session_id=${id}`)
    t.equal(ended.status, 200)
    await until(async () => (await client.exists(`wiring:ended:${id}`)) === 1, 'the ended id in Redis', EVENT_TIMEOUT_MS)
    t.equal(await client.exists(`wiring:session:${id}`), 0)
    t.match(JSON.parse((await client.get(`wiring:ended:${id}`))!), { reason: 'ended' })

    await a.close()
    t.equal(await client.exists(`wiring:instance:${cluster.instanceId}`), 0, 'a closed instance removes its liveness key')
  })

  t.test('the start rate limit counts across instances', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startInstance(t, box, redis.url, { startRateLimit: 2, startRateWindow: '1h' })
    const b = await startInstance(t, box, redis.url, { startRateLimit: 2, startRateWindow: '1h' })
    t.equal((await call('POST', `${a.url}/api/session/start`)).status, 200)
    t.equal((await call('POST', `${b.url}/api/session/start`)).status, 200)
    const third = await call('POST', `${a.url}/api/session/start`)
    t.equal(third.status, 429, 'the third start within the window is refused, whichever instance gets it')
    t.equal(third.json.error, 'RATE_LIMITED')
    t.equal((await call('POST', `${b.url}/api/session/start`)).status, 429)
  })

  t.test('Redis unreachable: ready 503, live 200, health degraded, starts 503 STATE_UNAVAILABLE; all recover by themselves', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startInstance(t, box, redis.url)
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.ok(id)
    await redis.stop()

    await until(async () => (await call('GET', `${a.url}/api/health/ready`)).status === 503, 'ready to turn 503', EVENT_TIMEOUT_MS)
    const ready = await call('GET', `${a.url}/api/health/ready`)
    t.match(ready.json.details, /redis/)
    t.equal((await call('GET', `${a.url}/api/health/live`)).status, 200, 'live stays 200')
    const health = await call('GET', `${a.url}/api/health`)
    t.equal(health.status, 200)
    t.equal(health.json.status, 'degraded')
    t.equal(health.json.cluster.redis, 'unreachable')
    const start = await call('POST', `${a.url}/api/session/start`)
    t.equal(start.status, 503)
    t.equal(start.json.error, 'STATE_UNAVAILABLE')
    t.ok(start.headers.get('retry-after'))
    t.equal((await call('POST', `${a.url}/api/heartbeat?session_id=${id}`)).status, 200, 'the session it owns keeps answering')

    await redis.start()
    await until(async () => (await call('GET', `${a.url}/api/health/ready`)).status === 200, 'ready to turn 200 again', EVENT_TIMEOUT_MS)
    t.equal((await call('GET', `${a.url}/api/health`)).json.status, 'ok')
    const client = redisClient(t, redis.url)
    await until(async () => (await client.hget(`agent-sessions:session:${id}`, 'owner')) === a.app.agentSessionsCluster!.instanceId,
      'the session written again into the empty Redis', EVENT_TIMEOUT_MS)
    t.equal((await call('POST', `${a.url}/api/session/start`)).status, 200, 'starts work again')
  })
}
