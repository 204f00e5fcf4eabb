// Bearer-token authentication for every route of the app but GET /api/health.
// Wrapped with fastify-plugin so the onRequest hook lands in the app's own
// context: it covers every route registered there, whoever adds them, and the
// not-found handler too (no route enumeration without the token).

import { createHash, timingSafeEqual } from 'node:crypto'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { AgentSessionError } from '../lib/errors.js'

const BEARER = /^Bearer[ \t]+(\S+)[ \t]*$/i

// Comparing digests keeps the comparison constant-time whatever the lengths
// (timingSafeEqual needs equal-length buffers and would leak the token's length).
function digest (value: string): Buffer {
  return createHash('sha256').update(value, 'utf8').digest()
}

async function authPlugin (fastify: FastifyInstance): Promise<void> {
  const token = fastify.agentSessionsConfig.apiToken
  if (token === undefined || token === '') return
  const expected = digest(token)
  // Health stays open for load balancers and container health checks; it shows no session data.
  const healthUrl = `${fastify.prefix}/api/health`
  // The probes too: orchestrators call them without credentials.
  const publicUrls = new Set([healthUrl, `${healthUrl}/live`, `${healthUrl}/ready`])

  const isPublic = (request: FastifyRequest): boolean => {
    const method = request.method
    if ((method === 'GET' || method === 'HEAD') && publicUrls.has(request.routeOptions.url ?? '')) return true
    // A CORS preflight carries no credentials by design and runs nothing.
    return method === 'OPTIONS' && request.headers['access-control-request-method'] !== undefined &&
      request.headers.origin !== undefined
  }

  fastify.addHook('onRequest', async (request, reply) => {
    if (isPublic(request)) return
    const header = request.headers.authorization
    const given = typeof header === 'string' ? BEARER.exec(header)?.[1] : undefined
    if (given !== undefined && timingSafeEqual(digest(given), expected)) return
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
