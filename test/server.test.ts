// The built server as its own process: start-up, signals, shutdown with stuck
// turns, and a bad configuration. `npm test` builds dist/ before tap runs.

import t from 'tap'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { ROOT, SIMULATOR, sandbox, waitFor, waitForGone, type Sandbox } from './helpers/index.js'
import { cleanEnv, post, SERVER, startServer as startServerProcess, type ServerProcess } from './helpers/server-process.js'

/** The built server on a free port with the simulator as agent, its state in the sandbox. */
async function startServer (t: { after: (fn: () => unknown) => void }, box: Sandbox, env: Record<string, string> = {}): Promise<ServerProcess> {
  // The agent's environment is an allow-list: the simulator's state dir must be named.
  return await startServerProcess(t, { env: { FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR', ...env } })
}

t.before(() => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
})

t.test('SIGTERM with stuck turns in flight: asks get 503, exit 0 within KILL_GRACE + 2 s, no agent left', async (t) => {
  const box = sandbox(t)
  const server = await startServer(t, box)
  const ids: string[] = []
  for (let i = 0; i < 3; i++) ids.push((await post(`${server.url}/api/session/start`)).json.session_id)
  const asks = ids.map((id) => post(`${server.url}/api/ask?session_id=${id}`, { question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' }))
  await waitFor(() => box.pids().filter((p) => p.role === 'grandchild').length === 3, 'three stuck turns')

  const signalledAt = Date.now()
  server.proc.kill('SIGTERM')
  for (const res of await Promise.all(asks)) {
    t.equal(res.status, 503)
    t.equal(res.json.error, 'SERVICE_UNAVAILABLE')
    t.equal(res.headers.get('connection'), 'close', 'a closing server tells keep-alive clients to go')
  }
  const exit = await server.exited
  const took = exit.at - signalledAt
  // Exit code 0: closed gracefully, within close-with-grace's delay (KILL_GRACE + 5 s) and without its forced exit.
  t.equal(exit.code, 0, 'exit code 0')
  t.ok(took < 1000 + 9000, `exited ${took} ms after SIGTERM (KILL_GRACE 1000 ms; an idle keep-alive would hold it 72 s)`)
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent pid outlives the server')
  const ended = server.logs.filter((l) => l.msg === 'session ended')
  t.equal(ended.length, 3)
  t.ok(ended.every((l) => l.reason === 'shutdown' && l.processes === 'killed'), 'each logged with reason shutdown, killed after SIGKILL')
  t.ok(server.logs.some((l) => l.msg === 'reaper stopped'))
})

t.test('a second signal exits at once and still kills every agent group', async (t) => {
  const box = sandbox(t)
  const server = await startServer(t, box, { KILL_GRACE: '60s' })
  const id = (await post(`${server.url}/api/session/start`)).json.session_id
  void post(`${server.url}/api/ask?session_id=${id}`, { question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' }).catch(() => {})
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'a stuck turn')
  server.proc.kill('SIGTERM')
  // The second signal once the first is being handled (the server says it is closing).
  await waitFor(() => server.logs.some((l) => l.msg === 'closing'), 'the server to start closing')
  const signalledAt = Date.now()
  server.proc.kill('SIGINT')
  const exit = await server.exited
  t.ok(exit.at - signalledAt < 20_000, `exited ${exit.at - signalledAt} ms after the second signal (the grace is 60 s)`)
  t.equal(exit.code, 1)
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'the forced exit left no agent behind')
})

t.test('an idle server exits promptly on SIGTERM and says so', async (t) => {
  const box = sandbox(t)
  const server = await startServer(t, box)
  const start = await post(`${server.url}/api/session/start`)
  t.equal(start.status, 200)
  // Made here: this process's random prefix and a counter, so ids never repeat within the process.
  const made = /^([0-9a-f]{12})-([0-9a-z]+)$/
  const first = made.exec(start.headers.get('x-request-id') ?? '')
  const second = made.exec((await fetch(`${server.url}/api/health`)).headers.get('x-request-id') ?? '')
  t.ok(first !== null && second !== null, 'made request ids are a 12-hex prefix and a base-36 counter')
  t.equal(first?.[1], second?.[1], 'one prefix per process')
  t.ok(parseInt(second?.[2] ?? '0', 36) > parseInt(first?.[2] ?? '0', 36), 'the counter grows')
  const traced = await fetch(`${server.url}/api/health`, { headers: { 'x-request-id': 'trace-42' } })
  t.equal(traced.headers.get('x-request-id'), 'trace-42', 'a well-formed client request id is kept')
  const hostile = await fetch(`${server.url}/api/health`, { headers: { 'x-request-id': 'x'.repeat(300) } })
  t.not(hostile.headers.get('x-request-id'), 'x'.repeat(300), 'an oversized one is replaced')
  for (const path of ['/%', '/api/ask%ZZ']) {
    const bad = await fetch(`${server.url}${path}`, { method: 'POST' })
    t.equal(bad.status, 400, `${path} is a bad request`)
    const body = await bad.json() as Record<string, unknown>
    t.equal(body.error, 'INVALID_REQUEST', `${path} gets the API's error shape, not the router's`)
    t.equal(body.request_id, bad.headers.get('x-request-id'))
  }
  const signalledAt = Date.now()
  server.proc.kill('SIGTERM')
  const exit = await server.exited
  t.equal(exit.code, 0)
  // Far below the 72 s an idle keep-alive connection would hold it, and close-with-grace's forced exit (code 1).
  t.ok(exit.at - signalledAt < 20_000, `exited ${exit.at - signalledAt} ms after SIGTERM`)
  t.ok(server.logs.some((l) => l.msg === 'closing' && l.signal === 'SIGTERM'))
})

t.test('a bad setting stops start-up with a message naming the variable', async (t) => {
  const cases: Array<{ env: Record<string, string>, message: RegExp }> = [
    { env: { SESSION_TIMEOUT: 'soon' }, message: /SESSION_TIMEOUT .*duration/ },
    { env: { MAX_SESSIONS: '0' }, message: /MAX_SESSIONS .*at least 1/ },
    { env: { KILL_SIGNAL: 'SIGSTOP' }, message: /KILL_SIGNAL .*one of SIGTERM/ },
    { env: { WORKSPACE_DIR: '/nonexistent/dir' }, message: /WORKSPACE_DIR .*existing directory/ },
    // Server-only settings have no plugin option to name.
    { env: { PORT: '80a' }, message: /^Invalid configuration: PORT must be a whole number, got "80a"$/m },
    { env: { LOG_LEVEL: 'loud' }, message: /^Invalid configuration: LOG_LEVEL must be one of fatal, .*, got "loud"$/m }
  ]
  for (const c of cases) {
    const proc = spawn(process.execPath, [SERVER], { cwd: ROOT, env: cleanEnv({ PORT: '0', ...c.env }), stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    proc.stderr.on('data', (chunk: Buffer) => { stderr += String(chunk) })
    const code = await new Promise((resolve) => proc.once('exit', resolve))
    t.equal(code, 1, `${JSON.stringify(c.env)} exits 1`)
    t.match(stderr, c.message, stderr.trim())
  }
})

t.test('the app leaves no timer behind: a process that closes it exits on its own', async (t) => {
  const script = `
    const { default: Fastify } = await import('fastify')
    const { default: app } = await import(${JSON.stringify(join(ROOT, 'dist', 'app.js'))})
    const f = Fastify()
    await f.register(app, { cursorAgentBin: ${JSON.stringify(SIMULATOR)}, cleanupInterval: '50ms' })
    await f.ready()
    await new Promise((r) => setTimeout(r, 200))
    await f.close()
    console.log('closed')`
  const proc = spawn(process.execPath, ['--input-type=module', '-e', script], { cwd: ROOT, env: cleanEnv({}), stdio: ['ignore', 'pipe', 'inherit'] })
  let out = ''
  proc.stdout.on('data', (chunk: Buffer) => { out += String(chunk) })
  // A leftover timer keeps the process alive for good; the deadline only turns that into a failure.
  const timer = setTimeout(() => proc.kill('SIGKILL'), 60_000)
  const code = await new Promise((resolve) => proc.once('exit', resolve))
  clearTimeout(timer)
  t.equal(code, 0, 'exited by itself')
  t.equal(out.trim(), 'closed')
})
