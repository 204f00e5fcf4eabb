// An AgentDriver that spawns nothing and lets a test decide when each turn
// answers and when its (pretend) processes are gone: races are driven deliberately.

import { randomUUID } from 'node:crypto'
import type {
  AgentConversation, AgentDriver, AgentExit, AgentInfo, ConversationRef, OpenOptions, ProcessReport, PromptOptions, TurnResult
} from '../../lib/agents/types.js'
import type { AgentSessionError } from '../../lib/errors.js'
import { newSessionId } from '../../lib/sessions/manager.js'

export const EXITED: ProcessReport = { pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }

export interface FakeTurn {
  text: string
  options: PromptOptions
  answer: (text: string) => void
  fail: (err: AgentSessionError) => void
  /** Ends the turn's (pretend) teardown; until then the conversation is still settling. */
  finish: (report?: ProcessReport) => void
  aborted: boolean
}

export class FakeDriver implements AgentDriver {
  readonly protocol = 'cursor' as const
  keepsProcesses = false
  opened = 0
  readonly turns: FakeTurn[] = []
  /** When true, a turn's teardown waits for finish() even after an abort. */
  holdTeardown = false
  /** When set, open() waits for it (starts stay "in progress"). */
  gate: Promise<void> | null = null
  /** What open() does instead of succeeding. */
  openError: Error | null = null
  readonly #listeners: Array<(report: ProcessReport) => void> = []

  async open (options: OpenOptions): Promise<AgentConversation> {
    this.opened++
    if (this.gate !== null) await this.gate
    if (this.openError !== null) throw this.openError
    if (options.signal?.aborted === true) throw options.signal.reason
    return new FakeConversation(this, { protocol: 'cursor', chatId: randomUUID() })
  }

  async resume (ref: ConversationRef): Promise<AgentConversation> {
    return new FakeConversation(this, ref)
  }

  async info (): Promise<AgentInfo> {
    return { protocol: 'cursor', name: 'fake', version: 'fake', available: true, canResume: true }
  }

  livePids (): number[] {
    return []
  }

  onProcessFinished (listener: (report: ProcessReport) => void): void {
    this.#listeners.push(listener)
  }

  async drain (): Promise<void> {}

  /** @internal */
  startTurn (text: string, options: PromptOptions): { turn: FakeTurn, result: Promise<TurnResult>, finished: Promise<ProcessReport> } {
    let answer!: (text: string) => void
    let fail!: (err: AgentSessionError) => void
    let finish!: (report?: ProcessReport) => void
    const result = new Promise<TurnResult>((resolve, reject) => {
      answer = (answerText) => resolve({ answer: answerText, stopReason: 'end_turn', durationMs: 1 })
      fail = reject
    })
    result.catch(() => {})
    const finished = new Promise<ProcessReport>((resolve) => {
      finish = (report = EXITED) => {
        resolve(report)
        for (const listener of this.#listeners) listener(report)
      }
    })
    const turn: FakeTurn = { text, options, answer, fail, finish, aborted: false }
    this.turns.push(turn)
    return { turn, result, finished }
  }
}

class FakeConversation implements AgentConversation {
  readonly ref: ConversationRef
  readonly pid = null
  readonly #driver: FakeDriver
  #current: FakeTurn | null = null
  #settling: Promise<ProcessReport> | null = null
  #closed = false

  constructor (driver: FakeDriver, ref: ConversationRef) {
    this.#driver = driver
    this.ref = ref
  }

  get alive (): boolean {
    return !this.#closed
  }

  async prompt (text: string, options: PromptOptions): Promise<TurnResult> {
    // Like the real drivers: the previous turn's processes are gone before the next one starts.
    if (this.#settling !== null) await this.#settling
    if (this.#closed) throw new Error('closed')
    const { turn, result, finished } = this.#driver.startTurn(text, options)
    this.#current = turn
    this.#settling = finished
    try {
      return await result
    } finally {
      this.#current = null
    }
  }

  cancel (): boolean {
    const turn = this.#current
    if (turn === null) return false
    turn.aborted = true
    turn.answer('')
    if (!this.#driver.holdTeardown) turn.finish({ pid: null, teardown: { stage: 'signalled', signal: 'SIGTERM', durationMs: 1 } })
    return true
  }

  async suspend (): Promise<ProcessReport> {
    return this.#settling === null ? EXITED : await this.#settling
  }

  async close (): Promise<ProcessReport> {
    this.#closed = true
    const turn = this.#current
    if (turn !== null) {
      turn.aborted = true
      turn.fail(new Error('closed') as AgentSessionError)
      if (!this.#driver.holdTeardown) turn.finish({ pid: null, teardown: { stage: 'signalled', signal: 'SIGTERM', durationMs: 1 } })
    }
    return this.#settling === null ? EXITED : await this.#settling
  }

  onExit (_listener: (exit: AgentExit) => void): void {}
}

/**
 * A driver whose conversations spawn nothing and answer every turn with
 * `prompt`: for what lies above the driver (memory per session, streaming),
 * where no test needs to steer a turn by hand. Chat ids are flat strings, as
 * the real drivers' are, so a session costs what it costs in the service.
 */
export function promptOnlyDriver (name: string, prompt: AgentConversation['prompt']): AgentDriver {
  const conversation = (chatId: string): AgentConversation => ({
    ref: { protocol: 'cursor', chatId },
    alive: true,
    pid: null,
    prompt,
    cancel: () => false,
    suspend: async () => EXITED,
    close: async () => EXITED,
    onExit: () => {}
  })
  return {
    protocol: 'cursor',
    keepsProcesses: false,
    open: async () => conversation(newSessionId()),
    resume: async (ref) => conversation(ref.protocol === 'cursor' ? ref.chatId : ref.sessionId),
    info: async () => ({ protocol: 'cursor', name, version: name, available: true, canResume: true }),
    livePids: () => [],
    onProcessFinished: () => {},
    drain: async () => {}
  }
}
