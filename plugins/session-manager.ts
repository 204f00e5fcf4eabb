// Decorates the instance with the SessionManager, wired to the agent driver
// the configuration describes (cursor-agent per turn, or a live ACP agent per
// session), or one the embedder injects.

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { AcpDriver } from '../lib/agents/acp.js'
import { CURSOR_AGENT_ENV_NAMES, CursorPrintDriver } from '../lib/agents/cursor-print.js'
import type { AgentDriver } from '../lib/agents/types.js'
import type { AgentSessionsConfig } from '../lib/config.js'
import type { Logger } from '../lib/logger.js'
import { agentEnvironment } from '../lib/processes/environment.js'
import type { GroupRecorder } from '../lib/processes/records.js'
import { SessionManager } from '../lib/sessions/manager.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessions: SessionManager
  }
}

export interface SessionManagerPluginOptions {
  /** Extra environment for every agent process (e.g. CURSOR_API_KEY from a secret store), set over everything else. */
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

function driverFor (config: AgentSessionsConfig, agentEnv: Record<string, string> | undefined, log: Logger, recorder?: GroupRecorder): AgentDriver {
  if (config.agentProtocol === 'acp') {
    return new AcpDriver({
      command: config.agentCommand ?? [],
      workspaceDir: config.workspaceDir,
      // An ACP agent's own credentials (OPENAI_API_KEY, GEMINI_API_KEY, ...) reach it only when AGENT_ENV_PASS names them.
      env: agentEnvironment(process.env, { pass: config.agentEnvPass, extra: agentEnv, user: config.agentUser }),
      user: config.agentUser,
      killSignal: config.killSignal,
      killGraceMs: config.killGraceMs,
      authMethod: config.agentAuthMethod,
      maxMessageBytes: config.maxAnswerBytes,
      log,
      recorder
    })
  }
  return new CursorPrintDriver({
    bin: config.cursorAgentBin,
    workspaceDir: config.workspaceDir,
    env: agentEnvironment(process.env, { pass: [...config.agentEnvPass, ...CURSOR_AGENT_ENV_NAMES], extra: agentEnv, user: config.agentUser }),
    user: config.agentUser,
    killSignal: config.killSignal,
    killGraceMs: config.killGraceMs,
    model: config.agentModel,
    force: config.agentForce,
    trust: config.agentTrust,
    maxOutputBytes: config.maxAnswerBytes,
    log,
    recorder
  })
}

async function sessionManagerPlugin (fastify: FastifyInstance, options: SessionManagerPluginOptions): Promise<void> {
  const config = fastify.agentSessionsConfig
  const log = fastify.log.child({ component: 'agent-sessions' })
  const state = fastify.agentSessionsState
  const configured = options.driver ?? driverFor(config, options.agentEnv, log, state.recorder)
  const driver = options.wrapDriver?.(configured) ?? configured
  if (driver.keepsProcesses && config.agentIdleTimeoutMs > 0) {
    // Said once: an agent that cannot load a session keeps every idle agent alive until its session ends.
    fastify.addHook('onReady', async () => {
      void driver.info().then((info) => {
        if (info.available && !info.canResume) {
          log.warn({ agent: info.name }, 'the agent cannot continue a conversation in a new process (no loadSession): idle agents are never hibernated, AGENT_IDLE_TIMEOUT has no effect')
        }
      }, () => {})
    })
  }
  fastify.decorate('agentSessions', new SessionManager({
    driver,
    maxSessions: config.maxSessions,
    maxSessionsPerClient: config.maxSessionsPerClient,
    sessionTimeoutMs: config.sessionTimeoutMs,
    maxSessionTimeoutMs: config.maxSessionTimeoutMs,
    askTimeoutMs: config.askTimeoutMs,
    startTimeoutMs: config.startTimeoutMs,
    permissionPolicy: config.permissionPolicy,
    permissionTimeoutMs: config.permissionTimeoutMs,
    expiryWarningMs: config.expiryWarningMs,
    agentIdleTimeoutMs: config.agentIdleTimeoutMs,
    maxLiveAgents: config.maxLiveAgents,
    store: state.store,
    workspaceDir: config.workspaceDir,
    now: options.now,
    log
  }))
}

export default fp(sessionManagerPlugin, {
  name: 'agent-sessions-manager',
  fastify: '5.x',
  dependencies: ['agent-sessions-config', 'agent-sessions-state']
})
