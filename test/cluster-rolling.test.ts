// A rolling deploy under traffic (real redis-server, spawned servers): while
// the owner of a session stops (SIGTERM, its ACP agent slow to go), requests
// for the session keep arriving through another instance; each is answered,
// by the owner until it refuses, then by the instance that takes the released
// session over. None fails. A request that reaches the owner while it stops
// (503 with the closing mark) waits for the release too.

import t from 'tap'
import { Writable } from 'node:stream'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { sandbox, waitForGone, type Sandbox } from './helpers/index.js'
import { startServer, type ServerProcess, stopServer, tempStateDir } from './helpers/server-process.js'
import { call, startInstance } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
const GENEROUS_MS = 90_000

function env (t: { after: (fn: () => unknown) => void }, redisUrl: string, box: Sandbox): Record<string, string> {
  const dir = tempStateDir(t)
  return {
    REDIS_URL: redisUrl,
    INSTANCE_TTL: '3s',
    KILL_GRACE: '2s',
    STATE_DIR: dir,
    AGENT_PROTOCOL: 'acp',
    AGENT_COMMAND: `"${process.execPath}" "${ACP_SIMULATOR}"`,
    // The agent ignores SIGTERM and stdin's end (the driver closes it first): the owner's
    // hibernation takes KILL_GRACE, a window for requests to arrive.
    FAKE_ACP_FAULTS: 'ignore-sigterm,ignore-stdin-eof',
    FAKE_AGENT_STATE_DIR: box.stateDir,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR,FAKE_ACP_FAULTS'
  }
}

/** Log lines of an in-process instance, as objects. */
function logLines (): { lines: Array<Record<string, unknown>>, logger: object } {
  const lines: Array<Record<string, unknown>> = []
  const stream = new Writable({
    write (chunk: Buffer, _encoding, done) {
      for (const line of String(chunk).split('\n')) if (line !== '') lines.push(JSON.parse(line) as Record<string, unknown>)
      done()
    }
  })
  return { lines, logger: { level: 'info', stream } }
}

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('heartbeats through B while the owner A stops: every one answered 200, the session ends up on B with its conversation', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startServer(t, { env: env(t, redis.url, box), timeoutMs: GENEROUS_MS })
    const b = await startServer(t, { env: env(t, redis.url, box), timeoutMs: GENEROUS_MS })
    t.teardown(async () => { await Promise.all([stopServer(a), stopServer(b)]) })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'remember four' })).status, 200)

    const results: string[] = []
    let running = true
    const traffic = (async () => {
      while (running) {
        const res = await call('POST', `${b.url}/api/heartbeat?session_id=${id}`)
        results.push(res.status === 200 ? '200' : `${res.status} ${JSON.stringify(res.json)}`)
        await new Promise((resolve) => setTimeout(resolve, 20))
      }
    })()
    // Traffic flows through B to A before A is told to stop.
    while (results.length < 5) await new Promise((resolve) => setTimeout(resolve, 20))
    a.proc.kill('SIGTERM')
    t.equal((await a.exited).code, 0, 'A stops cleanly')
    const afterExit = results.length
    while (results.length < afterExit + 5) await new Promise((resolve) => setTimeout(resolve, 20))
    running = false
    await traffic
    t.same(results.filter((r) => r !== '200'), [], `all ${results.length} heartbeats through B answered 200`)
    t.ok(b.logs.some((l) => l.msg === 'session claimed' && l.sessionId === id), 'B took the session over')
    const waits = b.logs.filter((l) => typeof l.msg === 'string' && l.msg.startsWith('owner of the session cannot answer')).map((l) => l.outcome)
    // A stops taking connections once it starts closing ('unreachable'); a request already on one gets 503 and the closing mark ('closing').
    t.comment(`B waited for A to let go ${waits.length} time(s): ${waits.join(', ')}`)
    const answer = await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'which number?' })
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, /previous question "remember four"/)
    await stopServer(b)
    t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'nothing left running')
  })

  t.test('a request forwarded to an owner that is stopping but still listening: 503 with the closing mark, and B takes the session over once A lets it go', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const acp = {
      agentProtocol: 'acp' as const,
      agentCommand: `"${process.execPath}" "${ACP_SIMULATOR}"`,
      // The agent ignores SIGTERM and stdin's end (else it exits at once and A releases the
      // session before B asks): A's hibernation takes KILL_GRACE, while A still answers HTTP.
      killGrace: '3s',
      agentEnv: { FAKE_ACP_FAULTS: 'ignore-sigterm,ignore-stdin-eof' }
    }
    const a = await startInstance(t, box, redis.url, { ...acp, instanceTtl: '60s' })
    const bLog = logLines()
    const b = await startInstance(t, box, redis.url, { ...acp, instanceTtl: '60s', logger: bLog.logger })
    const id = (await call('POST', `${a.url}/api/session/start`)).json.session_id as string
    t.equal((await call('POST', `${a.url}/api/ask?session_id=${id}`, { question: 'remember five' })).status, 200)

    // What SIGTERM starts, without closing A's HTTP server: its sessions hibernate (KILL_GRACE), then are released.
    const stopping = a.app.agentSessions.shutdown()
    t.ok(a.app.agentSessions.closed, 'A is stopping')
    const beat = await call('POST', `${b.url}/api/heartbeat?session_id=${id}`)
    t.equal(beat.status, 200, `B answered once A let go: ${JSON.stringify(beat.json)}`)
    t.match(bLog.lines.find((l) => l.msg === 'owner of the session cannot answer: taking it over once it lets go'), { sessionId: id, outcome: 'closing' },
      'B got A\'s refusal with the closing mark and waited for the release')
    t.match(bLog.lines.find((l) => l.msg === 'session claimed'), { sessionId: id, from: '(released)' })
    await stopping
    const answer = await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'which number?' })
    t.match(answer.json.answer, /previous question "remember five"/, 'B resumed the conversation')
    await a.close()
    await b.close()
    t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'nothing left running')
  })
}
