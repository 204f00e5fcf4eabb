// The built server (dist/server.js) as its own process, for tests that need
// real signals, restarts and crashes. `npm test` builds dist/ before tap runs.

import { spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { SERVICE_ENV_NAMES } from '../../lib/config.js'
import { ROOT, SIMULATOR, waitFor } from './index.js'

export const SERVER = join(ROOT, 'dist', 'server.js')

/**
 * This process's environment for a child (a server, a benchmark, a shell):
 * without tap's loader hooks, which children must not inherit, and without any
 * of the service's settings from whoever runs the tests (a token, a HOST, a
 * TRUST_PROXY), plus extra.
 */
export function cleanEnv (extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [key, value] of Object.entries(process.env)) {
    if (key === 'NODE_OPTIONS' || key.startsWith('TAP') || key.startsWith('_TAPJS') || SERVICE_ENV_NAMES.includes(key)) continue
    env[key] = value
  }
  return { ...env, ...extra }
}

export interface ServerProcess {
  proc: ChildProcess
  url: string
  logs: Array<Record<string, unknown>>
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null, at: number }>
}

export interface StartOptions {
  env?: Record<string, string>
  /** How long to wait for "Server listening" (a start with an orphan sweep or a slow agent takes longer). */
  timeoutMs?: number
}

/** Starts the server on a free port of 127.0.0.1 and waits until it listens; killed after the test if still running. */
export async function startServer (t: { after: (fn: () => unknown) => void }, options: StartOptions = {}): Promise<ServerProcess> {
  const started = spawnServer(t, options.env ?? {})
  const listening = await waitFor(() => started.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('Server listening at http://127.0.0.1')) ??
    (started.proc.exitCode !== null ? { msg: '' } : undefined), 'the server to listen', options.timeoutMs ?? 60_000)
  if (listening.msg === '') throw new Error(`the server exited with ${started.proc.exitCode}: ${JSON.stringify(started.logs.slice(-5))}`)
  const url = /http:\/\/127\.0\.0\.1:\d+/.exec(listening.msg as string)![0]
  return { ...started, url }
}

/** Spawns the server without waiting for it (for a start that is expected to fail). */
export function spawnServer (t: { after: (fn: () => unknown) => void }, env: Record<string, string>): Omit<ServerProcess, 'url'> {
  const proc = spawn(process.execPath, [SERVER], {
    cwd: ROOT,
    env: cleanEnv({
      PORT: '0',
      HOST: '127.0.0.1',
      CURSOR_AGENT_BIN: SIMULATOR,
      KILL_GRACE: '1s',
      LOG_LEVEL: 'info',
      ...env
    }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.after(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
  const logs: Array<Record<string, unknown>> = []
  let buffered = ''
  proc.stdout!.on('data', (chunk: Buffer) => {
    buffered += String(chunk)
    let nl: number
    while ((nl = buffered.indexOf('\n')) !== -1) {
      const line = buffered.slice(0, nl)
      buffered = buffered.slice(nl + 1)
      try { logs.push(JSON.parse(line)) } catch {}
    }
  })
  proc.stderr!.on('data', (chunk: Buffer) => { logs.push({ stderr: String(chunk) }) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null, at: number }>((resolve) => {
    proc.once('exit', (code, signal) => resolve({ code, signal, at: Date.now() }))
  })
  return { proc, logs, exited }
}

export async function post (url: string, body?: object): Promise<{ status: number, json: Record<string, any>, headers: Headers }> {
  const res = await fetch(url, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    ...(body === undefined ? {} : { body: JSON.stringify(body) })
  })
  return { status: res.status, json: await res.json() as Record<string, any>, headers: res.headers }
}

/** A STATE_DIR of its own for one server, removed after the test. */
export function tempStateDir (t: { after: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-state-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/** SIGTERM, then waits for the exit; nothing to do for a server that already exited. */
export async function stopServer (server: Pick<ServerProcess, 'proc' | 'exited'>): Promise<void> {
  if (server.proc.exitCode !== null || server.proc.signalCode !== null) return
  server.proc.kill('SIGTERM')
  await server.exited
}
