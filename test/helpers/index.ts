// Test helpers: build the app against the simulator, read the pids it
// recorded, and prove they are gone.

import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { createServer } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import fp from 'fastify-plugin'
import Fastify, { type FastifyInstance, type LightMyRequestResponse } from 'fastify'
import agentSessions, { type AgentSessionsOptions } from '../../app.js'
import type { AgentConversation, AgentDriver } from '../../lib/agents/types.js'
import { isProcessAlive, signalGroup } from '../../lib/processes/terminate.js'

// Deadlines of the tests: a deadline only turns a hang into a failure, it
// never decides a result, so it is at least 10x what the awaited thing takes
// on a loaded 2-core machine. There, Node.js itself can take 5 s to start (4
// busy loops beside the usual load), so a simulator turn takes 5 to 10 s
// instead of 0.1 s. Elapsed-time claims are asserted separately, with bounds of
// their own.
/** Any agent call (create-chat, a turn) that is not itself under test. */
export const AGENT_CALL_TIMEOUT_MS = 120_000
/** Waiting for an event: a reap, a process group gone, a process started. */
export const EVENT_TIMEOUT_MS = 60_000

// fastify-plugin marks the function it wraps, so wrapping `agentSessions` itself
// would strip the encapsulation (and the prefix) from every later use in the
// process: wrap a fresh function instead. Lifting the decorators to the test
// instance lets tests reach the manager and the reaper.
export const liftDecorators = fp(async (instance: FastifyInstance, options: AgentSessionsOptions) => {
  await agentSessions(instance, options)
})

export const SIMULATOR = fileURLToPath(new URL('../fixtures/fake-cursor-agent.mjs', import.meta.url))
export const ROOT = fileURLToPath(new URL('../..', import.meta.url))

interface TapLike {
  after: (fn: () => unknown) => void
  teardown?: (fn: () => unknown) => void
}

export interface Sandbox {
  stateDir: string
  /** The simulators' pid log: every process they started, with its role (main, grandchild, ...). */
  pids: () => Array<{ pid: number, role: string }>
  /** The ACP simulator's calls.log: one line per call it received, `<pid> <method> ...`. */
  calls: () => string[]
}

/** A fresh simulator state dir (chats + pid log), removed after the test; every recorded pid is killed then too. */
export function sandbox (t: TapLike): Sandbox {
  const stateDir = mkdtempSync(join(tmpdir(), 'agent-sessions-test-'))
  const lines = (file: string): string[] => {
    try {
      return readFileSync(join(stateDir, file), 'utf8').split('\n').filter(Boolean)
    } catch {
      return []
    }
  }
  const pids = (): Array<{ pid: number, role: string }> => lines('pids.log').map((line) => {
    const [pid, role] = line.split(' ')
    return { pid: Number(pid), role }
  })
  t.after(() => {
    // Safety net only: the assertions that count are in the tests.
    for (const { pid } of pids()) {
      try { process.kill(pid, 'SIGKILL') } catch {}
      signalGroup(pid, 'SIGKILL')
    }
    rmSync(stateDir, { recursive: true, force: true })
  })
  return { stateDir, pids, calls: () => lines('calls.log') }
}

/** A port of 127.0.0.1 that was free a moment ago (for a child process that must be told its port). */
export async function freePort (): Promise<number> {
  return await new Promise((resolve, reject) => {
    const server = createServer()
    server.once('error', reject)
    server.listen(0, '127.0.0.1', () => {
      const { port } = server.address() as { port: number }
      server.close(() => resolve(port))
    })
  })
}

export const RUN_SIMULATOR = `exec "${process.execPath}" "${SIMULATOR}" "$@"`

/** What the simulator prints for --version. */
export const SIMULATOR_VERSION = '2026.11.20-fake'

/**
 * The simulator, except that the shell answers --version at once: health's
 * version probe has a production timeout of 5 s, which Node.js alone can take
 * to start on a loaded machine. For tests that assert the probe's result.
 */
export const RUN_SIMULATOR_QUICK_VERSION = `if [ "$1" = "--version" ]; then echo "${SIMULATOR_VERSION}"; exit 0; fi
${RUN_SIMULATOR}`

