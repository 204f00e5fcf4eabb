// HTTP glue shared by every route: JSON bodies that may be empty (the Janus
// client posts Content-Type: application/json with no body), X-Request-ID on
// every response, one error shape, and prompt connection close on shutdown.

import fp from 'fastify-plugin'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { AgentSessionError, isAgentSessionError, shuttingDown, type ErrorCode } from '../lib/errors.js'

export interface ApiError {
  error: string
  details: string
  request_id: string
  timestamp: string
  reason?: string
}

const STATUS_CODES: Partial<Record<number, ErrorCode>> = {
  400: 'INVALID_REQUEST',
  401: 'UNAUTHORIZED',
  404: 'NOT_FOUND',
  413: 'PAYLOAD_TOO_LARGE',
  415: 'UNSUPPORTED_MEDIA_TYPE',
  429: 'RATE_LIMITED',
  503: 'SERVICE_UNAVAILABLE'
}

/** Maps anything thrown in a request to the API's error; unknown failures never leak their message. */
export function toAgentSessionError (err: unknown): AgentSessionError {
  if (isAgentSessionError(err)) return err
  const e = err as FastifyError
  if (e.validation !== undefined) {
    return new AgentSessionError('INVALID_REQUEST', e.message)
  }
  if (e.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || (e instanceof SyntaxError && e.statusCode === 400)) {
    return new AgentSessionError('INVALID_REQUEST', 'The request body is not valid JSON')
  }
  const status = typeof e.statusCode === 'number' ? e.statusCode : 500
  const code = status >= 400 && status < 500 ? STATUS_CODES[status] ?? 'INVALID_REQUEST' : undefined
  if (code !== undefined) return new AgentSessionError(code, e.message, { cause: err })
  return new AgentSessionError('INTERNAL_SERVER_ERROR', 'Internal server error', { cause: err })
}

export function sendError (request: FastifyRequest, reply: FastifyReply, err: AgentSessionError): FastifyReply {
  if (err.retryAfterSeconds !== undefined) void reply.header('Retry-After', String(err.retryAfterSeconds))
  const body: ApiError = {
    ...err.extra,
    error: err.code,
    details: err.message,
    request_id: String(request.id),
    timestamp: new Date().toISOString()
  }
  return reply.code(err.statusCode).send(body)
}

async function httpPlugin (fastify: FastifyInstance, options: { bodyLimit: number }): Promise<void> {
  const parseJson = fastify.getDefaultJsonParser('error', 'error')
  fastify.removeContentTypeParser('application/json')
  fastify.addContentTypeParser('application/json', { parseAs: 'string', bodyLimit: options.bodyLimit }, (request, body, done) => {
    if ((body as string).trim() === '') {
      done(null, undefined)
      return
    }
    parseJson(request, body as string, done)
  })

  // Both hooks run on every request: callback style, so neither allocates a
  // promise nor waits a microtask turn (async hooks did both).
  fastify.addHook('onRequest', (request, reply, done) => {
    void reply.header('X-Request-ID', request.id)
    if (fastify.agentSessions.closed) done(shuttingDown())
    else done()
  })

  fastify.addHook('onSend', (_request, reply, payload, done) => {
    // Keep-alive connections would hold a closing server open for up to keepAliveTimeout.
    if (fastify.agentSessions.closed) void reply.header('Connection', 'close')
    done(null, payload)
  })

  fastify.setErrorHandler((err, request, reply) => {
    const apiError = toAgentSessionError(err)
    if (apiError.statusCode >= 500) {
      request.log.error({ err, code: apiError.code }, 'request failed')
    } else {
      request.log.info({ code: apiError.code, statusCode: apiError.statusCode, details: apiError.message }, 'request rejected')
    }
    return sendError(request, reply, apiError)
  })

  fastify.setNotFoundHandler((request, reply) => {
    return sendError(request, reply, new AgentSessionError('NOT_FOUND', `Route ${request.method} ${request.url.split('?')[0]} not found`))
  })
}

export default fp(httpPlugin, {
  name: 'agent-sessions-http',
  fastify: '5.x',
  dependencies: ['agent-sessions-manager']
})
