// Shared by the AGENT_USER tests: the agent user (`nobody`), a uid no user
// database lists, directories every user may write, and the built server.

import { spawn, type ChildProcess } from 'node:child_process'
import { chmodSync, copyFileSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { resolveAgentUser, workspaceAccessProblem } from '../../lib/processes/agent-user.js'
import { ROOT, SIMULATOR, sandbox, waitFor, type Sandbox } from './index.js'
import { cleanEnv } from './server-process.js'
export { cleanEnv }

export const SERVER = join(ROOT, 'dist', 'server.js')
export const IS_ROOT = process.getuid?.() === 0
let nobody: { uid: number, gid: number } | undefined
try {
  const user = resolveAgentUser('nobody')
  nobody = { uid: user.uid, gid: user.gid }
} catch {}
export const NOBODY = nobody
export const needsRoot = !IS_ROOT ? 'needs root (CI runs as root)' : NOBODY === undefined ? 'needs a `nobody` user' : false
// A uid no user database lists, for a process that is neither root nor the agent user.
export const STRANGER_UID = 54321

/** A directory every user may use: what the agent user writes (the simulator's state, the probes) lives here. */
export function sharedDir (t: Test, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  chmodSync(dir, 0o777)
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

export function sharedSandbox (t: Test): Sandbox {
  const box = sandbox(t)
  chmodSync(box.stateDir, 0o777)
  return box
}

/**
 * Why a process of this uid cannot run code from this checkout, or undefined.
 * A checkout under a directory only root enters (`mktemp -d` makes them) is out
 * of every other user's reach; tests that run the server or the library as
 * another user say so instead of failing.
 */
export function checkoutOutOfReach (uid: number, gid: number): string | undefined {
  return workspaceAccessProblem({ uid, gid }, ROOT)
}

/**
 * The cursor-agent simulator where the agent user can run it: a copy in a
 * directory every user may read (the checkout may be out of its reach). The
 * simulator is one file importing only Node's own modules.
 */
export function simulatorForAgentUser (t: Test): string {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-simulator-'))
  chmodSync(dir, 0o755)
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const copy = join(dir, 'fake-cursor-agent.mjs')
  copyFileSync(SIMULATOR, copy)
  chmodSync(copy, 0o755)
  return copy
}

/**
 * Why agents cannot run as the agent user in this test run, or false. Besides
 * root, the agent user must reach the checkout: under tap every Node.js child
 * process (the server, and through it the agent) loads tap's process-info hook
 * from node_modules, whatever environment it was given.
 */
export const agentUserCannotRun: string | false = needsRoot !== false
  ? needsRoot
  : ((problem) => problem === undefined ? false : `the agent user cannot reach this checkout, where tap's hook for child processes lives (${problem})`)(checkoutOutOfReach(NOBODY!.uid, NOBODY!.gid))

export function uidOf (pid: number): number | undefined {
  try {
    return Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1])
  } catch {
    return undefined
  }
}


export interface Server { proc: ChildProcess, url: string, output: () => string, exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }> }

export async function startServer (t: Test, env: Record<string, string>): Promise<Server> {
  const proc = spawn(process.execPath, [SERVER], {
    cwd: ROOT,
    // The agent user must enter WORKSPACE_DIR, and the checkout may sit under a directory only root enters.
    env: cleanEnv({ PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', KILL_GRACE: '1s', WORKSPACE_DIR: sharedDir(t, 'agent-sessions-workspace-'), ...env }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.after(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
  let output = ''
  proc.stdout!.on('data', (chunk: Buffer) => { output += String(chunk) })
  proc.stderr!.on('data', (chunk: Buffer) => { output += String(chunk) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })))
  const url = await Promise.race([
    waitFor(() => /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)?.[1], 'the server to listen', 60_000),
    exited.then(() => { throw new Error(`the server exited: ${output}`) })
  ])
  return { proc, url, output: () => output, exited }
}

/** Runs the built server until it exits by itself (a refused start); SIGKILLed after 30 s. */
export async function refusedStart (command: string[], env: Record<string, string>, uid?: number): Promise<{ code: number | null, output: string }> {
  const [bin, ...args] = command
  const proc = spawn(bin, args, { cwd: ROOT, env: cleanEnv({ PORT: '0', ...env }), stdio: ['ignore', 'pipe', 'pipe'], ...(uid === undefined ? {} : { uid, gid: uid }) })
  let output = ''
  proc.stdout.on('data', (chunk: Buffer) => { output += String(chunk) })
  proc.stderr.on('data', (chunk: Buffer) => { output += String(chunk) })
  const guard = setTimeout(() => proc.kill('SIGKILL'), 30_000)
  const code = await new Promise<number | null>((resolve) => proc.once('exit', resolve))
  clearTimeout(guard)
  return { code, output }
}

