// Decorates the instance with the SessionManager, wired to the cursor-agent
// runner the configuration describes (or one the embedder injects).

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { CURSOR_AGENT_ENV_NAMES, CursorAgentRunner } from '../lib/agents/cursor-print.js'
import type { AgentRunner } from '../lib/agents/types.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import { SessionManager } from '../lib/sessions/manager.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessions: SessionManager
  }
}

export interface SessionManagerPluginOptions {
  /** Extra environment for every agent process (e.g. CURSOR_API_KEY from a secret store), set over everything else. */
  agentEnv?: Record<string, string>
  /** A different agent driver (tests, benchmarks, a long-lived ACP driver). */
  runner?: AgentRunner
  /** Clock in epoch milliseconds; injectable for tests. */
  now?: () => number
}

async function sessionManagerPlugin (fastify: FastifyInstance, options: SessionManagerPluginOptions): Promise<void> {
  const config = fastify.agentSessionsConfig
  const log = fastify.log.child({ component: 'agent-sessions' })
  const runner = options.runner ?? new CursorAgentRunner({
    bin: config.cursorAgentBin,
    workspaceDir: config.workspaceDir,
    env: agentEnvironment(process.env, {
      pass: [...config.agentEnvPass, ...CURSOR_AGENT_ENV_NAMES],
      extra: options.agentEnv,
      user: config.agentUser
    }),
    user: config.agentUser,
    killSignal: config.killSignal,
    killGraceMs: config.killGraceMs,
    model: config.agentModel,
    force: config.agentForce,
    trust: config.agentTrust,
    maxOutputBytes: config.maxAnswerBytes,
    log
  })
  fastify.decorate('agentSessions', new SessionManager({
    runner,
    maxSessions: config.maxSessions,
    maxSessionsPerClient: config.maxSessionsPerClient,
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
