// What we publish needs no devDependency and
// no file we forgot to ship: pack the package, install the tarball with
// production dependencies only into an empty folder, and run it from there.
// The one test that reaches the npm registry (for the dependencies).
// The image itself is built and run for real in test/image.test.ts.

import t from 'tap'
import { execFile, spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { agentWrapper, ROOT, RUN_SIMULATOR_QUICK_VERSION, SIMULATOR, sandbox, waitForGone } from './helpers/index.js'
import { cleanEnv as cleanChildEnv } from './helpers/server-process.js'

const run = promisify(execFile)
// Deadlines only turn a hang into a failure. On a loaded 2-core machine Node.js
// alone can take 15 s to load the server, tsc minutes, and npm install from the
// registry (a cold cache) longer still.
const NODE_DEADLINE_MS = 300_000
const TOOL_DEADLINE_MS = 600_000

/** The environment of a fresh shell: the shared clean one, without npm_* from `npm test`. */
function cleanEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env = cleanChildEnv(extra)
  for (const key of Object.keys(env)) if (/^npm_/i.test(key) && !(key in extra)) delete env[key]
  return env
}

interface PackedFile { path: string }

interface Started {
  server: ChildProcess
  url: string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  output: () => string
}

/** Starts a built server (PORT=0) and resolves with its URL once it listens; SIGKILLed after the test if still running. */
async function startServer (t: { after: (fn: () => void) => void }, cwd: string, argv: string[], env: Record<string, string>): Promise<Started> {
  const server = spawn(argv[0] === 'node' ? process.execPath : argv[0], argv.slice(1), {
    cwd,
    env: cleanEnv({ PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', CURSOR_AGENT_BIN: SIMULATOR, KILL_GRACE: '1s', ...env }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.after(() => { if (server.exitCode === null && server.signalCode === null) server.kill('SIGKILL') })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => {
    server.once('exit', (code, signal) => resolve({ code, signal }))
  })
  let output = ''
  server.stderr!.on('data', (chunk: Buffer) => { output += String(chunk) })
  const url = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`the server did not listen within ${NODE_DEADLINE_MS / 1000} s:\n${output}`)), NODE_DEADLINE_MS)
    server.stdout!.on('data', (chunk: Buffer) => {
      output += String(chunk)
      const found = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)
      if (found !== null) {
        clearTimeout(timer)
        resolve(found[1])
      }
    })
    void exited.then(({ code }) => reject(new Error(`the server exited with ${code}:\n${output}`)))
  })
  return { server, url, exited, output: () => output }
}


