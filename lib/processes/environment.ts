// The environment an agent process starts with: an allow-list. The agent runs
// shell commands, so whatever is in its environment a question can print; an
// embedding app's whole host environment (its own tokens and keys) must not
// reach it, nor the service's settings (API_TOKEN above all).

import type { AgentUser } from './agent-user.js'

/** What every agent gets from the server's environment: what a shell and its tools need to run. */
export const BASE_ENV_NAMES: readonly string[] = ['PATH', 'HOME', 'USER', 'LOGNAME', 'SHELL', 'LANG', 'TZ', 'TERM', 'TMPDIR']
/** Locale variables (LC_ALL, LC_CTYPE, ...) pass too. */
const BASE_ENV_PREFIX = 'LC_'

export interface AgentEnvironmentOptions {
  /**
   * Names passed on from the server's environment beyond the base set: the
   * operator's AGENT_ENV_PASS and the driver's own credentials (CURSOR_API_KEY
   * for cursor-agent).
   */
  pass?: readonly string[]
  /** Set as given, over everything else (the embedder's agentEnv). */
  extra?: Record<string, string>
  /**
   * The OS user the agent runs as (AGENT_USER): HOME, USER and LOGNAME describe
   * that user instead of the server's (dropped where the user database does not
   * say), unless `extra` sets them.
   */
  user?: AgentUser
}

/** The agent's whole environment: the base set, the names in `pass`, then `extra`. Nothing else. */
export function agentEnvironment (source: NodeJS.ProcessEnv, options: AgentEnvironmentOptions = {}): Record<string, string> {
  const env: Record<string, string> = {}
  const allowed = new Set([...BASE_ENV_NAMES, ...(options.pass ?? [])])
  for (const [key, value] of Object.entries(source)) {
    if (value === undefined) continue
    if (allowed.has(key) || key.startsWith(BASE_ENV_PREFIX)) env[key] = value
  }
  const user = options.user
  if (user !== undefined) {
    delete env.HOME
    delete env.USER
    delete env.LOGNAME
    if (user.home !== undefined && user.home !== '') env.HOME = user.home
    if (user.name !== undefined) {
      env.USER = user.name
      env.LOGNAME = user.name
    }
  }
  return { ...env, ...options.extra }
}
