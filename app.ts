// The whole service as ONE encapsulated Fastify plugin. The standalone server
// registers it; an embedding app does `host.register(agentSessions, { prefix, ...options })`.

import type { FastifyInstance, FastifyPluginAsync } from 'fastify'
import configPlugin from './plugins/config.js'
import statePlugin from './plugins/state.js'
import clusterPlugin from './plugins/cluster.js'
import clusterRoutesPlugin from './plugins/cluster-routes.js'
import sessionManagerPlugin, { type SessionManagerPluginOptions } from './plugins/session-manager.js'
import reaperPlugin from './plugins/reaper.js'
import httpPlugin from './plugins/http.js'
import authPlugin from './plugins/auth.js'
import rateLimitPlugin from './plugins/rate-limit.js'
import sessionRoutes from './routes/sessions.js'
import askRoutes from './routes/ask.js'
import sessionStreamRoutes from './routes/session-stream.js'
import ssePlugin from './plugins/sse.js'
import healthRoutes from './routes/health.js'
import docsPlugin from './plugins/docs.js'
import corsPlugin from './plugins/cors.js'
import metricsPlugin from './plugins/metrics.js'
import metricsRoutes from './routes/metrics.js'
import { ErrorReply } from './routes/schemas.js'
import type { AgentSessionsSettings } from './lib/config.js'
// Side-effect imports survive into app.d.ts, so the plugins' `declare module
// 'fastify'` blocks (the decorator types) reach an embedder's TypeScript.
import './plugins/config.js'
import './plugins/state.js'
import './plugins/cluster.js'
import './plugins/reaper.js'
import './plugins/docs.js'
import './plugins/metrics.js'
import './plugins/sse.js'

/** Plugin options: every setting of the configuration table in camelCase (they win over the environment), plus agentEnv, driver and now. */
export interface AgentSessionsOptions extends AgentSessionsSettings, SessionManagerPluginOptions {}

/**
 * What the app decorates its own (encapsulated) instance with. A host sees
 * them only where it registers the app without encapsulation (see the README).
 */
export type AgentSessionsDecorators = Pick<FastifyInstance,
  'agentSessions' | 'agentSessionsConfig' | 'agentSessionsEnv' | 'agentSessionsReaper' | 'agentSessionsMetrics' | 'agentSessionsOpenapi' | 'agentSessionsState' | 'agentSessionsCluster'>

const agentSessions: FastifyPluginAsync<AgentSessionsOptions> = async (fastify, options) => {
  await fastify.register(configPlugin, options)
  // Before the manager and its drivers: the state directory's lock, the process record and the store.
  await fastify.register(statePlugin)
  // With REDIS_URL: the Redis store (before the manager takes the store), the liveness key and the client the rate limit shares.
  await fastify.register(clusterPlugin)
  await fastify.register(sessionManagerPlugin, options)
  await fastify.register(reaperPlugin)
  await fastify.register(httpPlugin, { bodyLimit: fastify.agentSessionsConfig.bodyLimit })
  // Before auth: a browser can read a 401 only if it carries the CORS headers.
  await fastify.register(corsPlugin)
  // After the HTTP glue (401s carry X-Request-ID and the JSON error shape), before every route.
  await fastify.register(authPlugin)
  await fastify.register(rateLimitPlugin)
  fastify.addSchema(ErrorReply)
  // Before every route: @fastify/swagger collects routes as they are added.
  await fastify.register(docsPlugin)
  await fastify.register(metricsPlugin)
  // Before the streaming routes: it wraps the routes that declare `sse`.
  await fastify.register(ssePlugin)
  // After the SSE plugin and before the routes: it wraps the session routes outside the SSE wrapper.
  await fastify.register(clusterRoutesPlugin)
  await fastify.register(sessionRoutes)
  await fastify.register(askRoutes)
  await fastify.register(sessionStreamRoutes)
  await fastify.register(healthRoutes)
  await fastify.register(metricsRoutes)
}

export default agentSessions
export { agentSessions }
export type { AgentSessionsConfig, AgentSessionsSettings } from './lib/config.js'
export type { SessionManagerPluginOptions } from './plugins/session-manager.js'
export type { TeardownStageLabel } from './plugins/metrics.js'
export type {
  AgentDriver, AgentConversation, AgentInfo, AgentExit, ConversationRef, OpenOptions, PromptOptions, ProcessReport,
  TurnEvent, TurnResult, StopReason, PermissionRequest, PermissionDecision, PermissionOption
} from './lib/agents/types.js'
export type { SessionManager, SessionInfo, EndReport, SweepReport, SessionState } from './lib/sessions/manager.js'
export type { Sweeper, SweeperStats } from './lib/sessions/sweeper.js'
export type { TeardownReport, TeardownStage } from './lib/processes/terminate.js'
export type { AgentUser } from './lib/processes/agent-user.js'
export { AgentSessionError, type ErrorCode } from './lib/errors.js'
// For a host's own Fastify({ ... }): what the standalone server sets at the server level (see the README).
export { clientErrorHandler, genReqId, receiveTimeoutOptions, trustProxyOption } from './plugins/http.js'
