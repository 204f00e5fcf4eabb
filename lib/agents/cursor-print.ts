// One cursor-agent invocation per call: `create-chat`, one turn with
// `--resume <chat>`, or `--version`. Each runs in its own process group, is
// parsed as it streams, and is torn down through the teardown ladder on every
// path (answer, failure, timeout, abort), so nothing it started survives.

import { AgentSessionError, type ErrorCode } from '../errors.js'
import type { AgentUser } from '../processes/agent-user.js'
import type { GroupRecorder } from '../processes/records.js'
import { releaseGroup, spawnGroup } from '../processes/spawn.js'
import { terminateProcessGroup, type TeardownReport } from '../processes/terminate.js'
import type { Logger } from '../logger.js'
import type {
  AgentConversation, AgentDriver, AgentInfo, ConversationRef, OpenOptions, ProcessReport, PromptOptions, TurnEvent, TurnResult
} from './types.js'

export interface CursorAgentOptions {
  bin: string
  workspaceDir: string
  /** Environment of every agent process, exactly (see agentEnvironment in lib/processes/environment.ts). */
  env: Record<string, string | undefined>
  /** The OS user every agent process runs as (AGENT_USER); undefined: the service's own. */
  user?: AgentUser
  killSignal: NodeJS.Signals
  killGraceMs: number
  model?: string
  force: boolean
  trust: boolean
  /** Largest stdout a turn may produce before it is torn down. */
  maxOutputBytes: number
  log: Logger
  /** Where agent process groups are recorded while they live. */
  recorder?: GroupRecorder
}

const STDERR_TAIL_BYTES = 64 * 1024
// After the main process exits, how long to wait for stderr to arrive: the
// process can exit before flushing, but a worker-server child may hold the
// pipe open forever.
const STREAM_FLUSH_WAIT_MS = 500
const VERSION_TIMEOUT_MS = 5000
/** Server environment variables cursor-agent needs beyond the base set: its own credentials. */
export const CURSOR_AGENT_ENV_NAMES: readonly string[] = ['CURSOR_API_KEY']

const CHAT_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i

/** The argv of one headless turn; the question goes to stdin, never here. */
export function turnArgs (chatId: string, options: Pick<CursorAgentOptions, 'workspaceDir' | 'trust' | 'force' | 'model'>): string[] {
  const args = ['-p', '--output-format', 'stream-json', '--stream-partial-output', '--resume', chatId, '--workspace', options.workspaceDir]
  if (options.trust) args.push('--trust')
  if (options.force) args.push('--force')
  if (options.model !== undefined && options.model !== '') args.push('--model', options.model)
  return args
}

/** A running agent call: `result` settles as soon as the outcome is known, `finished` once no process of it is left. */
interface AgentRun<T> {
  result: Promise<T>
  finished: Promise<ProcessReport>
  /** Settles the call now (if still open: with this outcome, or what its onStop answers) and tears its processes down. */
  stop: (outcome: { value: T } | AgentSessionError | 'cancelled', why: string) => void
  pid: number | null
}

// Health is polled; asking the binary for its version on every poll would spawn a process each time.
const INFO_TTL_MS = 30_000

export class CursorPrintDriver implements AgentDriver {
  readonly protocol = 'cursor' as const
  readonly keepsProcesses = false
  readonly #options: CursorAgentOptions
  // A turn still alive this long after its result is hanging (known
  // cursor-agent bug); capped so the turn is gone within KILL_GRACE of it.
  readonly #resultGraceMs: number
  readonly #running = new Map<Promise<ProcessReport>, number | null>()
  readonly #finishedListeners: Array<(report: ProcessReport) => void> = []
  #info: { value: AgentInfo, at: number } | null = null
  #infoInFlight: Promise<AgentInfo> | null = null

  constructor (options: CursorAgentOptions) {
    this.#options = options
    this.#resultGraceMs = Math.min(1000, Math.floor(options.killGraceMs / 4))
  }

  async open (options: OpenOptions): Promise<AgentConversation> {
    const chatId = await this.createChat(options).result
    return new CursorConversation(this, chatId)
  }

