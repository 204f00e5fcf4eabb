// Session lifecycle: start, heartbeat, end (Janus client API).

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { AgentSessionError, formatDuration } from '../lib/errors.js'
import { parseDuration } from '../lib/config.js'
import type { SessionInfo } from '../lib/sessions/manager.js'
import { errors, Expiry, SessionQuery, validatorCompiler } from './schemas.js'
import { clientAddress } from '../plugins/cluster-routes.js'

/** The shortest idle timeout a client may ask for: shorter ones end a session between two heartbeats. */
export const MIN_IDLE_TIMEOUT_MS = 10_000

const StartBody = Type.Union([
  Type.Object({
    idle_timeout: Type.Optional(Type.Union([Type.String({ maxLength: 32 }), Type.Number()], {
      description: 'Idle timeout for this session: a duration with its unit (90s, 30m, 2h) or whole seconds (a number); ' +
        'from 10 s to MAX_SESSION_TIMEOUT, else 400'
    }))
  }, { additionalProperties: false }),
  Type.Null()
], { description: 'Optional; the Janus client sends no body' })

const DURATION_WITH_UNIT = /^\s*\d+(?:\.\d+)?\s*(?:ms|s|m|h)\s*$/

/** The requested idle timeout in ms; 400 INVALID_REQUEST for anything but a duration with a unit or whole seconds in range. */
function idleTimeoutOf (requested: string | number, maxMs: number): number {
  const ms = typeof requested === 'number'
    ? (Number.isSafeInteger(requested) ? requested * 1000 : undefined)
    : DURATION_WITH_UNIT.test(requested) ? parseDuration(requested) : undefined
  if (ms === undefined) {
    throw new AgentSessionError('INVALID_REQUEST',
      `idle_timeout must be a duration with its unit (90s, 30m, 2h) or whole seconds as a number, got ${JSON.stringify(requested)}`)
  }
  if (ms < MIN_IDLE_TIMEOUT_MS || ms > maxMs) {
    throw new AgentSessionError('INVALID_REQUEST',
      `idle_timeout must be from ${formatDuration(MIN_IDLE_TIMEOUT_MS)} to ${formatDuration(maxMs)} (MAX_SESSION_TIMEOUT), got ${JSON.stringify(requested)}`)
  }
  return ms
}

function expiry (session: SessionInfo): { idle_timeout_seconds: number, expires_at: string } {
  return {
    idle_timeout_seconds: session.idleTimeoutMs / 1000,
    expires_at: new Date(session.expiresAt).toISOString()
  }
}

const sessionRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions

  fastify.post('/api/session/start', {
    config: { rateLimit: { max: fastify.agentSessionsConfig.startRateLimit, timeWindow: fastify.agentSessionsConfig.startRateWindowMs } },
    validatorCompiler,
    schema: {
      operationId: 'startSession',
      summary: 'Start a session (runs cursor-agent create-chat)',
      tags: ['sessions'],
      body: Type.Optional(StartBody),
      response: {
        200: Type.Object({ session_id: Type.String(), message: Type.String(), ...Expiry }, { description: 'The new session' }),
        ...errors(400, 401, 429, 502, 503, 504)
      }
    }
  }, async (request) => {
    const requested = request.body?.idle_timeout
    const idleTimeoutMs = requested === undefined ? undefined : idleTimeoutOf(requested, fastify.agentSessionsConfig.maxSessionTimeoutMs)
    // The client's address (X-Forwarded-For only from the proxies trustProxy names; in a cluster, as the first instance saw it).
    const session = await manager.create({ idleTimeoutMs, client: clientAddress(request) })
    return { session_id: session.id, message: 'Session started', ...expiry(session) }
  })

  fastify.post('/api/heartbeat', {
    schema: {
      operationId: 'heartbeat',
      summary: 'Keep a session alive',
      tags: ['sessions'],
      querystring: SessionQuery,
      response: {
        200: Type.Object({
          message: Type.String(),
          session_id: Type.String(),
          last_activity: Type.String({ format: 'date-time' }),
          ...Expiry
        }, { description: 'The idle clock started again' }),
        ...errors(400, 401, 404)
      }
    }
  }, async (request) => {
    const session = manager.touch(request.query.session_id)
    // The hot path of the API (every client, every 30 s): one object, no spread of a helper's.
    return {
      message: 'Heartbeat received',
      session_id: session.id,
      last_activity: new Date(session.lastActivity).toISOString(),
      idle_timeout_seconds: session.idleTimeoutMs / 1000,
      expires_at: new Date(session.expiresAt).toISOString()
    }
  })

  fastify.post('/api/session/end', {
    schema: {
      operationId: 'endSession',
      summary: 'End a session and tear down its agent processes',
      tags: ['sessions'],
      querystring: SessionQuery,
      response: {
        200: Type.Object({ message: Type.String(), session_id: Type.String() }, { description: 'The session is gone; its processes are being torn down' }),
        ...errors(400, 401, 404)
      }
    }
  }, async (request) => {
    const sessionId = request.query.session_id
    // The session is gone at once; its processes are torn down in the
    // background (shutdown waits for that), so the client is not held up.
    manager.end(sessionId, 'ended').catch((err: unknown) => {
      request.log.error({ err, sessionId }, 'ending the session failed')
    })
    return { message: 'Session ended', session_id: sessionId }
  })
}

export default sessionRoutes
