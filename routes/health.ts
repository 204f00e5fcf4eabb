// Liveness and a summary an operator (or a phone app's status screen) can read.
// Reading it is not session activity.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { packageInfo } from '../lib/package-info.js'
import { groupsRssBytes } from '../lib/processes/usage.js'

const healthRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const config = fastify.agentSessionsConfig
  const startedAt = performance.now()

  fastify.get('/api/health', {
    schema: {
      operationId: 'health',
      summary: 'Service health',
      tags: ['health'],
      response: {
        200: Type.Object({
          status: Type.String(),
          version: Type.String(),
          uptime_seconds: Type.Number(),
          active_sessions: Type.Integer(),
          busy_sessions: Type.Integer(),
          memory_usage_mb: Type.Number(),
          agent: Type.Object({
            protocol: Type.String({ description: 'cursor or acp (AGENT_PROTOCOL)' }),
            binary: Type.String({ description: 'The agent program: CURSOR_AGENT_BIN, or the first word of AGENT_COMMAND' }),
            name: Type.Union([Type.String(), Type.Null()], { description: 'The agent\'s own name (ACP initialize)' }),
            available: Type.Boolean(),
            version: Type.Union([Type.String(), Type.Null()]),
            can_resume: Type.Boolean({ description: 'Whether a conversation can continue in a new agent process' }),
            live_processes: Type.Integer({ description: 'Live agent process groups now' }),
            live_rss_mb: Type.Number({ description: 'Resident memory of the live agent processes' })
          }),
          reaper: Type.Object({
            running: Type.Boolean(),
            interval_seconds: Type.Number(),
            session_timeout_seconds: Type.Number(),
            last_sweep_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
            sweeps: Type.Integer(),
            sessions_reaped: Type.Integer()
          })
        }, { description: 'Status of the service, its sessions, the agent binary and the reaper' })
      }
    }
  }, async () => {
    const counts = manager.counts()
    const reaper = fastify.agentSessionsReaper.stats()
    const agent = await manager.driver.info()
    const livePids = manager.driver.livePids()
    return {
      status: manager.closed ? 'shutting_down' : agent.available ? 'ok' : 'degraded',
      version: packageInfo.version,
      uptime_seconds: Math.floor((performance.now() - startedAt) / 1000),
      active_sessions: counts.active,
      busy_sessions: counts.busy,
      memory_usage_mb: Math.round(process.memoryUsage().rss / 1024 / 1024 * 10) / 10,
      agent: {
        protocol: agent.protocol,
        binary: config.agentProtocol === 'acp' ? config.agentCommand?.[0] ?? '' : config.cursorAgentBin,
        name: agent.name,
        available: agent.available,
        version: agent.version,
        can_resume: agent.canResume,
        live_processes: livePids.length,
        live_rss_mb: Math.round(groupsRssBytes(livePids) / 1024 / 1024 * 10) / 10
      },
      reaper: {
        running: reaper.running,
        interval_seconds: config.cleanupIntervalMs / 1000,
        session_timeout_seconds: config.sessionTimeoutMs / 1000,
        last_sweep_at: reaper.lastSweepAt === null ? null : new Date(reaper.lastSweepAt).toISOString(),
        sweeps: reaper.sweeps,
        sessions_reaped: reaper.reaped
      }
    }
  })
}

export default healthRoutes
