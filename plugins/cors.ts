// CORS for browser clients served from another origin (the Janus web app in
// development). Off unless CORS_ORIGINS / corsOrigins is set.

import fp from 'fastify-plugin'
import fastifyCors from '@fastify/cors'
import type { FastifyInstance } from 'fastify'

async function corsPlugin (fastify: FastifyInstance): Promise<void> {
  const origins = fastify.agentSessionsConfig.corsOrigins
  if (origins === undefined) return
  // A host that registered @fastify/cors itself already answers for our routes;
  // a second registration would throw on its request decorator.
  if (fastify.hasRequestDecorator('corsPreflightEnabled')) {
    fastify.log.warn({ corsOrigins: origins }, 'CORS_ORIGINS ignored: the host app already registered @fastify/cors')
    return
  }
  await fastify.register(fastifyCors, {
    // '*' answers `Access-Control-Allow-Origin: *`; a list echoes only the matching origin.
    origin: origins.includes('*') ? '*' : origins,
    methods: ['GET', 'POST', 'OPTIONS'],
    allowedHeaders: ['Content-Type', 'Authorization', 'X-Request-ID'],
    // Browsers hide response headers from scripts unless listed here.
    exposedHeaders: ['X-Request-ID', 'Retry-After'],
    // The token travels in a header, never a cookie: no credentials mode.
    credentials: false,
    maxAge: 600
  })
}

export default fp(corsPlugin, {
  name: 'agent-sessions-cors',
  fastify: '5.x',
  dependencies: ['agent-sessions-config', 'agent-sessions-http']
})
