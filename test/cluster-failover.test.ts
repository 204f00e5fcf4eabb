// Losing an instance: real server processes (dist/server.js) sharing a real
// Redis. When one is SIGKILLed, the next request for one of its sessions, on
// any other instance, claims the session once the dead one's liveness key
// expired, and the conversation continues where the agent's storage is
// shared (the simulators keep their chats under FAKE_AGENT_STATE_DIR), else
// the session ends with reason instance_lost. Never a hang, never a 5xx.
// Two instances racing to claim one session: exactly one wins.

import t from 'tap'
import { fileURLToPath } from 'node:url'
import { Redis } from 'ioredis'
import { sandbox, waitForGone, type Sandbox } from './helpers/index.js'
import { startServer, type ServerProcess, stopServer, tempStateDir } from './helpers/server-process.js'
import { call, redisClient } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'
import { ClusterKeys, createRedis } from '../lib/cluster/redis.js'
import { RedisStore } from '../lib/cluster/redis-store.js'
import { isProcessAlive } from '../lib/processes/terminate.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
// Server starts on a busy 2-core machine take seconds; these only turn a hang into a failure.
const GENEROUS_MS = 90_000
const TTL_MS = 2000

function cursorEnv (redisUrl: string, box: Sandbox, dir: string): Record<string, string> {
  return {
    REDIS_URL: redisUrl,
    INSTANCE_TTL: `${TTL_MS}ms`,
    STATE_DIR: dir,
    FAKE_AGENT_STATE_DIR: box.stateDir,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  }
}

function acpEnv (redisUrl: string, box: Sandbox, dir: string): Record<string, string> {
  return {
    ...cursorEnv(redisUrl, box, dir),
    AGENT_PROTOCOL: 'acp',
    AGENT_COMMAND: `"${process.execPath}" "${ACP_SIMULATOR}"`,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR,FAKE_ACP_FAULTS',
    FAKE_ACP_FAULTS: 'grandchild'
  }
}

async function kill (server: ServerProcess): Promise<void> {
  server.proc.kill('SIGKILL')
  await server.exited
}

