// Reaping in a cluster (real redis-server, spawned servers): the expired
// sessions of an instance that died are reaped by whichever instance sweeps
// first, each exactly once, and every instance then answers 404 `expired`.

import t from 'tap'
import { sandbox, type Sandbox } from './helpers/index.js'
import { startServer, type ServerProcess, stopServer, tempStateDir } from './helpers/server-process.js'
import { call, until } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'

const GENEROUS_MS = 90_000

function env (t: { after: (fn: () => unknown) => void }, redisUrl: string, box: Sandbox): Record<string, string> {
  const dir = tempStateDir(t)
  return {
    REDIS_URL: redisUrl,
    INSTANCE_TTL: '2s',
    SESSION_TIMEOUT: '4s',
    CLEANUP_INTERVAL: '200ms',
    STATE_DIR: dir,
    FAKE_AGENT_STATE_DIR: box.stateDir,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  }
}

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('the expired sessions of a dead instance are reaped once, by whichever live instance sweeps first', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const [a, b, c] = await Promise.all([1, 2, 3].map(async () => await startServer(t, { env: env(t, redis.url, box), timeoutMs: GENEROUS_MS })))
    t.teardown(async () => { await Promise.all([stopServer(b), stopServer(c)]) })
    const ids: string[] = []
    for (let i = 0; i < 3; i++) ids.push((await call('POST', `${a.url}/api/session/start`)).json.session_id as string)
    a.proc.kill('SIGKILL')
    await a.exited

    const reapedBy = (server: ServerProcess): string[] => server.logs
      .filter((l) => l.msg === 'expired sessions of lost instances reaped')
      .flatMap((l) => l.sessionIds as string[])
    await until(async () => [...reapedBy(b), ...reapedBy(c)].length >= ids.length, 'the dead instance\'s sessions to be reaped', GENEROUS_MS)
    const all = [...reapedBy(b), ...reapedBy(c)]
    t.same([...all].sort(), [...ids].sort(), `each session reaped exactly once (B ${reapedBy(b).length}, C ${reapedBy(c).length})`)
    for (const id of ids) {
      for (const server of [b, c]) {
        const gone = await call('POST', `${server.url}/api/heartbeat?session_id=${id}`)
        t.equal(gone.status, 404)
        t.equal(gone.json.reason, 'expired', 'reason expired from every instance')
      }
    }
    await until(async () => (await call('GET', `${b.url}/api/health`)).json.cluster?.dead_instances === 0, 'the dead instance to be forgotten', GENEROUS_MS)
    const view = (await call('GET', `${b.url}/api/health`)).json.cluster
    t.equal(view.instances.length, 2)
    t.equal(view.orphaned_sessions, 0)
  })
}
