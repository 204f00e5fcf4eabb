// Typed errors shared by the core and the HTTP layer. Each carries the code and
// HTTP status the API answers with, so routes never have to guess.

/**
 * Why a session ended: expired (idle past its timeout), ended (by the client),
 * shutdown (the server stopped without a store), agent_exited (its agent died
 * and could not be brought back), resume_failed (bringing a stopped agent back failed),
 * instance_lost (the instance that ran it is gone and this one cannot continue its conversation).
 */
export type SessionEndReason = 'expired' | 'ended' | 'shutdown' | 'agent_exited' | 'resume_failed' | 'instance_lost'

export const ERROR_STATUS = {
  INVALID_REQUEST: 400,
  UNAUTHORIZED: 401,
  SESSION_NOT_FOUND: 404,
  NOT_FOUND: 404,
  PERMISSION_NOT_FOUND: 404,
  REQUEST_RECEIVE_TIMEOUT: 408,
  SESSION_BUSY: 409,
  PERMISSION_ALREADY_DECIDED: 409,
  PAYLOAD_TOO_LARGE: 413,
  UNSUPPORTED_MEDIA_TYPE: 415,
  HEADERS_TOO_LARGE: 431,
  RATE_LIMITED: 429,
  AGENT_RATE_LIMITED: 429,
  AGENT_USAGE_LIMIT: 429,
  INTERNAL_SERVER_ERROR: 500,
  PROCESS_SPAWN_FAILED: 502,
  PROCESS_COMMUNICATION_FAILED: 502,
  AGENT_NOT_AUTHENTICATED: 502,
  AGENT_INVALID_API_KEY: 502,
  AGENT_UNKNOWN_MODEL: 502,
  AGENT_CHAT_NOT_FOUND: 502,
  AGENT_START_FAILED: 502,
  AGENT_AUTH_FAILED: 502,
  AGENT_EXITED: 502,
  RESUME_FAILED: 502,
  SESSION_LIMIT_REACHED: 503,
  LIVE_AGENT_LIMIT_REACHED: 503,
  CLIENT_SESSION_LIMIT_REACHED: 503,
  SERVICE_UNAVAILABLE: 503,
  STATE_UNAVAILABLE: 503,
  INSTANCE_UNREACHABLE: 503,
  REQUEST_TIMEOUT: 504
} as const

export type ErrorCode = keyof typeof ERROR_STATUS

export interface AgentSessionErrorOptions {
  /** Extra top-level fields for the JSON error body (e.g. `reason`). */
  extra?: Record<string, unknown>
  /** Seconds a client should wait before retrying (sent as Retry-After). */
  retryAfterSeconds?: number
  /** What an operator needs to know (the agent's own error output, paths): logged, never sent to the client. */
  diagnostics?: Record<string, unknown>
  cause?: unknown
}

export class AgentSessionError extends Error {
  readonly code: ErrorCode
  readonly statusCode: number
  readonly extra: Record<string, unknown>
  readonly retryAfterSeconds?: number
  readonly diagnostics?: Record<string, unknown>

  constructor (code: ErrorCode, message: string, options: AgentSessionErrorOptions = {}) {
    super(message, { cause: options.cause })
    this.name = 'AgentSessionError'
    this.code = code
    this.statusCode = ERROR_STATUS[code]
    this.extra = options.extra ?? {}
    this.retryAfterSeconds = options.retryAfterSeconds
    this.diagnostics = options.diagnostics
  }
}

export function isAgentSessionError (err: unknown): err is AgentSessionError {
  return err instanceof AgentSessionError
}

export function sessionNotFound (sessionId: string, ended?: { reason: SessionEndReason, idleMs?: number }): AgentSessionError {
  if (ended === undefined) {
    return new AgentSessionError('SESSION_NOT_FOUND', `Session ${sessionId} not found`)
  }
  const why = endReasonText(ended.reason, ended.idleMs ?? 0)
  return new AgentSessionError('SESSION_NOT_FOUND', `Session ${sessionId} not found: ${why}`, {
    extra: { reason: ended.reason }
  })
}

function endReasonText (reason: SessionEndReason, idleMs: number): string {
  switch (reason) {
    case 'expired': return `it expired after ${formatDuration(idleMs)} without activity`
    case 'ended': return 'it was ended by the client'
    case 'shutdown': return 'the server shut down'
    case 'agent_exited': return 'its agent process exited and the agent cannot continue the conversation in a new process'
    case 'resume_failed': return 'its agent could not be brought back with the conversation'
    case 'instance_lost': return 'the instance that ran it is gone and its conversation cannot be continued on another one'
  }
}

export function shuttingDown (): AgentSessionError {
  return new AgentSessionError('SERVICE_UNAVAILABLE', 'The server is shutting down', { retryAfterSeconds: 5 })
}

export function formatDuration (ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`
  if (ms < 60_000) return `${Math.round(ms / 100) / 10}s`
  if (ms < 3_600_000) return `${Math.round(ms / 6000) / 10}m`
  return `${Math.round(ms / 360_000) / 10}h`
}