/**
 * A cursor-agent in a temp dir that a test can remove and put back: like the
 * real one, a shell script around a Node program (the simulator, unless the
 * test's script plays some part itself).
 */
export function agentWrapper (t: TapLike, script = RUN_SIMULATOR): { bin: string, install: () => void, remove: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'agent-bin-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const bin = join(dir, 'cursor-agent')
  const install = (): void => writeFileSync(bin, `#!/bin/sh\n${script}\n`, { mode: 0o755 })
  install()
  return { bin, install, remove: () => rmSync(bin) }
}

export interface BuildOptions extends AgentSessionsOptions {
  logger?: boolean | object
}

/**
 * For a test that makes turns time out: the turns `underTest` picks keep the
 * app's ASK_TIMEOUT (set short by the test); every other turn gets
 * AGENT_CALL_TIMEOUT_MS, so only the operation under test can time out
 * (starts have START_TIMEOUT, which build() keeps generous).
 */
export function onlyTheseTurnsTimeOut (underTest: (prompt: string) => boolean): (driver: AgentDriver) => AgentDriver {
  const generous = (conversation: AgentConversation): AgentConversation => ({
    get ref () { return conversation.ref },
    get alive () { return conversation.alive },
    get pid () { return conversation.pid },
    prompt: async (text, options) => await conversation.prompt(text, underTest(text) ? options : { ...options, timeoutMs: AGENT_CALL_TIMEOUT_MS }),
    cancel: () => conversation.cancel(),
    suspend: async () => await conversation.suspend(),
    close: async () => await conversation.close(),
    onExit: (listener) => { conversation.onExit(listener) }
  })
  return (driver) => ({
    protocol: driver.protocol,
    keepsProcesses: driver.keepsProcesses,
    open: async (options) => generous(await driver.open(options)),
    resume: async (ref, options) => generous(await driver.resume(ref, options)),
    info: async (options) => await driver.info(options),
    livePids: () => driver.livePids(),
    onProcessFinished: (listener) => { driver.onProcessFinished(listener) },
    drain: async () => await driver.drain()
  })
}

/** The app as a host would register it, ready, closed after the test. */
export async function build (t: TapLike, box: Sandbox, options: BuildOptions = {}): Promise<FastifyInstance> {
  const { logger = false, ...pluginOptions } = options
  const app = Fastify({ logger: logger as boolean, return503OnClosing: false })
  await app.register(liftDecorators, {
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    killGrace: '1s',
    askTimeout: AGENT_CALL_TIMEOUT_MS,
    startTimeout: AGENT_CALL_TIMEOUT_MS,
    ...pluginOptions,
    agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir, ...pluginOptions.agentEnv }
  })
  await app.ready()
  t.after(() => app.close())
  return app
}

export async function startSession (app: FastifyInstance, body?: object): Promise<string> {
  const res = await app.inject({
    method: 'POST',
    url: '/api/session/start',
    headers: { 'content-type': 'application/json' },
    ...(body === undefined ? {} : { payload: body })
  })
  if (res.statusCode !== 200) throw new Error(`start failed: ${res.statusCode} ${res.body}`)
  return res.json().session_id
}

export async function ask (app: FastifyInstance, sessionId: string, question: string): Promise<LightMyRequestResponse> {
  return await app.inject({
    method: 'POST',
    url: `/api/ask?session_id=${encodeURIComponent(sessionId)}`,
    payload: { question }
  })
}

/** Waits until none of the pids runs (zombies count as gone); returns those still alive at the deadline. */
export async function waitForGone (pids: number[], timeoutMs = EVENT_TIMEOUT_MS): Promise<number[]> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const alive = pids.filter(isProcessAlive)
    if (alive.length === 0 || Date.now() >= deadline) return alive
    await sleep(25)
  }
}

/** Polls until the probe holds; probes once more after any pause before giving up. */
export async function waitFor<T> (probe: () => T | undefined | false, what: string, timeoutMs = EVENT_TIMEOUT_MS): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = probe()
    if (value !== undefined && value !== false) return value
    if (Date.now() >= deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(20)
  }
}

export function sleep (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms))
}
