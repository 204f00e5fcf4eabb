// Decorates the instance with the SessionManager, wired to the agent driver
// the configuration describes (cursor-agent per turn, or a live ACP agent per
// session), or one the embedder injects.

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { AcpDriver } from '../lib/agents/acp.js'
import { CursorPrintDriver } from '../lib/agents/cursor-print.js'
import type { AgentDriver } from '../lib/agents/types.js'
import { SERVICE_ENV_NAMES, type AgentSessionsConfig } from '../lib/config.js'
import type { Logger } from '../lib/logger.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import { SessionManager } from '../lib/sessions/manager.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessions: SessionManager
  }
}

export interface SessionManagerPluginOptions {
  /** Extra environment for every agent process (e.g. CURSOR_API_KEY from a secret store). */
  agentEnv?: Record<string, string>
  /** A different agent driver (tests, benchmarks, an agent protocol of your own). */
  driver?: AgentDriver
  /**
   * Wraps the agent driver (the configured one, or `driver`). For tests: a
   * test that makes one turn time out gives every other turn a timeout of its
   * own, so the machine's speed cannot decide the rest.
   */
  wrapDriver?: (driver: AgentDriver) => AgentDriver
  /** Clock in epoch milliseconds; injectable for tests. */
  now?: () => number
}

function driverFor (config: AgentSessionsConfig, env: Record<string, string | undefined>, log: Logger): AgentDriver {
  if (config.agentProtocol === 'acp') {
    return new AcpDriver({
      command: config.agentCommand ?? [],
      workspaceDir: config.workspaceDir,
      env,
      killSignal: config.killSignal,
      killGraceMs: config.killGraceMs,
      authMethod: config.agentAuthMethod,
      maxMessageBytes: config.maxAnswerBytes,
      log
    })
  }
  return new CursorPrintDriver({
    bin: config.cursorAgentBin,
    workspaceDir: config.workspaceDir,
    env,
    killSignal: config.killSignal,
    killGraceMs: config.killGraceMs,
    model: config.agentModel,
    force: config.agentForce,
    trust: config.agentTrust,
    maxOutputBytes: config.maxAnswerBytes,
    log
  })
}

async function sessionManagerPlugin (fastify: FastifyInstance, options: SessionManagerPluginOptions): Promise<void> {
  const config = fastify.agentSessionsConfig
  const log = fastify.log.child({ component: 'agent-sessions' })
  const configured = options.driver ?? driverFor(config, agentEnvironment(process.env, SERVICE_ENV_NAMES, options.agentEnv), log)
  const driver = options.wrapDriver?.(configured) ?? configured
  fastify.decorate('agentSessions', new SessionManager({
    driver,
    maxSessions: config.maxSessions,
    sessionTimeoutMs: config.sessionTimeoutMs,
    maxSessionTimeoutMs: config.maxSessionTimeoutMs,
    askTimeoutMs: config.askTimeoutMs,
    startTimeoutMs: config.startTimeoutMs,
    permissionPolicy: config.permissionPolicy,
    permissionTimeoutMs: config.permissionTimeoutMs,
    expiryWarningMs: config.expiryWarningMs,
    now: options.now,
    log
  }))
}

export default fp(sessionManagerPlugin, {
  name: 'agent-sessions-manager',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
