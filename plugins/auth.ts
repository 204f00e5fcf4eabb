// Bearer-token authentication for every route of the app but GET /api/health.
// Wrapped with fastify-plugin so the onRequest hook lands in the app's own
// context: it covers every route registered there, whoever adds them, and the
// not-found handler too (no route enumeration without the token).
//
// CORS preflights are not exempted here: where CORS is on, @fastify/cors
// answers them in its own onRequest hook, which runs before this one, and they
// never reach a handler; anywhere else an OPTIONS request is a request like
// any other.

import { createHash, timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { AgentSessionError } from '../lib/errors.js'

declare module 'fastify' {
  interface FastifyContextConfig {
    /** The route answers without the token (health); it still learns whether a valid one came. */
    agentSessionsPublic?: boolean
  }
  interface FastifyRequest {
    /** Whether the request may see everything: it carried the valid token, or the app has none. */
    agentSessionsAuthenticated: boolean
  }
}

const BEARER = /^Bearer[ \t]+(\S+)[ \t]*$/i

// Comparing digests keeps the comparison constant-time whatever the lengths
// (timingSafeEqual needs equal-length buffers and would leak the token's length).
function digest (value: string): Buffer {
  return createHash('sha256').update(value, 'utf8').digest()
}

async function authPlugin (fastify: FastifyInstance): Promise<void> {
  const token = fastify.agentSessionsConfig.apiToken
  // Without a token every route is open, so every caller may see everything.
  fastify.decorateRequest('agentSessionsAuthenticated', token === undefined)
  if (token === undefined) return
  const expected = digest(token)

  const tokenOf = (request: FastifyRequest): string | undefined => {
    const header = request.headers.authorization
    return typeof header === 'string' ? BEARER.exec(header)?.[1] : undefined
  }

  fastify.addHook('onRequest', async (request, reply) => {
    const given = tokenOf(request)
    const valid = given !== undefined && timingSafeEqual(digest(given), expected)
    request.agentSessionsAuthenticated = valid
    if (valid) return
    // Marked on the route itself (not matched by URL), so a prefix of any shape keeps it open.
    // Health stays open for load balancers and container health checks; it shows less without the token.
    if (request.routeOptions.config?.agentSessionsPublic === true) return
    // RFC 6750: say which scheme, and whether the token that came was wrong.
    void reply.header('WWW-Authenticate', given === undefined ? 'Bearer' : 'Bearer error="invalid_token"')
    throw new AgentSessionError('UNAUTHORIZED', given === undefined
      ? 'This API needs "Authorization: Bearer <token>" (the server\'s API_TOKEN)'
      : 'The bearer token is not valid')
  })
}

export default fp(authPlugin, {
  name: 'agent-sessions-auth',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
