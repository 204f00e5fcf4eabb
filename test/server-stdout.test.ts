// The built standalone server with a stdout whose reader is gone
// (`node dist/server.js | head -2`): every log line after head exits meets
// EPIPE, and neither SIGTERM nor a second signal may hang on it.
// `npm test` builds dist/ before tap runs.

import t, { type Test } from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync } from 'node:fs'
import { join } from 'node:path'
import { isProcessAlive } from '../lib/processes/terminate.js'
import { ROOT, SIMULATOR, sandbox, waitFor, waitForGone } from './helpers/index.js'
import { cleanEnv } from './helpers/server-process.js'

const SERVER = join(ROOT, 'dist', 'server.js')


t.before(() => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
})

/**
 * `node dist/server.js | head -2` through a real shell pipe: head prints the
 * first two log lines (with the server's pid and port) and exits, so every
 * later write to stdout fails with EPIPE.
 */
async function serverPipedToHead (t: Test, env: Record<string, string>): Promise<{ pid: number, url: string, shell: ChildProcess, shellExited: Promise<number | null> }> {
  const shell = spawn('/bin/sh', ['-c', '"$0" "$1" | head -2', process.execPath, SERVER], {
    cwd: ROOT,
    // Its own group, so that the cleanup reaches the server even if the pid was never read.
    detached: true,
    env: cleanEnv({ PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', KILL_GRACE: '1s', CURSOR_AGENT_BIN: SIMULATOR, ...env }),
    stdio: ['ignore', 'pipe', 'ignore']
  })
  t.after(() => { try { process.kill(-shell.pid!, 'SIGKILL') } catch {} })
  const shellExited = new Promise<number | null>((resolve) => shell.once('exit', resolve))
  let out = ''
  shell.stdout!.on('data', (chunk: Buffer) => { out += String(chunk) })
  const lines = await waitFor(() => { const l = out.split('\n').filter(Boolean); return l.length >= 2 ? l : undefined }, 'two log lines through head', 60_000)
  const pid = Number(/"pid":(\d+)/.exec(lines[0])?.[1])
  t.after(() => { try { process.kill(pid, 'SIGKILL') } catch {} })
  const url = /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(lines.join('\n'))?.[1]
  if (url === undefined) throw new Error(`no listening line in ${lines.join('\n')}`)
  return { pid, url, shell, shellExited }
}

/** Waits for the process to be gone; false when it still runs after timeoutMs. */
async function exits (pid: number, timeoutMs: number): Promise<boolean> {
  return (await waitForGone([pid], timeoutMs)).length === 0
}

t.test('stdout\'s reader gone (`| head -2`): SIGTERM still closes the server', async (t) => {
  // Exactly the finding: start, head takes two lines and exits, SIGTERM. The
  // first write to meet EPIPE is then the shutdown's own log line (pino's
  // default destination retried it forever in its exit flush).
  const { pid, shellExited } = await serverPipedToHead(t, {})
  const signalledAt = Date.now()
  process.kill(pid, 'SIGTERM')
  // KILL_GRACE is 1 s; a server that has not exited after 20 s hangs.
  t.ok(await exits(pid, 20_000), `the server exited ${Date.now() - signalledAt} ms after SIGTERM`)
  t.equal(await shellExited, 0, 'and the pipeline with it')
})

t.test('stdout\'s reader gone after some work: SIGTERM still closes the server', async (t) => {
  const { pid, url, shellExited } = await serverPipedToHead(t, {})
  // Work that logs, after head has gone: each of these lines meets EPIPE.
  for (let i = 0; i < 5; i++) t.equal((await fetch(`${url}/api/session/start`, { method: 'POST' })).status, 200)
  process.kill(pid, 'SIGTERM')
  t.ok(await exits(pid, 20_000), 'the server exited')
  t.equal(await shellExited, 0, 'and the pipeline with it')
})

t.test('stdout\'s reader gone: a second signal always ends the server at once, and its agents', async (t) => {
  const box = sandbox(t)
  const { pid, url } = await serverPipedToHead(t, { KILL_GRACE: '60s', FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR' })
  const start = await fetch(`${url}/api/session/start`, { method: 'POST' })
  const id = ((await start.json()) as { session_id: string }).session_id
  const stuck = fetch(`${url}/api/ask?session_id=${id}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' })
  })
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'a stuck turn', 30_000)
  process.kill(pid, 'SIGTERM')
  // The first signal was handled once the in-flight ask is answered (the close then waits out KILL_GRACE, 60 s).
  t.equal((await stuck).status, 503, 'the first signal answered the stuck ask')
  t.ok(isProcessAlive(pid), 'the server is still closing')
  process.kill(pid, 'SIGINT')
  t.ok(await exits(pid, 20_000), 'the second signal ended it well before KILL_GRACE')
  t.same(await waitForGone(box.pids().map((p) => p.pid), 10_000), [], 'and every agent process')
})
