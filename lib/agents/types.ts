// What the session manager needs from an agent driver, whatever protocol the
// agent speaks. Drivers live beside this file, one per protocol: they know no
// sessions, timeouts of their own choosing or HTTP.

import type { TeardownReport } from '../processes/terminate.js'

export type AgentProtocol = 'cursor' | 'acp'

/** Why a turn ended (ACP's stop reasons; the cursor driver answers end_turn or cancelled). */
export type StopReason = 'end_turn' | 'max_tokens' | 'max_turn_requests' | 'refusal' | 'cancelled'

export type ToolCallStatus = 'pending' | 'in_progress' | 'completed' | 'failed'

export interface PlanEntry {
  content: string
  priority: string
  status: string
}

export interface PermissionOption {
  optionId: string
  name: string
  /** allow_once, allow_always, reject_once, reject_always (agents may add others). */
  kind: string
}

export interface PermissionRequest {
  /** Unique within the service's lifetime; what a client answers with. */
  requestId: string
  title: string
  options: PermissionOption[]
}

export type PermissionDecision =
  | { outcome: 'selected', optionId: string }
  | { outcome: 'cancelled' }

/** Something that happened during a turn, in the order the agent sent it. */
export type TurnEvent =
  | { type: 'chunk', text: string }
  | { type: 'thought', text: string }
  | { type: 'tool_call', id: string, title: string, kind: string, status: ToolCallStatus }
  | { type: 'plan', entries: PlanEntry[] }
  | { type: 'usage', usage: Record<string, unknown> }
  | { type: 'permission', request: PermissionRequest }
  | { type: 'permission_decided', requestId: string, outcome: 'selected' | 'cancelled' | 'timeout', optionId: string | null }

export interface TurnResult {
  /** The answer's text: everything the agent said, also when the turn was cancelled. */
  answer: string
  stopReason: StopReason
  durationMs: number
}

export interface PromptOptions {
  /** The turn is cancelled at this deadline, then torn down if the agent ignores the cancel. */
  timeoutMs: number
  onEvent: (event: TurnEvent) => void
  /** Decides a permission request; the driver answers the agent with the result. */
  decidePermission: (request: PermissionRequest, signal: AbortSignal) => Promise<PermissionDecision>
}

/** What the store keeps to continue a conversation in a new process. */
export type ConversationRef =
  | { protocol: 'cursor', chatId: string }
  | { protocol: 'acp', sessionId: string }

/** How the last process of a conversation (or of one call) ended. */
export interface ProcessReport {
  pid: number | null
  teardown: TeardownReport
}

export interface AgentExit {
  pid: number
  code: number | null
  signal: NodeJS.Signals | null
  /** Whether a turn was in flight when it died. */
  duringTurn: boolean
}

export interface OpenOptions {
  timeoutMs: number
  /** Aborting stops the open and tears down what it started; the promise rejects with the signal's reason. */
  signal?: AbortSignal
}

/** One agent conversation, owned by one session. */
export interface AgentConversation {
  readonly ref: ConversationRef
  /** Whether it can take a prompt: false once its live process died or was torn down (resume it instead). */
  readonly alive: boolean
  /** The live agent process group's leader, or null when no process lives between turns. */
  readonly pid: number | null
  /** One turn; rejects with an AgentSessionError (timeout, agent exited, protocol failure). */
  prompt (text: string, options: PromptOptions): Promise<TurnResult>
  /** Ends the turn in flight promptly with stop reason `cancelled`; false when none is in flight. */
  cancel (): boolean
  /** Stops the live process but keeps what resume() needs (never ends the agent's session). */
  suspend (): Promise<ProcessReport>
  /** Ends the conversation for good and tears its processes down. */
  close (): Promise<ProcessReport>
  /** Called once when the live process dies without being asked to. */
  onExit (listener: (exit: AgentExit) => void): void
}

export interface AgentInfo {
  protocol: AgentProtocol
  /** The agent's own name and version (ACP initialize, cursor-agent --version); null until known. */
  name: string | null
  version: string | null
  /** Whether a session could start now (the binary answers, the last start did not fail to spawn). */
  available: boolean
  /** Whether a conversation can continue in a new process (hibernation, restart, a dead agent). */
  canResume: boolean
}

/** One agent protocol: opens conversations and brings them back. */
export interface AgentDriver {
  readonly protocol: AgentProtocol
  open (options: OpenOptions): Promise<AgentConversation>
  /** Continues a conversation in a new process (ACP session/load; cursor --resume). */
  resume (ref: ConversationRef, options: OpenOptions): Promise<AgentConversation>
  /** What health and start-up logs show; cached by the driver, refreshed when stale. */
  info (options?: { refresh?: boolean }): Promise<AgentInfo>
  /** Leaders of the live agent process groups right now (for metrics: count and memory). */
  livePids (): number[]
  /** Called for every agent process group once it is gone, with how it ended (metrics). */
  onProcessFinished (listener: (report: ProcessReport) => void): void
  /** Resolves once no process the driver started is left (shutdown waits for it). */
  drain (): Promise<void>
}
