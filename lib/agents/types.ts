// What the session manager needs from an agent driver, whatever protocol the
// agent speaks. Drivers live beside this file, one per protocol.

import type { TeardownReport } from '../processes/terminate.js'

/** A running agent call: `result` settles as soon as the outcome is known, `finished` once no process of it is left. */
export interface AgentRun<T> {
  result: Promise<T>
  finished: Promise<RunReport>
}

export interface RunReport {
  pid: number | null
  teardown: TeardownReport
}

export interface TurnAnswer {
  answer: string
  durationMs: number
}

export interface TurnOptions {
  chatId: string
  prompt: string
  timeoutMs: number
  /** Aborting tears the turn down; `result` rejects with the abort reason at once. */
  signal?: AbortSignal
}

/**
 * What the session manager needs from an agent driver. The per-turn process
 * driver (cursor-print.ts) implements it; a long-lived driver (one process per session
 * speaking ACP) can implement it without touching routes or the reaper.
 */
export interface AgentRunner {
  createChat (options: { timeoutMs: number, signal?: AbortSignal }): AgentRun<string>
  startTurn (options: TurnOptions): AgentRun<TurnAnswer>
  /** The agent's version string, or null when the binary does not answer. */
  version (): Promise<string | null>
}
