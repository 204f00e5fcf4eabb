// Decorates the instance with the SessionManager, wired to the cursor-agent
// runner the configuration describes (or one the embedder injects).

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { CursorAgentRunner } from '../lib/agents/cursor-print.js'
import type { AgentRunner } from '../lib/agents/types.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import { SERVICE_ENV_NAMES } from '../lib/config.js'
import { SessionManager } from '../lib/sessions/manager.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessions: SessionManager
  }
}

export interface SessionManagerPluginOptions {
  /** Extra environment for every agent process (e.g. CURSOR_API_KEY from a secret store). */
  agentEnv?: Record<string, string>
  /** A different agent driver (tests, benchmarks, a long-lived ACP driver). */
  runner?: AgentRunner
  /**
   * Wraps the agent driver (the configured one, or `runner`). For tests: a
   * test that makes one turn time out gives every other call a timeout of its
   * own, so the machine's speed cannot decide the rest.
   */
  wrapRunner?: (runner: AgentRunner) => AgentRunner
  /** Clock in epoch milliseconds; injectable for tests. */
  now?: () => number
}

async function sessionManagerPlugin (fastify: FastifyInstance, options: SessionManagerPluginOptions): Promise<void> {
  const config = fastify.agentSessionsConfig
  const log = fastify.log.child({ component: 'agent-sessions' })
  const configured = options.runner ?? new CursorAgentRunner({
    bin: config.cursorAgentBin,
    workspaceDir: config.workspaceDir,
    env: agentEnvironment(process.env, SERVICE_ENV_NAMES, options.agentEnv),
    killSignal: config.killSignal,
    killGraceMs: config.killGraceMs,
    model: config.agentModel,
    force: config.agentForce,
    trust: config.agentTrust,
    maxOutputBytes: config.maxAnswerBytes,
    log
  })
  const runner = options.wrapRunner?.(configured) ?? configured
  fastify.decorate('agentSessions', new SessionManager({
    runner,
    maxSessions: config.maxSessions,
    sessionTimeoutMs: config.sessionTimeoutMs,
    maxSessionTimeoutMs: config.maxSessionTimeoutMs,
    askTimeoutMs: config.askTimeoutMs,
    now: options.now,
    log
  }))
}

export default fp(sessionManagerPlugin, {
  name: 'agent-sessions-manager',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
