// Request and response schemas shared by the routes. The response schemas are
// also the serializers, and @fastify/swagger reads all of them for the docs.

import { Type } from '@fastify/type-provider-typebox'
import { AjvCompiler } from '@fastify/ajv-compiler'
import type { FastifySchemaCompiler } from 'fastify'
import { ERROR_STATUS } from '../lib/errors.js'

// Fastify's default validation coerces types everywhere: `{"question": 42}`
// would arrive as "42" and `["a"]` as "a". Query strings are text, so they keep
// that coercion; JSON bodies carry their own types and are taken as sent.
const compilers = AjvCompiler()
const coercing = compilers({}, { customOptions: {} })
const exact = compilers({}, { customOptions: { coerceTypes: false } })

/** The validator compiler of every route of the app: JSON bodies exactly as typed, everything else as Fastify does it. */
export const validatorCompiler: FastifySchemaCompiler<unknown> = (route) =>
  (route.httpPart === 'body' ? exact : coercing)(route as Parameters<typeof exact>[0]) as ReturnType<FastifySchemaCompiler<unknown>>

export const SessionQuery = Type.Object({
  session_id: Type.String({ minLength: 1, description: 'The id POST /api/session/start returned' })
})

export const ErrorReply = Type.Object({
  error: Type.String({ description: 'Machine-readable code, e.g. SESSION_NOT_FOUND' }),
  details: Type.String({ description: 'What went wrong, for people' }),
  request_id: Type.String(),
  timestamp: Type.String({ format: 'date-time' }),
  reason: Type.Optional(Type.String({ description: 'Why a session is gone: expired, ended, shutdown, agent_exited or resume_failed' }))
}, { $id: 'AgentSessionsError', description: 'Every error the API answers' })

export const ErrorRef = Type.Unsafe<typeof ErrorReply>({ $ref: 'AgentSessionsError#' })

// NOT_FOUND is the router's answer for an unknown path, never a route's.
const ROUTE_CODES = Object.entries(ERROR_STATUS).filter(([code]) => code !== 'NOT_FOUND')

/** Error responses by HTTP status; each one's description (in the OpenAPI document) lists its `error` codes. */
export function errors (...statuses: number[]): Record<number, typeof ErrorRef> {
  return Object.fromEntries(statuses.map((status) => {
    const codes = ROUTE_CODES.filter(([, s]) => s === status).map(([code]) => code)
    return [status, Type.Unsafe<typeof ErrorReply>({ $ref: 'AgentSessionsError#', description: codes.length > 0 ? `error: ${codes.join(', ')}` : 'An error' })]
  }))
}

export const Expiry = {
  idle_timeout_seconds: Type.Number({ description: 'Idle time after which the reaper ends the session' }),
  expires_at: Type.String({ format: 'date-time', description: 'When the session expires if nothing else happens' })
}