function within<T> (promise: Promise<T>, ms: number, what: string): Promise<T> {
  return Promise.race([promise, new Promise<never>((_resolve, reject) => setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms))])
}

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('SIGKILL of the owner: another instance takes its sessions over and the conversation goes on (shared agent storage)', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const dirA = tempStateDir(t)
    const a = await startServer(t, { env: cursorEnv(redis.url, box, dirA), timeoutMs: GENEROUS_MS })
    const b = await startServer(t, { env: cursorEnv(redis.url, box, tempStateDir(t)), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await stopServer(b) })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'remember green' })).status, 200)
    t.equal((await call('POST', `${b.url}/api/heartbeat?session_id=${id}`)).status, 200, 'B forwards to A while A lives')

    await kill(a)
    const killedAt = Date.now()
    // The first request after the crash: B cannot reach A, waits for A's liveness key to expire, then claims.
    const beat = await within(call('POST', `${b.url}/api/heartbeat?session_id=${id}`), GENEROUS_MS, 'the heartbeat after the crash')
    const tookMs = Date.now() - killedAt
    t.equal(beat.status, 200, JSON.stringify(beat.json))
    t.ok(tookMs < TTL_MS + 1000 + 5000, `answered ${tookMs} ms after the crash (INSTANCE_TTL ${TTL_MS} ms; bound with room for a busy machine)`)
    t.ok(b.logs.some((l) => l.msg === 'session claimed' && l.sessionId === id), 'B claimed the session')

    const answer = await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'what was it?' })
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, /^Answer 2: /, 'the conversation (the agent\'s chat) continued on B')
    const history = await call('GET', `${b.url}/api/session/history?session_id=${id}`)
    t.same(history.json.turns.map((turn: { question: string }) => turn.question), ['remember green', 'what was it?'], 'the history came along')

    // A comes back (same STATE_DIR): a new instance, which forwards the session to B.
    const again = await startServer(t, { env: cursorEnv(redis.url, box, dirA), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await stopServer(again) })
    const viaA = await call('POST', `${again.url}/api/heartbeat?session_id=${id}`)
    t.equal(viaA.status, 200)
    t.equal((await call('POST', `${again.url}/api/session/end?session_id=${id}`)).status, 200)
    for (const url of [again.url, b.url]) {
      const gone = await call('POST', `${url}/api/heartbeat?session_id=${id}`)
      t.equal(gone.status, 404)
      t.equal(gone.json.reason, 'ended')
    }
  })

  t.test('SIGKILL of the owner where the agent\'s storage is not shared: 404 with reason instance_lost, never a 5xx', async (t) => {
    const redis = await startRedis(t)
    const boxA = sandbox(t)
    const boxB = sandbox(t)
    const a = await startServer(t, { env: cursorEnv(redis.url, boxA, tempStateDir(t)), timeoutMs: GENEROUS_MS })
    const b = await startServer(t, { env: cursorEnv(redis.url, boxB, tempStateDir(t)), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await stopServer(b) })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'only on A' })).status, 200)
    await kill(a)

    const answer = await within(call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'still there?' }), GENEROUS_MS, 'the ask after the crash')
    t.equal(answer.status, 404, JSON.stringify(answer.json))
    t.equal(answer.json.error, 'SESSION_NOT_FOUND')
    t.equal(answer.json.reason, 'instance_lost')
    const later = await call('POST', `${b.url}/api/heartbeat?session_id=${id}`)
    t.equal(later.status, 404)
    t.equal(later.json.reason, 'instance_lost', 'the reason is remembered')
  })

  t.test('ACP: the dead instance\'s session is loaded (session/load) on the instance that claims it; its agents are swept when it restarts', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const dirA = tempStateDir(t)
    const a = await startServer(t, { env: acpEnv(redis.url, box, dirA), timeoutMs: GENEROUS_MS })
    const b = await startServer(t, { env: acpEnv(redis.url, box, tempStateDir(t)), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await stopServer(b) })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'remember seven' })).status, 200)
    const agentsOfA = box.pids().map((p) => p.pid).filter(isProcessAlive)
    t.ok(agentsOfA.length > 0, 'A runs a live agent')
    await kill(a)

    const answer = await within(call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'which number?' }), GENEROUS_MS, 'the ask after the crash')
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, /previous question "remember seven"/, 'B loaded the conversation')
    t.ok(box.calls().some((line) => line.includes('session/load')), 'B loaded it with session/load')

    // A's agents outlived it (SIGKILL); its restart on the same STATE_DIR tears them down before it serves.
    const again = await startServer(t, { env: acpEnv(redis.url, box, dirA), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await stopServer(again) })
    t.same(agentsOfA.filter(isProcessAlive), [], 'no agent of the dead instance is left after its restart')
    t.ok(again.logs.some((l) => l.msg === 'agent processes left by an earlier run torn down'))
    await stopServer(again)
    await stopServer(b)
    t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'nothing left running')
  })

  t.test('two instances racing to claim one orphaned session: exactly one wins', async (t) => {
    const redis = await startRedis(t)
    const keys = new ClusterKeys('race:')
    const log = { info: () => {}, warn: () => {}, error: () => {}, debug: () => {}, child () { return this } } as any
    const clients: Redis[] = []
    const stores = ['dead', 'x', 'y', 'z'].map((instanceId) => {
      const client = createRedis({ url: redis.url, commandTimeoutMs: 2000, log })
      client.on('error', () => {})
      clients.push(client)
      return new RedisStore({ redis: client, keys, instanceId, log })
    })
    t.teardown(() => { for (const client of clients) client.disconnect() })
    await Promise.all(clients.map(async (client) => { await client.connect() }))
    const admin = redisClient(t, redis.url)
    // x, y and z are live (their liveness keys exist); 'dead' has none.
    for (const id of ['x', 'y', 'z']) await admin.set(keys.instance(id), JSON.stringify({ id, url: 'http://127.0.0.1:1' }), 'PX', 600_000)
    for (let round = 0; round < 20; round++) {
      const id = `race-${round}`
      await stores[0].saved({ id, ref: { chatId: `chat-${round}` } as any, workspaceDir: '/w', createdAt: 1, lastActivity: Date.now(), lastTurnEndedAt: 0, idleTimeoutMs: 600_000, history: [] })
      const claims = await Promise.all(stores.slice(1).map(async (store) => await store.claim(id)))
      const winners = claims.flatMap((c, i) => c.outcome === 'claimed' ? [['x', 'y', 'z'][i]] : [])
      t.equal(winners.length, 1, `round ${round}: exactly one claim wins (${winners.join(', ')})`)
      t.ok(claims.every((c) => c.outcome === 'claimed' || (c.outcome === 'owned' && c.owner === winners[0])), 'the others are told who owns it')
      t.equal(await admin.hget(keys.session(id), 'owner'), winners[0])
      t.equal(await admin.sismember(keys.owned('dead'), id), 0, 'gone from the dead instance\'s set')
      t.equal(await admin.sismember(keys.owned(winners[0]), id), 1, 'in the winner\'s set')
    }
  })
}
