// The README's examples as a newcomer copies them (test/readme.test.ts checks its tables): the embed example must
// type-check and run as written. Needs dist/ (`npm test` builds it first): the
// example imports the package by its name.

import t from 'tap'
import { execFile, spawn } from 'node:child_process'
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { agentWrapper, ROOT, RUN_SIMULATOR_QUICK_VERSION, sandbox, waitFor, waitForGone } from './helpers/index.js'
import { cleanEnv } from './helpers/server-process.js'

const run = promisify(execFile)
// Only turn a hang into a failure: on a loaded machine tsc, and Node.js loading
// Fastify through tsx, can take minutes.
const TOOL_DEADLINE_MS = 600_000
const START_DEADLINE_MS = 300_000

/** The first ```ts block after a heading. */
function codeAfter (heading: string): string {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
  const found = new RegExp(`^## ${heading}\\n[\\s\\S]*?^\`\`\`ts\\n([\\s\\S]*?)^\`\`\`$`, 'm').exec(readme)
  if (found === null) throw new Error(`no ts example under "## ${heading}" in README.md`)
  return found[1]
}


t.test('the embed example type-checks and runs as written', async (t) => {
  const box = sandbox(t)
  const dir = mkdtempSync(join(tmpdir(), 'readme-embed-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  // A project that installed the package and Fastify (and tsx, to run TypeScript).
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ name: 'host', private: true, type: 'module' }))
  mkdirSync(join(dir, 'node_modules'))
  symlinkSync(ROOT, join(dir, 'node_modules', 'fastify-agent-sessions'))
  for (const dep of ['fastify', 'tsx']) symlinkSync(join(ROOT, 'node_modules', dep), join(dir, 'node_modules', dep))
  writeFileSync(join(dir, 'host.ts'), codeAfter('Embed it in your Fastify app'))
  // Its secrets, as files.
  const secrets = join(dir, 'secrets')
  mkdirSync(secrets)
  writeFileSync(join(secrets, 'agent-api-token'), 'readme-token-0123456789abcdef\n')
  writeFileSync(join(secrets, 'cursor-api-key'), 'key_from_the_secret_file\n')
  // cursor-agent on PATH: the simulator, keeping its state in the sandbox.
  const agent = agentWrapper(t, `export FAKE_AGENT_STATE_DIR="${box.stateDir}"\n${RUN_SIMULATOR_QUICK_VERSION}`)

  const typeRoots = join(ROOT, 'node_modules', '@types')
  const tsc = await run(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '--noEmit', '--strict',
    '--module', 'nodenext', '--moduleResolution', 'nodenext', '--target', 'es2022', '--lib', 'es2023', '--types', 'node', '--typeRoots', typeRoots, 'host.ts'],
  { cwd: dir, env: cleanEnv({}), timeout: TOOL_DEADLINE_MS }).catch((err: { stdout?: string, message: string }) => ({ stdout: err.stdout ?? err.message, failed: true }))
  t.notOk('failed' in tsc, `the example type-checks:\n${tsc.stdout}`)

  const host = spawn(process.execPath, ['--import', 'tsx', 'host.ts'], {
    cwd: dir,
    env: cleanEnv({ PORT: '0', SECRETS_DIR: secrets, PATH: `${join(agent.bin, '..')}:${process.env.PATH ?? ''}` }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.after(() => { if (host.exitCode === null && host.signalCode === null) host.kill('SIGKILL') })
  let output = ''
  host.stdout.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  host.stderr.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  const exited = new Promise<void>((resolve) => host.once('exit', () => resolve()))
  const url = await waitFor(() => /Server listening at (http:\/\/(?:127\.0\.0\.1|\[::1\]):\d+)/.exec(output)?.[1] ?? (host.exitCode !== null && `exited: ${output}`),
    'the example to listen', START_DEADLINE_MS)
  if (!url.startsWith('http')) return t.fail(`the example did not listen: ${url}`)

  t.equal((await fetch(`${url}/agent/api/health`)).status, 200, 'health, under the prefix')
  const post = async (path: string, body?: object, token = 'readme-token-0123456789abcdef'): Promise<Response> =>
    await fetch(`${url}/agent${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
      ...(body === undefined ? {} : { body: JSON.stringify(body) })
    })
  t.equal((await post('/api/session/start', undefined, 'wrong')).status, 401, 'the token from the secret file is required')
  const start = await post('/api/session/start')
  t.equal(start.status, 200, 'a session starts with cursor-agent from PATH')
  const { session_id: id } = await start.json() as { session_id: string }
  const asked = await post(`/api/ask?session_id=${id}`, { question: 'env please [[show:env]]' })
  t.equal(asked.status, 200)
  const env = JSON.parse((await asked.json() as { answer: string }).answer) as Record<string, string>
  t.equal(env.CURSOR_API_KEY, 'key_from_the_secret_file', 'agentEnv reaches the agent')
  t.equal((await post(`/api/session/end?session_id=${id}`)).status, 200)

  host.kill('SIGTERM')
  await exited
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process left')
})
