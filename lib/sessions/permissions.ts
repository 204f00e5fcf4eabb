// What the service answers when an agent asks for permission to run a tool,
// by PERMISSION_POLICY: reject (the default: pick a reject option), allow
// (pick an allow-once option) or ask (the client decides within
// PERMISSION_TIMEOUT; no answer is a reject). Options are chosen by their ACP kind.

import type { PermissionDecision, PermissionOption, PermissionRequest } from '../agents/types.js'
import { AgentSessionError } from '../errors.js'

export type PermissionPolicy = 'reject' | 'allow' | 'ask'

const PREFERENCE: Record<'reject' | 'allow', readonly string[]> = {
  // Once before always: a rule the agent would remember outlives this answer.
  reject: ['reject_once', 'reject_always'],
  allow: ['allow_once', 'allow_always']
}

/** The decision a fixed policy makes for these options; `cancelled` when none fits. */
export function decideByPolicy (policy: 'reject' | 'allow', options: readonly PermissionOption[]): PermissionDecision {
  for (const kind of PREFERENCE[policy]) {
    const option = options.find((o) => o.kind === kind)
    if (option !== undefined) return { outcome: 'selected', optionId: option.optionId }
  }
  return { outcome: 'cancelled' }
}

export interface Decided {
  decision: PermissionDecision
  /** timeout: nobody answered within PERMISSION_TIMEOUT, so it was rejected. */
  outcome: 'selected' | 'cancelled' | 'timeout'
}

interface Pending {
  sessionId: string
  request: PermissionRequest
  settle: (decided: Decided) => void
  timer: NodeJS.Timeout
}

// Decided ids are remembered (this many) so a late answer gets 409, not 404.
const DECIDED_MEMORY = 1000

/** Permission requests waiting for a person (PERMISSION_POLICY=ask). */
export class PendingPermissions {
  readonly #pending = new Map<string, Pending>()
  readonly #decided = new Map<string, string>()
  readonly #timeoutMs: number

  constructor (timeoutMs: number) {
    this.#timeoutMs = timeoutMs
  }

  /** Waits for the client's answer; a timeout or an aborted turn decides without it. */
  wait (sessionId: string, request: PermissionRequest, signal: AbortSignal): Promise<Decided> {
    return new Promise((resolve) => {
      const settle = (decided: Decided): void => {
        const pending = this.#pending.get(request.requestId)
        if (pending === undefined) return
        clearTimeout(pending.timer)
        this.#pending.delete(request.requestId)
        this.#remember(request.requestId, sessionId)
        signal.removeEventListener('abort', onAbort)
        resolve(decided)
      }
      const onAbort = (): void => { settle({ decision: { outcome: 'cancelled' }, outcome: 'cancelled' }) }
      // Fail safe: nobody answered, so nothing is allowed.
      const timer = setTimeout(() => {
        settle({ decision: decideByPolicy('reject', request.options), outcome: 'timeout' })
      }, this.#timeoutMs)
      timer.unref()
      this.#pending.set(request.requestId, { sessionId, request, settle, timer })
      if (signal.aborted) onAbort()
      else signal.addEventListener('abort', onAbort, { once: true })
    })
  }

  /** The client's answer to a pending request of this session. */
  answer (sessionId: string, requestId: string, optionId: string): void {
    const pending = this.#pending.get(requestId)
    if (pending === undefined || pending.sessionId !== sessionId) {
      if (this.#decided.get(requestId) === sessionId) {
        throw new AgentSessionError('PERMISSION_ALREADY_DECIDED',
          `Permission request ${requestId} was already decided (answered, timed out or its turn ended)`)
      }
      throw new AgentSessionError('PERMISSION_NOT_FOUND', `No permission request ${requestId} is waiting in this session`)
    }
    if (!pending.request.options.some((o) => o.optionId === optionId)) {
      throw new AgentSessionError('INVALID_REQUEST',
        `option_id must be one of ${pending.request.options.map((o) => o.optionId).join(', ')}`)
    }
    pending.settle({ decision: { outcome: 'selected', optionId }, outcome: 'selected' })
  }

  /** The requests of a session still waiting (for a subscriber that joins late). */
  waiting (sessionId: string): PermissionRequest[] {
    return [...this.#pending.values()].filter((p) => p.sessionId === sessionId).map((p) => p.request)
  }

  #remember (requestId: string, sessionId: string): void {
    this.#decided.set(requestId, sessionId)
    if (this.#decided.size > DECIDED_MEMORY) this.#decided.delete(this.#decided.keys().next().value as string)
  }
}
