// Prometheus scrape endpoint for this app instance's registry.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { errors } from './schemas.js'

const metricsRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const register = fastify.agentSessionsMetrics

  fastify.get('/metrics', {
    schema: {
      operationId: 'metrics',
      summary: 'Prometheus metrics (text exposition format)',
      description: 'agent_sessions_active, agent_sessions_busy, agent_sessions_started_total, agent_sessions_ended_total{reason}, ' +
        'agent_turns_total{outcome}, agent_turn_duration_seconds, agent_teardowns_total{stage}, and the process_* / nodejs_* defaults',
      tags: ['operations'],
      produces: ['text/plain'],
      response: {
        200: { description: 'Prometheus text format 0.0.4', content: { 'text/plain': { schema: Type.String() } } },
        ...errors(401)
      }
    }
  }, async (_request, reply) => {
    const text = await register.metrics()
    // A text/plain content type keeps Fastify from JSON-serializing the string.
    return await reply.type(register.contentType).send(text)
  })
}

export default metricsRoutes