  async resume (ref: ConversationRef): Promise<AgentConversation> {
    if (ref.protocol !== 'cursor') throw new AgentSessionError('RESUME_FAILED', `A ${ref.protocol} conversation cannot continue with cursor-agent`)
    // Every turn is its own `--resume <chat>` process: nothing to start.
    return new CursorConversation(this, ref.chatId)
  }

  async info (options: { refresh?: boolean } = {}): Promise<AgentInfo> {
    if (options.refresh !== true && this.#info !== null && Date.now() - this.#info.at < INFO_TTL_MS) return this.#info.value
    this.#infoInFlight ??= this.version().then((version) => {
      const value: AgentInfo = { protocol: 'cursor', name: 'cursor-agent', version, available: version !== null, canResume: true }
      this.#info = { value, at: Date.now() }
      this.#infoInFlight = null
      return value
    })
    return await this.#infoInFlight
  }

  livePids (): number[] {
    return [...this.#running.values()].filter((pid): pid is number => pid !== null)
  }

  onProcessFinished (listener: (report: ProcessReport) => void): void {
    this.#finishedListeners.push(listener)
  }

  async drain (): Promise<void> {
    while (this.#running.size > 0) await Promise.all(this.#running.keys())
  }

  createChat (options: OpenOptions): AgentRun<string> {
    let stdout = ''
    return this.#run<string>({
      args: ['create-chat'],
      input: '',
      timeoutMs: options.timeoutMs,
      signal: options.signal,
      what: 'create-chat',
      onLine: (line) => {
        stdout += line + '\n'
        return undefined
      },
      onExit: (code) => {
        if (code !== 0) return undefined
        const chatId = stdout.trim().split(/\s+/).pop() ?? ''
        if (!CHAT_ID.test(chatId)) {
          return new AgentSessionError('PROCESS_COMMUNICATION_FAILED',
            'cursor-agent create-chat did not print a chat id')
        }
        return { value: chatId }
      }
    })
  }

  /** One headless turn: streams its events, answers on the `result` line. */
  startTurn (chatId: string, prompt: string, options: Pick<PromptOptions, 'timeoutMs' | 'onEvent'>): AgentRun<TurnResult> {
    const started = performance.now()
    const text = new AnswerText()
    return this.#run<TurnResult>({
      args: turnArgs(chatId, this.#options),
      input: prompt,
      timeoutMs: options.timeoutMs,
      what: 'turn',
      onLine: (line) => {
        const event = parseEvent(line)
        if (event === null) return undefined
        if (event.type !== 'result') {
          for (const turnEvent of turnEventsOf(event, text)) options.onEvent(turnEvent)
          return undefined
        }
        if (event.is_error === true || (event.subtype !== undefined && event.subtype !== 'success')) {
          const message = typeof event.result === 'string' && event.result !== '' ? event.result : 'the agent reported an error'
          return classifyAgentFailure(message, 1)
        }
        if (isRecord(event.usage)) options.onEvent({ type: 'usage', usage: event.usage })
        const answer = typeof event.result === 'string' && event.result !== '' ? event.result : text.value
        return { value: { answer, stopReason: 'end_turn', durationMs: Math.round(performance.now() - started) } }
      },
      onExit: () => undefined,
      onStop: () => ({ answer: text.value, stopReason: 'cancelled', durationMs: Math.round(performance.now() - started) })
    })
  }

  async version (): Promise<string | null> {
    let first: string | null = null
    const run = this.#run<string | null>({
      args: ['--version'],
      input: '',
      timeoutMs: VERSION_TIMEOUT_MS,
      what: 'version',
      onLine: (line) => {
        first ??= line.trim() === '' ? null : line.trim()
        return undefined
      },
      onExit: (code) => ({ value: code === 0 ? first : null })
    })
    try {
      return await run.result
    } catch {
      return null
    } finally {
      await run.finished
    }
  }

  #run<T> (spec: RunSpec<T>): AgentRun<T> {
    const o = this.#options
    const log = o.log
    let settle!: { resolve: (value: T) => void, reject: (err: AgentSessionError) => void }
    const result = new Promise<T>((resolve, reject) => { settle = { resolve, reject } })
    let settled = false
    let resultAt: number | null = null

    if (spec.signal?.aborted === true) {
      settled = true
      result.catch(() => {})
      settle.reject(abortError(spec.signal))
      return { result, finished: Promise.resolve({ pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }), stop: () => {}, pid: null }
    }

    const subprocess = spawnGroup(o.bin, spec.args, { cwd: o.workspaceDir, env: o.env, input: spec.input, user: o.user, recorder: o.recorder })
    const pid = subprocess.pid ?? null
    // execa resolves once the process exited AND its pipes closed; never left unawaited.
    const completion = subprocess.then((r) => r, (err: unknown) => err)

    const finish = (outcome: { value: T } | AgentSessionError): void => {
      if (settled) return
      settled = true
      if (outcome instanceof AgentSessionError) settle.reject(outcome)
      else settle.resolve(outcome.value)
    }

    let stderrTail = ''
    let stdoutBytes = 0
    let pending = ''
    let timer: NodeJS.Timeout | undefined
    let mainExited = false
    let onMainExit: (() => void) | null = null
    const mainExit = new Promise<void>((resolve) => { onMainExit = resolve })

    let teardown: (why: string) => void = () => {}
    const tornDown = new Promise<TeardownReport>((resolve) => {
      let started = false
      teardown = (why: string) => {
        if (started) return
        started = true
        clearTimeout(timer)
        const run = async (): Promise<TeardownReport> => {
          if (pid === null) return { stage: 'exited', signal: null, durationMs: 0 }
          // After a result the grace counts from the result itself, so even an
          // agent that hangs and ignores the polite signal is gone within KILL_GRACE of it.
          const graceMs = resultAt === null ? o.killGraceMs : Math.max(0, o.killGraceMs - (performance.now() - resultAt))
          const report = await terminateProcessGroup(pid, { signal: o.killSignal, graceMs })
          // Everything that held the pipes is gone; close our ends so execa settles.
          subprocess.stdout?.destroy()
          subprocess.stderr?.destroy()
          log.debug({ pid, what: spec.what, why, stage: report.stage, teardownMs: report.durationMs }, 'agent process group torn down')
          return report
        }
        run().then(resolve, (err: unknown) => {
          log.error({ err, pid, what: spec.what }, 'agent teardown failed')
          resolve({ stage: 'killed', signal: 'SIGKILL', durationMs: 0 })
        })
      }
    })

    const onAbort = (): void => {
      finish(abortError(spec.signal))
      teardown('aborted')
    }
    spec.signal?.addEventListener('abort', onAbort, { once: true })

    timer = setTimeout(() => {
      finish(new AgentSessionError('REQUEST_TIMEOUT',
        `cursor-agent ${spec.what} did not finish within ${spec.timeoutMs}ms`))
      teardown('timeout')
    }, spec.timeoutMs)

    const handleLine = (line: string): void => {
      if (settled) return
      const outcome = spec.onLine(line)
      if (outcome === undefined) return
      finish(outcome)
      resultAt = performance.now()
      clearTimeout(timer)
      // The answer is in; give the process a moment to exit by itself, then
      // tear down whatever is left (a hang after result, worker-server children).
      const grace = setTimeout(() => teardown('after result'), this.#resultGraceMs)
      void mainExit.then(() => { clearTimeout(grace); teardown('after result') })
    }

    subprocess.stdout?.setEncoding('utf8')
    subprocess.stdout?.on('data', (chunk: string) => {
      stdoutBytes += Buffer.byteLength(chunk)
      if (stdoutBytes > o.maxOutputBytes) {
        finish(new AgentSessionError('PROCESS_COMMUNICATION_FAILED',
          `cursor-agent produced more than ${o.maxOutputBytes} bytes of output`))
        teardown('output too large')
        return
      }
      pending += chunk
      let newline: number
      while ((newline = pending.indexOf('\n')) !== -1) {
        const line = pending.slice(0, newline)
        pending = pending.slice(newline + 1)
        handleLine(line)
      }
    })
    const stdoutEnded = streamEnd(subprocess.stdout)
    const stderrEnded = streamEnd(subprocess.stderr)
    subprocess.stderr?.setEncoding('utf8')
    subprocess.stderr?.on('data', (chunk: string) => {
      stderrTail = (stderrTail + chunk).slice(-STDERR_TAIL_BYTES)
    })

    subprocess.once('exit', (code: number | null, signal: NodeJS.Signals | null) => {
      mainExited = true
      onMainExit?.()
      if (settled) {
        teardown('exited')
        return
      }
      // Let the last output arrive (it may come after the exit), but not forever.
      // After the wait, one more turn of the event loop reads what is already
      // in the pipes: a loop that lagged past the wait must not drop it.
      const flushed = delay(STREAM_FLUSH_WAIT_MS).then(nextIoTurn)
      void Promise.race([Promise.all([stdoutEnded, stderrEnded]), flushed]).then(() => {
        if (pending !== '') {
          handleLine(pending)
          pending = ''
        }
        if (!settled) {
          const outcome = spec.onExit(code)
          finish(outcome ?? classifyAgentFailure(stderrTail, code, signal))
        }
        teardown('exited')
      })
    })

    void completion.then((r) => {
      // Spawn failures (missing binary, not executable) never emit 'exit'.
      const failure = r as { failed?: boolean, code?: string, exitCode?: number }
      if (!mainExited && failure.failed === true && failure.exitCode === undefined) {
        finish(spawnError(o.bin, failure.code))
        teardown('spawn failed')
      }
    })

    const finished = Promise.all([tornDown, completion]).then(([report]) => {
      spec.signal?.removeEventListener('abort', onAbort)
      if (pid !== null) releaseGroup(pid, o.recorder)
      if (resultAt !== null) {
        log.debug({ pid, stage: report.stage, afterResultMs: Math.round(performance.now() - resultAt) }, 'agent turn finished')
      }
      this.#running.delete(finished)
      const processReport: ProcessReport = { pid, teardown: report }
      for (const listener of this.#finishedListeners) listener(processReport)
      return processReport
    })
    this.#running.set(finished, pid)
    result.catch(() => {})
    const stop = (outcome: { value: T } | AgentSessionError | 'cancelled', why: string): void => {
      if (outcome !== 'cancelled') finish(outcome)
      else if (spec.onStop !== undefined) finish({ value: spec.onStop() })
      teardown(why)
    }
    return { result, finished, stop, pid }
  }
}