t.test('the packed tarball installs with production dependencies only and serves the API', async (t) => {
  const box = sandbox(t)
  // Answers --version well within the health probe's 5 s, however busy the machine.
  const agent = agentWrapper(t, RUN_SIMULATOR_QUICK_VERSION).bin
  const work = mkdtempSync(join(tmpdir(), 'agent-sessions-package-'))
  t.after(() => rmSync(work, { recursive: true, force: true }))
  const started = Date.now()

  // Build only when dist/ is older than the sources (npm test has just built it;
  // rebuilding under other test files that run dist/server.js would race them).
  await run(process.execPath, [join(ROOT, 'scripts', 'ensure-built.mjs')], { cwd: ROOT, env: cleanEnv() })
  // --ignore-scripts: prepack would rebuild dist/ unconditionally, for the same reason.
  const packed = await run('npm', ['pack', '--json', '--ignore-scripts', '--pack-destination', work], { cwd: ROOT, env: cleanEnv(), maxBuffer: 16 * 1024 * 1024 })
  const [info] = JSON.parse(packed.stdout) as Array<{ filename: string, files: PackedFile[] }>
  const files = info.files.map((f) => f.path)
  for (const needed of ['package.json', 'README.md', 'dist/app.js', 'dist/app.d.ts', 'dist/server.js', 'dist/plugins/metrics.js', 'dist/plugins/docs.js', 'dist/routes/metrics.js', 'dist/lib/sessions/manager.js']) {
    t.ok(files.includes(needed), `the tarball has ${needed}`)
  }
  t.same(files.filter((f) => f.endsWith('.ts') && !f.endsWith('.d.ts')), [], 'no TypeScript sources')
  t.same(files.filter((f) => f.endsWith('.map') || f.startsWith('test/') && !f.startsWith('test/fixtures/') || f.startsWith('bench/') || f.startsWith('node_modules/')), [],
    'no source maps, tests, benchmarks or node_modules')

  const consumer = join(work, 'consumer')
  rmSync(consumer, { recursive: true, force: true })
  await run('mkdir', ['-p', consumer])
  writeFileSync(join(consumer, 'package.json'), JSON.stringify({ name: 'consumer', version: '1.0.0', private: true, type: 'module' }, null, 2))
  const install = await run('npm', ['install', '--omit=dev', '--no-audit', '--no-fund', '--no-package-lock', join(work, info.filename)],
    { cwd: consumer, env: cleanEnv(), maxBuffer: 16 * 1024 * 1024, timeout: TOOL_DEADLINE_MS })
  t.comment(`npm pack + install took ${Math.round((Date.now() - started) / 1000)} s: ${install.stdout.trim().split('\n').pop() ?? ''}`)

  // The plugin by its package name, through package.json "exports".
  writeFileSync(join(consumer, 'host.mjs'), `
import Fastify from 'fastify'
import agentSessions from 'fastify-agent-sessions'
const host = Fastify()
await host.register(agentSessions, { prefix: '/agent', cursorAgentBin: process.argv[2], workspaceDir: process.cwd() })
const res = await host.inject({ method: 'GET', url: '/agent/api/health' })
const docs = await host.inject({ method: 'GET', url: '/agent/documentation/json' })
console.log(JSON.stringify({ status: res.statusCode, body: res.json(), paths: Object.keys(docs.json().paths) }))
await host.close()
`)
  const embedded = await run(process.execPath, ['host.mjs', agent], { cwd: consumer, env: cleanEnv({ FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR' }), timeout: NODE_DEADLINE_MS })
  const hosted = JSON.parse(embedded.stdout.trim().split('\n').pop()!)
  t.equal(hosted.status, 200, 'a host app imports and registers the installed package')
  t.equal(hosted.body.agent.available, true)
  t.ok(hosted.paths.includes('/agent/api/ask'))

  // Its types, by package name, as a strict TypeScript host sees them (the
  // repo's compiler and @types/node: the consumer installed no dev tools).
  writeFileSync(join(consumer, 'host.ts'), `
import Fastify from 'fastify'
import fp from 'fastify-plugin'
import agentSessions, { type AgentSessionsOptions, type AgentSessionsDecorators, type SessionInfo } from 'fastify-agent-sessions'
const options: AgentSessionsOptions = { sessionTimeout: '10m', maxSessions: 5, corsOrigins: ['http://localhost:5173'], agentEnv: { CURSOR_API_KEY: 'k' } }
const host = Fastify()
await host.register(agentSessions, { prefix: '/agent', ...options })
await host.register(async (scope) => {
  await scope.register(fp<AgentSessionsOptions>(async (instance, opts) => { await agentSessions(instance, opts) }), options)
  const sessions: SessionInfo[] = scope.agentSessions.list()
  const timeout: number = scope.agentSessionsConfig.sessionTimeoutMs
  const metrics: Promise<string> = scope.agentSessionsMetrics.metrics()
  const running: boolean = scope.agentSessionsReaper.stats().running
  const decorators: AgentSessionsDecorators = scope
  void [sessions, timeout, metrics, running, decorators, scope.agentSessionsOpenapi()]
}, { prefix: '/scoped' })
// @ts-expect-error options are checked: a duration is a string or milliseconds
await host.register(agentSessions, { sessionTimeout: true })
`)
  const typeRoots = join(ROOT, 'node_modules', '@types')
  const tsc = await run(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict', '--skipLibCheck', 'false',
    '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--lib', 'es2023', '--types', 'node', '--typeRoots', typeRoots, 'host.ts'],
  { cwd: consumer, env: cleanEnv(), timeout: TOOL_DEADLINE_MS }).catch((err: { stdout?: string, message: string }) => ({ stdout: err.stdout ?? err.message, failed: true }))
  t.notOk('failed' in tsc, `the package's types check in a strict host:\n${tsc.stdout}`)

  // The standalone server, from the installed package.
  const { server, url, exited, output } = await startServer(t, consumer, [process.execPath, join('node_modules', 'fastify-agent-sessions', 'dist', 'server.js')],
    { WORKSPACE_DIR: consumer, FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR', CURSOR_AGENT_BIN: agent })

  const health = await fetch(`${url}/api/health`)
  t.equal(health.status, 200)
  const body = await health.json() as { status: string, version: string, agent: { available: boolean } }
  t.equal(body.status, 'ok')
  t.equal(body.agent.available, true, 'the agent answered --version')
  const start = await fetch(`${url}/api/session/start`, { method: 'POST', headers: { 'content-type': 'application/json' } })
  t.equal(start.status, 200, 'a session starts (execa and the runner are shipped)')
  const { session_id: id } = await start.json() as { session_id: string }
  const answer = await fetch(`${url}/api/ask?session_id=${id}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'packed?' }) })
  t.equal(answer.status, 200)
  t.equal((await answer.json() as { answer: string }).answer, 'Answer 1: you asked "packed?"')
  t.equal((await fetch(`${url}/metrics`)).status, 200, 'prom-client is shipped')
  t.equal((await fetch(`${url}/documentation/json`)).status, 200, '@fastify/swagger is shipped')

  // SIGTERM with a session still open: a graceful close, exit 0.
  server.kill('SIGTERM')
  const result = await Promise.race([exited, new Promise<null>((resolve) => setTimeout(() => resolve(null), NODE_DEADLINE_MS).unref())])
  t.same(result, { code: 0, signal: null }, `exit 0 on SIGTERM:\n${result === null ? output() : ''}`)
  t.match(output(), /"msg":"closed"/)
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process left')
  t.comment(`packaging test took ${Math.round((Date.now() - started) / 1000)} s`)
})
