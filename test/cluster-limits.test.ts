// Limits across a cluster (a real redis-server): MAX_SESSIONS_PER_CLIENT
// counts a client's sessions on every instance, even for starts racing on
// several instances at once, and a SIGTERMed instance (a
// rolling deploy) hibernates and releases its sessions, which the instance
// that gets their next request takes over at once and resumes.

import t from 'tap'
import { fileURLToPath } from 'node:url'
import { sandbox, waitForGone } from './helpers/index.js'
import { startServer, stopServer, tempStateDir } from './helpers/server-process.js'
import { call, redisClient, startInstance } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
const GENEROUS_MS = 90_000

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('per-client limits count across the cluster', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startInstance(t, box, redis.url, { maxSessionsPerClient: 1 })
    const b = await startInstance(t, box, redis.url, { maxSessionsPerClient: 1 })
    t.equal((await call('POST', `${a.url}/api/session/start`)).status, 200)
    const second = await call('POST', `${b.url}/api/session/start`)
    t.equal(second.status, 503, 'the client already holds a session on A')
    t.equal(second.json.error, 'CLIENT_SESSION_LIMIT_REACHED')
    t.ok(second.headers.get('retry-after'))
    // Once it ends its session on A, B lets it start one.
    const held = a.app.agentSessions.list()[0].id
    t.equal((await call('POST', `${b.url}/api/session/end?session_id=${held}`)).status, 200)
    t.equal((await call('POST', `${b.url}/api/session/start`)).status, 200, 'the ended session no longer counts')
    t.equal((await call('POST', `${a.url}/api/session/start`)).status, 503, 'the new one on B counts on A')
    // A client that forges the mark of a forwarded request still counts against its limit.
    const forged = await call('POST', `${a.url}/api/session/start`, undefined, { 'x-agent-sessions-forwarded': 'forged' })
    t.equal(forged.status, 503, 'a start with a forged forwarding mark is counted too')
    t.equal(forged.json.error, 'CLIENT_SESSION_LIMIT_REACHED')
  })

  t.test('starts racing on three instances never take a client past its limit across the cluster', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const limit = 2
    const instances = await Promise.all([0, 1, 2].map(async () => await startInstance(t, box, redis.url, { maxSessionsPerClient: limit })))
    // Each instance alone would let 2 through (its own count): only the cluster-wide place in Redis keeps the total at 2.
    for (let round = 0; round < 3; round++) {
      const starts = await Promise.all(instances.flatMap((i) => [0, 1].map(async () => await call('POST', `${i.url}/api/session/start`))))
      const started = starts.filter((s) => s.status === 200)
      t.equal(started.length, limit, `round ${round}: exactly ${limit} of ${starts.length} racing starts pass`)
      t.same(new Set(starts.filter((s) => s.status !== 200).map((s) => `${s.status} ${String(s.json.error)}`)),
        new Set(['503 CLIENT_SESSION_LIMIT_REACHED']), 'the others are refused with the per-client code')
      // Ending them gives the places back: no start in flight keeps one.
      for (const s of started) {
        t.equal((await call('POST', `${instances[round].url}/api/session/end?session_id=${String(s.json.session_id)}`)).status, 200)
      }
    }
    const client = redisClient(t, redis.url)
    t.same(await client.keys('*client-starting*'), [], 'no place is left held once every start has answered')
  })

  t.test('SIGTERM of one instance: its sessions hibernate, are released, and the next request elsewhere resumes them at once', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const env = (): Record<string, string> => {
      const dir = tempStateDir(t)
      return {
        REDIS_URL: redis.url,
        // Long: a takeover that waited for the liveness key to expire would show.
        INSTANCE_TTL: '60s',
        STATE_DIR: dir,
        AGENT_PROTOCOL: 'acp',
        AGENT_COMMAND: `"${process.execPath}" "${ACP_SIMULATOR}"`,
        FAKE_AGENT_STATE_DIR: box.stateDir,
        AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
      }
    }
    const a = await startServer(t, { env: env(), timeoutMs: GENEROUS_MS })
    const b = await startServer(t, { env: env(), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await Promise.all([stopServer(a), stopServer(b)]) })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'remember nine' })).status, 200)

    a.proc.kill('SIGTERM')
    t.equal((await a.exited).code, 0, 'A stops cleanly')
    t.ok(a.logs.some((l) => l.msg === 'session hibernated' && l.why === 'shutdown'), 'A hibernated the session')
    t.ok(a.logs.some((l) => l.msg === 'sessions released for the other instances' && l.released === 1), 'and released it')

    const startedAt = Date.now()
    const answer = await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'which number?' })
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, /previous question "remember nine"/, 'B resumed the conversation (session/load)')
    t.ok(Date.now() - startedAt < 60_000, 'without waiting for INSTANCE_TTL (60 s)')
    t.match(b.logs.find((l) => l.msg === 'session claimed'), { sessionId: id, from: '(released)' })
    t.ok(box.calls().some((line) => line.includes('session/load')), 'the conversation came back with session/load')
    await stopServer(b)
    t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'nothing left running')
  })
}