/**
 * A cursor-agent chat. No process lives between turns: each prompt is one
 * `--resume <chat>` process, so suspend and resume cost nothing.
 */
class CursorConversation implements AgentConversation {
  readonly ref: ConversationRef
  readonly #driver: CursorPrintDriver
  readonly #chatId: string
  #turn: AgentRun<TurnResult> | null = null
  // The last turn answers before its teardown ends; the next one waits for it,
  // so two processes never run on one chat.
  #settling: Promise<ProcessReport> | null = null
  #closed = false
  #prompting = false
  // A cancel that came while the prompt still waited for the previous turn's teardown.
  #cancelledEarly = false

  constructor (driver: CursorPrintDriver, chatId: string) {
    this.#driver = driver
    this.#chatId = chatId
    this.ref = { protocol: 'cursor', chatId }
  }

  get alive (): boolean {
    return !this.#closed
  }

  get pid (): number | null {
    return this.#turn?.pid ?? null
  }

  async prompt (text: string, options: PromptOptions): Promise<TurnResult> {
    this.#prompting = true
    this.#cancelledEarly = false
    try {
      if (this.#settling !== null) await this.#settling
      if (this.#closed) throw new AgentSessionError('SERVICE_UNAVAILABLE', 'The conversation was closed')
      if (this.#cancelledEarly) return { answer: '', stopReason: 'cancelled', durationMs: 0 }
      const run = this.#driver.startTurn(this.#chatId, text, options)
      this.#turn = run
      this.#settling = run.finished
      try {
        return await run.result
      } finally {
        if (this.#turn === run) this.#turn = null
      }
    } finally {
      this.#prompting = false
    }
  }

  cancel (): boolean {
    if (this.#turn !== null) {
      this.#turn.stop('cancelled', 'cancelled')
      return true
    }
    if (this.#prompting) this.#cancelledEarly = true
    return this.#prompting
  }

  async suspend (): Promise<ProcessReport> {
    return await this.#settled()
  }

  async close (): Promise<ProcessReport> {
    this.#closed = true
    this.#turn?.stop(new AgentSessionError('SERVICE_UNAVAILABLE', 'The conversation was closed'), 'closed')
    return await this.#settled()
  }

  onExit (): void {
    // No process outlives a turn, so none can die between turns.
  }

  async #settled (): Promise<ProcessReport> {
    return this.#settling === null ? EXITED : await this.#settling
  }
}

const EXITED: ProcessReport = { pid: null, teardown: { stage: 'exited', signal: null, durationMs: 0 } }

/** The answer as it streams: deltas, or whole messages from builds without partial output. */
class AnswerText {
  value = ''
  #sawDelta = false

  /** The text this assistant event adds to the answer ('' when it repeats what deltas sent). */
  add (event: AgentEvent): string {
    const text = assistantTextOf(event)
    // With --stream-partial-output, deltas carry timestamp_ms and no model_call_id;
    // the message that follows repeats them whole.
    const isDelta = event.timestamp_ms !== undefined && event.model_call_id === undefined
    if (!isDelta && this.#sawDelta) {
      this.#sawDelta = false
      return ''
    }
    if (isDelta) this.#sawDelta = true
    this.value += text
    return text
  }
}

function turnEventsOf (event: AgentEvent, text: AnswerText): TurnEvent[] {
  switch (event.type) {
    case 'assistant': {
      const added = text.add(event)
      return added === '' ? [] : [{ type: 'chunk', text: added }]
    }
    case 'thinking':
      return event.subtype === 'delta' && typeof event.text === 'string' && event.text !== ''
        ? [{ type: 'thought', text: event.text }]
        : []
    case 'tool_call': {
      const call = toolCallOf(event)
      return call === null ? [] : [call]
    }
    default:
      return []
  }
}

const TOOL_KINDS: Record<string, string> = {
  shell: 'execute', read: 'read', write: 'edit', edit: 'edit', delete: 'delete',
  grep: 'search', glob: 'search', ls: 'search', search: 'search', fetch: 'fetch'
}

/** cursor-agent's `{shellToolCall: {args, result}}` as ACP's tool call shape. */
function toolCallOf (event: AgentEvent): TurnEvent | null {
  if (typeof event.call_id !== 'string' || !isRecord(event.tool_call)) return null
  const [key, body] = Object.entries(event.tool_call)[0] ?? []
  if (key === undefined) return null
  const name = key.replace(/ToolCall$/, '')
  const details = isRecord(body) ? body : {}
  const args = isRecord(details.args) ? details.args : {}
  const subject = [args.command, args.path, args.pattern, args.url].find((v) => typeof v === 'string') as string | undefined
  const result = isRecord(details.result) ? details.result : undefined
  const status = event.subtype === 'completed'
    ? (result !== undefined && result.success === undefined ? 'failed' : 'completed')
    : 'in_progress'
  return {
    type: 'tool_call',
    id: event.call_id,
    title: subject === undefined ? name : `${name}: ${subject}`,
    kind: TOOL_KINDS[name] ?? 'other',
    status
  }
}

function isRecord (value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value)
}

interface RunSpec<T> {
  args: string[]
  input: string
  timeoutMs: number
  signal?: AbortSignal
  what: string
  /** A value or error settles the call; undefined reads on. */
  onLine: (line: string) => { value: T } | AgentSessionError | undefined
  /** Called when the main process exited without onLine settling the call. */
  onExit: (code: number | null) => { value: T } | AgentSessionError | undefined
  /** What a call stopped early (a cancelled turn) answers. */
  onStop?: () => T
}

type AgentEvent = Record<string, unknown> & { type?: unknown }

function parseEvent (line: string): AgentEvent | null {
  const trimmed = line.trim()
  if (!trimmed.startsWith('{')) return null
  try {
    const value: unknown = JSON.parse(trimmed)
    return typeof value === 'object' && value !== null && !Array.isArray(value) ? value as AgentEvent : null
  } catch {
    return null
  }
}

function assistantTextOf (event: AgentEvent): string {
  const message = event.message as { content?: unknown } | undefined
  if (!Array.isArray(message?.content)) return ''
  let text = ''
  for (const part of message.content as Array<{ type?: unknown, text?: unknown }>) {
    if (part?.type === 'text' && typeof part.text === 'string') text += part.text
  }
  return text
}

const FAILURES: Array<[RegExp, ErrorCode, string, number?]> = [
  [/authentication required|cursor-agent login|not logged in/i, 'AGENT_NOT_AUTHENTICATED',
    'cursor-agent is not logged in on the server: run `cursor-agent login` there or set CURSOR_API_KEY'],
  [/api key is invalid|invalid api key/i, 'AGENT_INVALID_API_KEY',
    'cursor-agent rejected its API key: check CURSOR_API_KEY on the server'],
  [/usage limit/i, 'AGENT_USAGE_LIMIT', 'The Cursor account has hit its usage limit', 3600],
  [/rate limit|\b429\b|too many requests/i, 'AGENT_RATE_LIMITED', 'Cursor is rate limiting requests: try again shortly', 30],
  [/cannot use this model/i, 'AGENT_UNKNOWN_MODEL', 'cursor-agent does not know the configured model (AGENT_MODEL)'],
  [/no previous chats found|chat .*not found/i, 'AGENT_CHAT_NOT_FOUND', 'cursor-agent no longer knows this session\'s chat']
]

/**
 * Turns a failed invocation's stderr and exit status into the error the client
 * sees: a code and a message of our own. The agent's words (stack traces, home
 * directories, paths) go to the server log only, as diagnostics.
 */
export function classifyAgentFailure (stderr: string, exitCode: number | null, signal?: NodeJS.Signals | null): AgentSessionError {
  const agentMessage = lastLines(stderr)
  const diagnostics = { agentMessage, exitCode, signal: signal ?? null }
  for (const [pattern, code, message, retryAfterSeconds] of FAILURES) {
    if (pattern.test(stderr)) return new AgentSessionError(code, message, { retryAfterSeconds, diagnostics })
  }
  const how = signal != null ? `was killed by ${signal}` : `exited with code ${String(exitCode)}`
  const hint = /workspace trust/i.test(stderr) ? ' The workspace is not trusted: set AGENT_TRUST=true.' : ''
  const said = agentMessage === '' ? ' without an answer or an error message' : ' without an answer; its error message is in the server log'
  return new AgentSessionError('PROCESS_COMMUNICATION_FAILED', `cursor-agent ${how}${said}.${hint}`, { diagnostics })
}

function lastLines (text: string): string {
  const lines = text.split('\n').map((l) => l.trim()).filter((l) => l !== '')
  const message = lines.slice(-3).join(' ')
  // The error is at the end: keep the end when noise came before it.
  return message.length > 500 ? '…' + message.slice(-500) : message
}

function spawnError (bin: string, code: string | undefined): AgentSessionError {
  const why = code === 'ENOENT' ? 'was not found' : code === 'EACCES' ? 'is not executable' : 'could not be started'
  // The path stays in the log: it tells a client about the server's layout.
  return new AgentSessionError('PROCESS_SPAWN_FAILED', `The agent program ${why}: check CURSOR_AGENT_BIN on the server`,
    { diagnostics: { bin, spawnError: code ?? 'unknown' } })
}

function abortError (signal: AbortSignal | undefined): AgentSessionError {
  const reason: unknown = signal?.reason
  return reason instanceof AgentSessionError
    ? reason
    : new AgentSessionError('SERVICE_UNAVAILABLE', 'The request was cancelled')
}

function streamEnd (stream: NodeJS.ReadableStream | null | undefined): Promise<void> {
  if (stream == null) return Promise.resolve()
  return new Promise((resolve) => {
    stream.once('end', resolve)
    stream.once('close', resolve)
    stream.once('error', () => resolve())
  })
}

function delay (ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms).unref())
}

/** Resolves after the poll phase of the current loop turn: I/O already waiting is handled first. */
function nextIoTurn (): Promise<void> {
  return new Promise((resolve) => setImmediate(resolve))
}
