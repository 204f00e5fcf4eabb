// Liveness and a summary an operator (or a phone app's status screen) can read,
// and the probes containers and Kubernetes use. Reading them is not session activity.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { packageInfo } from '../lib/package-info.js'
import { AgentSessionError } from '../lib/errors.js'
import { errors } from './schemas.js'

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
            binary: Type.String(),
            available: Type.Boolean(),
            version: Type.Union([Type.String(), Type.Null()])
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
    const agent = await agentVersion()
    return {
      status: manager.closed ? 'shutting_down' : agent.version === null ? 'degraded' : 'ok',
      version: packageInfo.version,
      uptime_seconds: Math.floor((performance.now() - startedAt) / 1000),
      active_sessions: counts.active,
      busy_sessions: counts.busy,
      memory_usage_mb: Math.round(process.memoryUsage().rss / 1024 / 1024 * 10) / 10,
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

  // Liveness: the process serves requests. Once it closes it accepts no new
  // connections, so probes fail to connect then.
  fastify.get('/api/health/live', {
    schema: {
      operationId: 'healthLive',
      summary: 'Liveness probe',
      description: '200 while the process serves requests. Needs no token.',
      tags: ['health'],
      response: {
        200: Type.Object({ status: Type.Literal('ok') }, { description: 'The process serves requests' })
      }
    }
  }, async () => ({ status: 'ok' as const }))

  // Readiness: every reason this instance cannot take a new session, one check
  // each. A clustered instance adds its Redis ping here.
  const readinessChecks: ReadinessCheck[] = [
    { name: 'accepting', check: async () => manager.closed ? 'the server is shutting down' : null },
    {
      name: 'agent',
      check: async () => (await agentVersion()).version === null
        ? `the agent (${config.cursorAgentBin}) does not answer --version`
        : null
    }
  ]

  fastify.get('/api/health/ready', {
    schema: {
      operationId: 'healthReady',
      summary: 'Readiness probe',
      description: '200 when a new session can start; 503 (SERVICE_UNAVAILABLE, details name each failed check) ' +
        'when the agent does not answer or the server is shutting down. Needs no token.',
      tags: ['health'],
      response: {
        200: Type.Object({
          status: Type.Literal('ready'),
          checks: Type.Array(Type.String(), { description: 'The checks that passed' })
        }, { description: 'A new session can start' }),
        ...errors(503)
      }
    }
  }, async () => {
    const results = await Promise.all(readinessChecks.map(async ({ name, check }) => ({ name, problem: await check() })))
    const failed = results.filter((r) => r.problem !== null)
    if (failed.length > 0) {
      throw new AgentSessionError('SERVICE_UNAVAILABLE',
        `Not ready: ${failed.map((r) => `${r.name}: ${String(r.problem)}`).join('; ')}`, { retryAfterSeconds: 5 })
    }
    return { status: 'ready' as const, checks: results.map((r) => r.name) }
  })
}

/** One readiness condition: null when it holds, else why not (for the 503's details). */
interface ReadinessCheck {
  name: string
  check: () => Promise<string | null>
}

export default healthRoutes
