// OpenAPI 3.1 document generated from the route schemas, served as JSON at
// GET /documentation/json (under the plugin's prefix). Registered before the
// routes: @fastify/swagger collects them with an onRoute hook.

import fp from 'fastify-plugin'
import fastifySwagger from '@fastify/swagger'
// Kept in docs.d.ts (a side-effect import survives there): FastifyInstance['swagger'] below needs its types.
import '@fastify/swagger'
import type { FastifyInstance, FastifySchema } from 'fastify'
import { packageInfo } from '../lib/package-info.js'
import { errors } from '../routes/schemas.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Builds this app's OpenAPI document (what GET /documentation/json serves). */
    agentSessionsOpenapi: FastifyInstance['swagger']
  }
}

interface Operation {
  requestBody?: { required?: boolean, content?: Record<string, { schema?: { anyOf?: Array<{ type?: string }> } }> }
}

async function docsPlugin (fastify: FastifyInstance): Promise<void> {
  const tokenRequired = fastify.agentSessionsConfig.apiToken !== undefined && fastify.agentSessionsConfig.apiToken !== ''

  await fastify.register(fastifySwagger, {
    // Our own decorator name: a host app may have registered @fastify/swagger
    // (decorating `swagger`) for its own routes.
    decorator: 'agentSessionsOpenapi',
    openapi: {
      // 3.1: the schemas use JSON Schema's `type: 'null'` (start's optional body).
      openapi: '3.1.0',
      info: {
        title: 'fastify-agent-sessions',
        version: packageInfo.version,
        description: 'cursor-agent chat sessions for REST clients. Every error answers the AgentSessionsError shape; ' +
          'each error response lists the `error` codes it can carry. Every response has an X-Request-ID header.'
      },
      tags: [
        { name: 'sessions', description: 'Start, ask, keep alive and end a session' },
        { name: 'health', description: 'Liveness and a summary; not session activity' },
        { name: 'operations', description: 'Prometheus metrics' }
      ],
      components: {
        securitySchemes: {
          bearerAuth: { type: 'http', scheme: 'bearer', description: 'The server\'s API_TOKEN; needed only when the server sets one' }
        }
      }
    },
    // Name shared schemas by their $id (AgentSessionsError) instead of def-0.
    refResolver: {
      buildLocalReference (json, _baseUri, _fragment, i) {
        return typeof json.$id === 'string' ? json.$id : `def-${i}`
      }
    },
    // The route schemas list what each handler answers; the HTTP glue adds what
    // any route can answer, so the document shows those too.
    transform ({ schema, url }) {
      if (schema === undefined || (schema as { hide?: boolean }).hide === true) return { schema, url }
      const own = (schema.response ?? {}) as Record<string, unknown>
      const common = {
        // 408 and 431 come from the HTTP server before routing (RECEIVE_TIMEOUT, headers over 16 KiB).
        ...errors(408, 431, 500, 503),
        // Malformed JSON, a body over BODY_LIMIT, a content type that is neither JSON nor text.
        ...(schema.body === undefined ? {} : errors(400, 413, 415))
      }
      const withAuth: FastifySchema = own['401'] === undefined
        ? {}
        // An empty requirement makes the token optional, which it is when API_TOKEN is unset.
        : { security: tokenRequired ? [{ bearerAuth: [] }] : [{ bearerAuth: [] }, {}] }
      return { schema: { ...schema, ...withAuth, response: { ...common, ...own } }, url }
    },
    transformObject (document) {
      // Always the OpenAPI branch: we configure `openapi`, never `swagger` (2.0).
      const openapiObject = (document as Extract<typeof document, { openapiObject: unknown }>).openapiObject
      // @fastify/swagger marks every request body required; a body that may be
      // null (session start: the Janus client sends none) is optional.
      for (const path of Object.values(openapiObject.paths ?? {})) {
        for (const operation of Object.values(path ?? {}) as Operation[]) {
          const body = operation?.requestBody
          const schema = body?.content?.['application/json']?.schema
          if (body !== undefined && schema?.anyOf?.some((s) => s.type === 'null') === true) body.required = false
        }
      }
      return openapiObject
    }
  })

  fastify.get('/documentation/json', { schema: { hide: true } }, async () => fastify.agentSessionsOpenapi())
}

export default fp(docsPlugin, {
  name: 'agent-sessions-docs',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
