// The two real ACP agents that run offline here (acp-agents.md): how to start
// each against the mock model server (test/fixtures/mock-model-server.mjs), in
// a private directory, for end-to-end tests and benchmarks. They are installed
// apart from the package's dependencies by test/agents/install.sh; tests skip
// with `skipReason` when that has not run.

import { existsSync, mkdirSync, readdirSync, writeFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

export const AGENTS_DIR = fileURLToPath(new URL('../agents/', import.meta.url))
const NODE_MODULES = join(AGENTS_DIR, 'node_modules')

/** codex-acp's native binary (the npm bin is a Node wrapper that runs it with spawnSync: two processes instead of one). */
export const CODEX_ACP_BIN = join(NODE_MODULES, '@zed-industries', `codex-acp-${process.platform}-${process.arch}`, 'bin', 'codex-acp')
export const GEMINI_JS = join(NODE_MODULES, '@google', 'gemini-cli', 'bundle', 'gemini.js')

/** A model name codex knows: with an unknown one it prefixes every answer with a "model metadata not found" warning chunk. */
export const CODEX_MODEL = 'gpt-5.4-mini'

export type RealAgentName = 'codex' | 'gemini'

export interface RealAgent {
  name: RealAgentName
  /** False when test/agents/install.sh has not run (or failed): skip with skipReason. */
  installed: boolean
  skipReason: string
  /** AGENT_COMMAND: the command line the service splits into argv (no shell). */
  command: string
  /** The same, already split. */
  argv: string[]
  /** What the agent needs in its environment on top of a basic one (PATH, ...). */
  env: Record<string, string>
  /** The ACP `authenticate` method id to use when the agent lists auth methods and requires one (AGENT_AUTH_METHOD). */
  authMethod: string | null
  /** The agent's private home (its config, sessions and logs live below it). */
  home: string
}

const SKIP = 'real ACP agents not installed: run test/agents/install.sh (CI does)'

export function realAgentsInstalled (): boolean {
  return existsSync(CODEX_ACP_BIN) && existsSync(GEMINI_JS)
}

/**
 * Both agents, pointed at the mock model at `mockUrl` (http://127.0.0.1:PORT),
 * each with its own config under `dir` (a private temp dir the caller removes).
 * Writes the config files; spawns nothing. Call again with the same dir to
 * start a new process that sees the sessions of the previous one (session/load).
 */
export function realAgents (mockUrl: string, dir: string): Record<RealAgentName, RealAgent> {
  return { codex: codexAgent(mockUrl, join(dir, 'codex')), gemini: geminiAgent(mockUrl, join(dir, 'gemini')) }
}

export function codexAgent (mockUrl: string, home: string): RealAgent {
  mkdirSync(home, { recursive: true })
  // approval "never" + full access: sandboxed modes need bubblewrap, absent here, and
  // approvals would turn every tool call into a permission request.
  writeFileSync(join(home, 'config.toml'), [
    'model_provider = "mock"',
    `model = "${CODEX_MODEL}"`,
    'approval_policy = "never"',
    'sandbox_mode = "danger-full-access"',
    '',
    '[model_providers.mock]',
    'name = "Mock"',
    `base_url = "${mockUrl}/v1"`,
    'env_key = "MOCK_API_KEY"',
    'wire_api = "responses"',
    ''
  ].join('\n'))
  const argv = [CODEX_ACP_BIN]
  return {
    name: 'codex',
    installed: existsSync(CODEX_ACP_BIN),
    skipReason: SKIP,
    command: commandLine(argv),
    argv,
    env: { CODEX_HOME: home, MOCK_API_KEY: 'mock-key' },
    authMethod: null,
    home
  }
}

export function geminiAgent (mockUrl: string, home: string): RealAgent {
  mkdirSync(join(home, '.gemini'), { recursive: true })
  writeFileSync(join(home, '.gemini', 'settings.json'), JSON.stringify({
    security: { auth: { selectedType: 'gemini-api-key' } },
    general: { enableAutoUpdate: false, enableAutoUpdateNotification: false },
    telemetry: { enabled: false },
    privacy: { usageStatisticsEnabled: false }
  }, null, 2) + '\n')
  const argv = [process.execPath, GEMINI_JS, '--acp']
  return {
    name: 'gemini',
    installed: existsSync(GEMINI_JS),
    skipReason: SKIP,
    command: commandLine(argv),
    argv,
    env: {
      HOME: home,
      GEMINI_API_KEY: 'mock-key',
      GOOGLE_GEMINI_BASE_URL: mockUrl,
      // Without it gemini relaunches itself as a child and the leader ignores SIGTERM.
      GEMINI_CLI_NO_RELAUNCH: 'true',
      // A test runner's NODE_OPTIONS (tap's loaders) must not reach the agent's Node.
      NODE_OPTIONS: ''
    },
    authMethod: 'gemini-api-key',
    home
  }
}

/**
 * gemini-cli 0.61.0 names a session's file `session-<UTC minute>-<id prefix>.jsonl`
 * and, on session/load, first starts a fresh recording for the id being loaded:
 * within the same UTC minute as the session's creation that lands in the SAME
 * file and empties it, so the load fails ("No previous sessions found", -32603)
 * or replays nothing. Once the minute has changed it writes a stray empty file
 * instead and the load works. Resolves when a session/load of `sessionId` can
 * work (at once for codex, or when no file of the session is found). Without
 * a session id, waits for every session in the agent's home: a client of the
 * service never learns the agent's own session id.
 */
export async function untilSessionLoadable (agent: RealAgent, sessionId?: string): Promise<void> {
  if (agent.name !== 'gemini') return
  const minutes = new Set<string>()
  const tmp = join(agent.home, '.gemini', 'tmp')
  for (const project of existsSync(tmp) ? readdirSync(tmp) : []) {
    const chats = join(tmp, project, 'chats')
    for (const file of existsSync(chats) ? readdirSync(chats) : []) {
      const m = /^session-(\d{4}-\d{2}-\d{2}T\d{2}-\d{2})-(.{8})\.jsonl?$/.exec(file)
      if (m !== null && (sessionId === undefined || m[2] === sessionId.slice(0, 8))) minutes.add(m[1])
    }
  }
  const minuteNow = (): string => new Date().toISOString().slice(0, 16).replace(/:/g, '-')
  while (minutes.has(minuteNow())) {
    const msLeft = 60_000 - (Date.now() % 60_000)
    await new Promise((resolve) => setTimeout(resolve, msLeft + 50))
  }
}

/**
 * A small environment to start an agent with: PATH and locale from ours, none
 * of the test runner's variables, plus the agent's own.
 */
export function agentEnv (agent: RealAgent): Record<string, string> {
  const env: Record<string, string> = {}
  for (const key of ['PATH', 'LANG', 'LC_ALL', 'TZ', 'TMPDIR']) {
    const value = process.env[key]
    if (value !== undefined) env[key] = value
  }
  env.HOME ??= agent.home
  return { ...env, ...agent.env }
}

/** Joins argv into one command line that a POSIX-style splitter turns back into the same argv. */
export function commandLine (argv: readonly string[]): string {
  return argv.map((arg) => /^[\w@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", "'\\''")}'`).join(' ')
}
