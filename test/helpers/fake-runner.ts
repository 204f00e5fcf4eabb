// An AgentRunner that spawns nothing and lets a test decide when each turn
// answers and when its teardown finishes: races are driven deliberately.

import { randomUUID } from 'node:crypto'
import type { AgentRun, AgentRunner, RunReport, TurnAnswer, TurnOptions } from '../../lib/agents/types.js'
import type { AgentSessionError } from '../../lib/errors.js'

const EXITED: RunReport = { pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }

export interface FakeTurn {
  options: TurnOptions
  answer: (text: string) => void
  fail: (err: AgentSessionError) => void
  /** Ends the turn's (pretend) teardown; until then the session is still settling. */
  finish: (report?: RunReport) => void
  aborted: boolean
}

export class FakeRunner implements AgentRunner {
  chatsCreated = 0
  readonly turns: FakeTurn[] = []
  /** When true, a turn's teardown waits for finish() even after an abort. */
  holdTeardown = false

  createChat (): AgentRun<string> {
    this.chatsCreated++
    return { result: Promise.resolve(randomUUID()), finished: Promise.resolve(EXITED) }
  }

  startTurn (options: TurnOptions): AgentRun<TurnAnswer> {
    let answer!: (text: string) => void
    let fail!: (err: AgentSessionError) => void
    let finish!: (report?: RunReport) => void
    const result = new Promise<TurnAnswer>((resolve, reject) => {
      answer = (text) => resolve({ answer: text, durationMs: 1 })
      fail = reject
    })
    result.catch(() => {})
    const finished = new Promise<RunReport>((resolve) => { finish = (report = EXITED) => resolve(report) })
    const turn: FakeTurn = { options, answer, fail, finish, aborted: false }
    options.signal?.addEventListener('abort', () => {
      turn.aborted = true
      fail(options.signal!.reason as AgentSessionError)
      if (!this.holdTeardown) finish({ pid: null, teardown: { stage: 'signalled', signal: 'SIGTERM', durationMs: 1 } })
    }, { once: true })
    this.turns.push(turn)
    return { result, finished }
  }

  async version (): Promise<string> {
    return 'fake'
  }
}
