// Liveness and a summary an operator (or a phone app's status screen) can read.
// Reading it is not session activity. It needs no token; without one (when
// API_TOKEN is set) it answers only the fields the Janus web client reads:
// no paths, no agent or reaper details.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { packageInfo } from '../lib/package-info.js'
import { AgentSessionError } from '../lib/errors.js'
import { groupsRssBytes } from '../lib/processes/usage.js'
import { errors } from './schemas.js'
import { ClusterHealthSchema, clusterHealth } from '../plugins/cluster.js'

const healthRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const config = fastify.agentSessionsConfig
  const startedAt = performance.now()
  const cluster = fastify.agentSessionsCluster

  fastify.get('/api/health', {
    config: { agentSessionsPublic: true },
    schema: {
      operationId: 'health',
      summary: 'Service health',
      description: 'Without the token (when API_TOKEN is set) only the fields the Janus web client reads: status, version, ' +
        'uptime_seconds, active_sessions, memory_usage_mb. With it, everything.',
      tags: ['health'],
      response: {
        200: Type.Object({
          status: Type.String(),
          version: Type.String(),
          uptime_seconds: Type.Number(),
          active_sessions: Type.Integer(),
          busy_sessions: Type.Optional(Type.Integer()),
          hibernated_sessions: Type.Optional(Type.Integer({ description: 'Sessions whose agent is stopped until their next ask' })),
          memory_usage_mb: Type.Number(),
          agent: Type.Optional(Type.Object({
            protocol: Type.String({ description: 'cursor or acp (AGENT_PROTOCOL)' }),
            binary: Type.String({ description: 'The agent program: CURSOR_AGENT_BIN, or the first word of AGENT_COMMAND' }),
            name: Type.Union([Type.String(), Type.Null()], { description: 'The agent\'s own name (ACP initialize)' }),
            available: Type.Boolean(),
            version: Type.Union([Type.String(), Type.Null()]),
            can_resume: Type.Boolean({ description: 'Whether a conversation can continue in a new agent process' }),
            live_processes: Type.Integer({ description: 'Live agent process groups now' }),
            live_rss_mb: Type.Number({ description: 'Resident memory of the live agent processes' })
          })),
          store: Type.Optional(Type.Object({
            enabled: Type.Boolean({ description: 'Whether sessions outlive restarts (STATE_DIR)' }),
            ok: Type.Boolean(),
            last_error: Type.Union([Type.String(), Type.Null()])
          })),
          reaper: Type.Optional(Type.Object({
            running: Type.Boolean(),
            interval_seconds: Type.Number(),
            session_timeout_seconds: Type.Number(),
            last_sweep_at: Type.Union([Type.String({ format: 'date-time' }), Type.Null()]),
            sweeps: Type.Integer(),
            sessions_reaped: Type.Integer()
          })),
          cluster: Type.Optional(ClusterHealthSchema)
        }, { description: 'Status of the service, its sessions, the agent, the store and the reaper' })
      }
    }
  }, async (request) => {
    const counts = manager.counts()
    const agent = await manager.driver.info()
    const storeHealth = fastify.agentSessionsState.store?.health()
    const summary = {
      status: manager.closed ? 'shutting_down' : agent.available && storeHealth?.ok !== false ? 'ok' : 'degraded',
      version: packageInfo.version,
      uptime_seconds: Math.floor((performance.now() - startedAt) / 1000),
      active_sessions: counts.active,
      memory_usage_mb: Math.round(process.memoryUsage().rss / 1024 / 1024 * 10) / 10
    }
    if (!request.agentSessionsAuthenticated) return summary
    const reaper = fastify.agentSessionsReaper.stats()
    const livePids = manager.driver.livePids()
    return {
      ...summary,
      busy_sessions: counts.busy,
      hibernated_sessions: manager.agentCounts().hibernated,
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
      store: { enabled: storeHealth !== undefined, ok: storeHealth?.ok ?? true, last_error: storeHealth?.lastError ?? null },
      reaper: {
        running: reaper.running,
        interval_seconds: config.cleanupIntervalMs / 1000,
        session_timeout_seconds: config.sessionTimeoutMs / 1000,
        last_sweep_at: reaper.lastSweepAt === null ? null : new Date(reaper.lastSweepAt).toISOString(),
        sweeps: reaper.sweeps,
        sessions_reaped: reaper.reaped
      },
      ...(cluster === null ? {} : { cluster: clusterHealth(cluster) })
    }
  })

  fastify.get('/api/health/live', {
    config: { agentSessionsPublic: true },
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
      check: async () => (await manager.driver.info()).available
        ? null
        : `the agent (${config.agentProtocol === 'acp' ? config.agentCommand?.[0] ?? '' : config.cursorAgentBin}) is not usable`
    },
    ...(cluster === null ? [] : [{ name: 'redis', check: async () => cluster.available() ? null : 'the cluster\'s Redis cannot be reached' }])
  ]

  fastify.get('/api/health/ready', {
    config: { agentSessionsPublic: true },
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
