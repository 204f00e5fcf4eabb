// Per-client limit on session starts: each start spawns an agent process, so
// a client must not be able to start them without bound. Only routes that opt
// in through `config.rateLimit` are limited.

import fp from 'fastify-plugin'
import rateLimit from '@fastify/rate-limit'
import type { FastifyInstance } from 'fastify'
import { AgentSessionError, formatDuration } from '../lib/errors.js'
import { FORWARDED_HEADER } from './cluster-routes.js'

async function rateLimitPlugin (fastify: FastifyInstance): Promise<void> {
  const config = fastify.agentSessionsConfig
  const cluster = fastify.agentSessionsCluster
  await fastify.register(rateLimit, {
    global: false,
    // In a cluster the count lives in Redis, so it holds across instances; the instance a start was
    // forwarded to does not count it again. Without Redis the start fails anyway (STATE_UNAVAILABLE).
    ...(cluster === null
      ? {}
      : {
          redis: cluster.redis,
          nameSpace: cluster.keys.rateLimit,
          skipOnError: true,
          allowList: (request) => cluster.membership.secret !== null && request.headers[FORWARDED_HEADER] === cluster.membership.secret
        }),
    errorResponseBuilder: (_request, context) => new AgentSessionError('RATE_LIMITED',
      `Too many session starts from this client: at most ${context.max} per ${formatDuration(config.startRateWindowMs)} ` +
      `(START_RATE_LIMIT, START_RATE_WINDOW); retry in ${context.after}`,
      { retryAfterSeconds: Math.max(1, Math.ceil(context.ttl / 1000)) })
  })
}

export default fp(rateLimitPlugin, {
  name: 'agent-sessions-rate-limit',
  fastify: '5.x',
  dependencies: ['agent-sessions-config', 'agent-sessions-cluster']
})
