// Server-Sent Events (@fastify/sse) for the streaming routes: a comment line
// every STREAM_HEARTBEAT keeps proxies from cutting idle streams, and event
// data arrives already serialized (routes/stream.ts), so it passes through.

import fp from 'fastify-plugin'
import { fastifySSE } from '@fastify/sse'
import type { FastifyInstance } from 'fastify'

async function ssePlugin (fastify: FastifyInstance): Promise<void> {
  // A host that registered @fastify/sse itself already wraps our SSE routes; a second registration would wrap them twice.
  if (fastify.hasPlugin('@fastify/sse')) return
  await fastify.register(fastifySSE, {
    heartbeatInterval: fastify.agentSessionsConfig.streamHeartbeatMs,
    serializer: (data: unknown) => typeof data === 'string' ? data : JSON.stringify(data)
  })
}

export default fp(ssePlugin, {
  name: 'agent-sessions-sse',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
