// HTTP glue shared by every route: JSON bodies that may be empty (the Janus
// client posts Content-Type: application/json with no body), X-Request-ID on
// every response, one error shape, and prompt connection close on shutdown.

import { randomBytes } from 'node:crypto'
import { STATUS_CODES as HTTP_STATUS_TEXT, type IncomingMessage } from 'node:http'
import type { Socket } from 'node:net'
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

// Request ids the server makes: this process's random 48-bit prefix and a
// counter, unique within the process and unlikely to meet another's, at a
// fraction of randomUUID()'s cost (about 2 % of a heartbeat's instructions,
// counted with callgrind: see Performance in the README).
const REQUEST_ID_PREFIX = randomBytes(6).toString('hex')
let requestCount = 0

/** A new request id: for genReqId and the errors Node's parser raises before any route. */
export function newRequestId (): string {
  return `${REQUEST_ID_PREFIX}-${(++requestCount).toString(36)}`
}

const CLIENT_REQUEST_ID = /^[\w.:-]{1,128}$/

/**
 * Fastify's `genReqId` (with `requestIdHeader: false`): a well-formed
 * X-Request-ID from the client or a forwarding instance is kept (tracing
 * across proxies), else a new id. The standalone server uses it; so may an
 * embedder.
 */
export function genReqId (req: IncomingMessage): string {
  const given = req.headers['x-request-id']
  return typeof given === 'string' && CLIENT_REQUEST_ID.test(given) ? given : newRequestId()
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

function isWellFormedJson (text: string): boolean {
  try {
    JSON.parse(text)
    return true
  } catch {
    return false
  }
}

/**
 * Fastify's `clientErrorHandler`: what Node's HTTP parser refuses before any
 * route or hook runs (headers over Node's 16 KiB limit, a request not received
 * within the server's requestTimeout, malformed HTTP) answered in the API's
 * error shape, with an X-Request-ID, instead of Fastify's own. The standalone
 * server uses it; an embedder may pass it to `Fastify({ clientErrorHandler })`.
 */
export function clientErrorHandler (this: FastifyInstance, err: Error & { code?: string }, socket: Socket): void {
  // A reset connection has nobody left to answer.
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const apiError = err.code === 'HPE_HEADER_OVERFLOW'
    ? new AgentSessionError('HEADERS_TOO_LARGE', 'The request headers are too large (at most 16 KiB in all)')
    : err.code === 'ERR_HTTP_REQUEST_TIMEOUT'
      ? new AgentSessionError('REQUEST_RECEIVE_TIMEOUT', 'The request was not received in time: send its headers and body without pausing')
      : new AgentSessionError('INVALID_REQUEST', 'Malformed HTTP request')
  const requestId = newRequestId()
  this.log.info({ reqId: requestId, code: apiError.code, statusCode: apiError.statusCode, parserError: err.code }, 'request rejected before routing')
  if (socket.writable) {
    const body = JSON.stringify({ error: apiError.code, details: apiError.message, request_id: requestId, timestamp: new Date().toISOString() })
    socket.write(`HTTP/1.1 ${apiError.statusCode} ${HTTP_STATUS_TEXT[apiError.statusCode] ?? ''}\r\n` +
      `Content-Type: application/json; charset=utf-8\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
      `X-Request-ID: ${requestId}\r\nConnection: close\r\n\r\n${body}`)
  }
  socket.destroy(err)
}

/**
 * Node's HTTP server options that bound the time to RECEIVE a request
 * (headers and body) without bounding how long its answer takes: a slow
 * client is cut off with 408, an ask may run up to ASK_TIMEOUT. Node checks
 * pending requests every connectionsCheckingInterval (30 s by default, too
 * coarse for a limit of seconds).
 */
export function receiveTimeoutOptions (receiveTimeoutMs: number): { requestTimeout: number, http: { requestTimeout: number, headersTimeout: number, connectionsCheckingInterval: number } } {
  return {
    requestTimeout: receiveTimeoutMs,
    http: {
      requestTimeout: receiveTimeoutMs,
      headersTimeout: Math.min(60_000, receiveTimeoutMs),
      connectionsCheckingInterval: Math.min(1000, Math.max(25, Math.floor(receiveTimeoutMs / 4)))
    }
  }
}

/**
 * TRUST_PROXY as Fastify's trustProxy. Addresses and CIDRs go as they are. A
 * hop count becomes "trust the nearest N hops" (Fastify refuses a bare number,
 * since then any client that reaches the server directly picks its own
 * address): only right where nothing but the proxies can reach the server.
 */
export function trustProxyOption (value: number | string[] | undefined): false | string[] | ((address: string, hop: number) => boolean) {
  if (value === undefined) return false
  if (typeof value === 'number') return (_address, hop) => hop < value
  return value
}

async function httpPlugin (fastify: FastifyInstance, options: { bodyLimit: number }): Promise<void> {
  const parseJson = fastify.getDefaultJsonParser('error', 'error')
  fastify.removeContentTypeParser('application/json')
  fastify.addContentTypeParser('application/json', { parseAs: 'string', bodyLimit: options.bodyLimit }, (request, body, done) => {
    if ((body as string).trim() === '') {
      done(null, undefined)
      return
    }
    parseJson(request, body as string, (err, parsed) => {
      if (err !== null && isWellFormedJson(body as string)) {
        // Well-formed, so the parser refused it for a prototype-poisoning key: say that, not "not valid JSON".
        done(new AgentSessionError('INVALID_REQUEST',
          'The request body contains a "__proto__" key or a "constructor" with a "prototype": such keys are refused'), undefined)
        return
      }
      done(err, parsed)
    })
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
    // Diagnostics (the agent's own error output, paths) are for this log only, never for the reply.
    const diagnostics = apiError.diagnostics
    if (apiError.statusCode >= 500) {
      request.log.error({ err, code: apiError.code, diagnostics }, 'request failed')
    } else {
      request.log.info({ code: apiError.code, statusCode: apiError.statusCode, details: apiError.message, diagnostics }, 'request rejected')
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
