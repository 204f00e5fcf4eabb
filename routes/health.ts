// Liveness and a summary an operator (or a phone app's status screen) can read.
// Reading it is not session activity. It needs no token; without one (when
// API_TOKEN is set) it answers only the fields the Janus web client reads:
// no paths, no agent or reaper details.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { packageInfo } from '../lib/package-info.js'

// Health is polled; asking the binary for its version on every poll would spawn a process each time.
const AGENT_CHECK_TTL_MS = 30_000

function cachedVersion (runner: () => Promise<string | null>): () => Promise<{ version: string | null, checkedAt: number }> {
  let cached: { version: string | null, checkedAt: number } | null = null
  let inFlight: Promise<{ version: string | null, checkedAt: number }> | null = null
  return async () => {
    if (cached !== null && Date.now() - cached.checkedAt < AGENT_CHECK_TTL_MS) return cached
    inFlight ??= runner().then((version) => {
      cached = { version, checkedAt: Date.now() }
      inFlight = null
      return cached
    })
    return await inFlight
  }
}

const healthRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const config = fastify.agentSessionsConfig
  const agentVersion = cachedVersion(() => manager.agentVersion())
  const startedAt = performance.now()

  fastify.get('/api/health', {
    config: { agentSessionsPublic: true },
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
          busy_sessions: Type.Optional(Type.Integer()),
          memory_usage_mb: Type.Number(),
          agent: Type.Optional(Type.Object({
            binary: Type.String(),
            available: Type.Boolean(),
            version: Type.Union([Type.String(), Type.Null()])
          })),
          reaper: Type.Optional(Type.Object({
            running: Type.Boolean(),
            interval_seconds: Type.Number(),
            session_timeout_seconds: Type.Number(),
            last_sweep_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
            sweeps: Type.Integer(),
            sessions_reaped: Type.Integer()
          }))
        }, {
          description: 'Status of the service and its sessions; busy_sessions, agent and reaper only with the token (or when the app has none)'
        })
      }
    }
  }, async (request) => {
    const counts = manager.counts()
    const agent = await agentVersion()
    const summary = {
      status: manager.closed ? 'shutting_down' : agent.version === null ? 'degraded' : 'ok',
      version: packageInfo.version,
      uptime_seconds: Math.floor((performance.now() - startedAt) / 1000),
      active_sessions: counts.active,
      memory_usage_mb: Math.round(process.memoryUsage().rss / 1024 / 1024 * 10) / 10
    }
    if (!request.agentSessionsAuthenticated) return summary
    const reaper = fastify.agentSessionsReaper.stats()
    return {
      ...summary,
      busy_sessions: counts.busy,
      agent: { binary: config.cursorAgentBin, available: agent.version !== null, version: agent.version },
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
