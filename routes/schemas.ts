// Request and response schemas shared by the routes. The response schemas are
// also the serializers, and @fastify/swagger reads all of them for the docs.

import { Type } from '@fastify/type-provider-typebox'

export const SessionQuery = Type.Object({
  session_id: Type.String({ minLength: 1, description: 'The id POST /api/session/start returned' })
})

export const ErrorReply = Type.Object({
  error: Type.String({ description: 'Machine-readable code, e.g. SESSION_NOT_FOUND' }),
  details: Type.String({ description: 'What went wrong, for people' }),
  request_id: Type.String(),
  timestamp: Type.String({ format: 'date-time' }),
  reason: Type.Optional(Type.String({ description: 'Why a session is gone: expired, ended or shutdown' }))
}, { $id: 'AgentSessionsError', description: 'Every error the API answers' })

export const ErrorRef = Type.Unsafe<typeof ErrorReply>({ $ref: 'AgentSessionsError#' })

export function errors (...codes: number[]): Record<number, typeof ErrorRef> {
  return Object.fromEntries(codes.map((code) => [code, ErrorRef]))
}

export const Expiry = {
  idle_timeout_seconds: Type.Number({ description: 'Idle time after which the reaper ends the session' }),
  expires_at: Type.String({ format: 'date-time', description: 'When the session expires if nothing else happens' })
}
