// Drives test/fixtures/fake-cursor-agent.mjs directly: the other tests trust it
// to behave like cursor-agent (see cursor-agent.md), so its behaviour is pinned here.
// Every process a test starts (including the simulator's children, read from its
// pids.log) is SIGKILLed in that test's teardown; the last test checks they are gone.

import t, { type Test } from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, realpathSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any

const FAKE = fileURLToPath(new URL('./fixtures/fake-cursor-agent.mjs', import.meta.url))
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
const AUTH = "Error: Authentication required. Please run 'cursor-agent login' first, or set CURSOR_API_KEY environment variable."
const MODELS = 'auto, gpt-5, sonnet-4.5, opus-4.1, composer-1'
const STREAM = ['-p', '--output-format', 'stream-json']

// Every pid any test started, checked by the last test.
const everyPid = new Set<number>()

// Deadlines only turn a hang into a failure: at least 10x what a simulator run
// takes on a loaded machine (Node.js alone can take 5 s to start there, and
// some tests start a dozen runs at once).
const DEADLINE_MS = 120_000

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms))

/** Alive = /proc/<pid>/stat exists and the process is not a zombie (PID 1 here does not reap orphans). */
function isAlive (pid: number): boolean {
  let stat: string
  try {
    stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  } catch {
    return false
  }
  const state = stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0]
  return state !== 'Z' && state !== 'X'
}

function pgidOf (pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2])
}

function isOurs (pid: number): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('fake-cursor-agent')
  } catch {
    return false
  }
}

async function waitFor (cond: () => boolean, what: string, ms = DEADLINE_MS): Promise<void> {
  const deadline = Date.now() + ms
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await sleep(20)
  }
}

async function within<T> (p: Promise<T>, what: string, ms = DEADLINE_MS): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
  })
  try {
    return await Promise.race([p, timeout])
  } finally {
    clearTimeout(timer)
  }
}

interface Exit { code: number | null, signal: NodeJS.Signals | null }

interface Run {
  child: ChildProcess
  pid: number
  out: () => string
  err: () => string
  exited: Promise<Exit>
  /** Resolves when stdout and stderr have both been closed by every writer. */
  closed: Promise<void>
  isClosed: () => boolean
  /** JSON lines of stdout so far (non-JSON lines skipped). */
  events: () => Json[]
}

interface RunOptions {
  input?: string
  env?: Record<string, string>
  cwd?: string
}

interface Agent {
  dir: string
  run: (args: string[], opts?: RunOptions) => Run
  /** Runs to completion (exit AND both pipes closed). */
  exec: (args: string[], opts?: RunOptions) => Promise<Exit & { stdout: string, stderr: string, pid: number }>
  pids: () => Array<{ pid: number, role: string }>
}

function parseEvents (text: string): Json[] {
  const events: Json[] = []
  for (const line of text.split('\n')) {
    if (!line.trim().startsWith('{')) continue
    try {
      events.push(JSON.parse(line))
    } catch {
      // garbage lines are skipped
    }
  }
  return events
}

function baseEnv (): Record<string, string> {
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith('FAKE_AGENT_') || k === 'CURSOR_API_KEY') continue
    // tap's NODE_OPTIONS loads its process-info hook into every node child: slow, and not ours.
    if (k === 'NODE_OPTIONS' || k.startsWith('_TAPJS_')) continue
    env[k] = v
  }
  return env
}

/** A fresh state dir, a spawner, and a teardown that SIGKILLs everything started. */
function agent (t: Test): Agent {
  const dir = mkdtempSync(join(tmpdir(), 'fake-agent-test-'))
  const runs: Run[] = []

  const pids = (): Array<{ pid: number, role: string }> => {
    const file = join(dir, 'pids.log')
    if (!existsSync(file)) return []
    return readFileSync(file, 'utf8').split('\n').filter(Boolean).map((line) => {
      const [pid, role] = line.split(' ')
      return { pid: Number(pid), role }
    })
  }

  const run = (args: string[], opts: RunOptions = {}): Run => {
    const child = spawn(FAKE, args, {
      detached: true,
      stdio: ['pipe', 'pipe', 'pipe'],
      cwd: opts.cwd,
      env: { ...baseEnv(), FAKE_AGENT_STATE_DIR: dir, ...opts.env }
    })
    if (child.pid === undefined) throw new Error('spawn failed')
    everyPid.add(child.pid)
    let out = ''
    let err = ''
    let open = 2
    let onClosed: () => void = () => {}
    const closed = new Promise<void>((resolve) => { onClosed = resolve })
    const ended = () => { if (--open === 0) onClosed() }
    child.stdout!.setEncoding('utf8').on('data', (d: string) => { out += d }).on('close', ended)
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { err += d }).on('close', ended)
    child.stdin!.on('error', () => {})
    child.stdin!.end(opts.input ?? '')
    const exited = new Promise<Exit>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
    const r: Run = {
      child,
      pid: child.pid,
      out: () => out,
      err: () => err,
      exited,
      closed,
      isClosed: () => open === 0,
      events: () => parseEvents(out)
    }
    runs.push(r)
    return r
  }

  const exec = async (args: string[], opts: RunOptions = {}) => {
    const r = run(args, opts)
    const exit = await within(r.exited, `exit of fake-cursor-agent ${args.join(' ')}`)
    await within(r.closed, 'stdout/stderr to close')
    return { ...exit, stdout: r.out(), stderr: r.err(), pid: r.pid }
  }

  t.teardown(async () => {
    const all = new Set<number>()
    for (const r of runs) {
      all.add(r.pid)
      try { process.kill(-r.pid, 'SIGKILL') } catch {}
    }
    for (const { pid } of pids()) {
      all.add(pid)
      everyPid.add(pid)
      if (isAlive(pid) && isOurs(pid)) {
        try { process.kill(pid, 'SIGKILL') } catch {}
      }
    }
    await waitFor(() => [...all].every((pid) => !isAlive(pid)), 'every process to die')
    for (const r of runs) {
      r.child.stdout!.destroy()
      r.child.stderr!.destroy()
    }
    rmSync(dir, { recursive: true, force: true })
  })

  return { dir, run, exec, pids }
}

async function createChat (a: Agent): Promise<string> {
  const r = await a.exec(['create-chat'])
  if (r.code !== 0) throw new Error(`create-chat failed: ${r.stderr}`)
  return r.stdout.trim()
}

async function ask (a: Agent, question: string, chat?: string): Promise<string> {
  const args = ['-p', ...(chat ? ['--resume', chat] : [])]
  const r = await a.exec(args, { input: question })
  if (r.code !== 0) throw new Error(`ask failed: ${r.stderr}`)
  return r.stdout.trim()
}

t.test('--version and -v print the version and exit 0', async (t) => {
  const a = agent(t)
  for (const flag of ['--version', '-v']) {
    const r = await a.exec([flag])
    t.equal(r.code, 0)
    t.equal(r.stdout, '2026.11.20-fake\n')
    t.equal(r.stderr, '')
    t.ok(a.pids().some((p) => p.pid === r.pid && p.role === 'main'), 'logged as main')
  }
})

t.test('create-chat prints a UUID and stores an empty chat', async (t) => {
  const a = agent(t)
  const r = await a.exec(['create-chat'])
  t.equal(r.code, 0)
  t.match(r.stdout, /\n$/)
  const id = r.stdout.trim()
  t.match(id, UUID)
  const chat = JSON.parse(readFileSync(join(a.dir, 'chats', `${id}.json`), 'utf8'))
  t.equal(chat.id, id)
  t.same(chat.turns, [])
  t.type(chat.created, 'string')
  t.same(a.pids(), [{ pid: r.pid, role: 'main' }])
  t.not(await createChat(a), id, 'every chat is new')
})

t.test('each chat remembers only its own questions', async (t) => {
  const a = agent(t)
  const chatA = await createChat(a)
  const chatB = await createChat(a)
  t.equal(await ask(a, 'first a', chatA), 'Answer 1: you asked "first a"')
  t.equal(await ask(a, 'only b', chatB), 'Answer 1: you asked "only b"')
  t.equal(await ask(a, '  second a  ', chatA), 'Answer 2: you asked "second a"')
  t.equal(await ask(a, 'What is my HISTORY?', chatA), 'This chat has 2 earlier questions: first a | second a')
  t.equal(await ask(a, 'history please', chatB), 'This chat has 1 earlier questions: only b')
  t.equal(await ask(a, 'history'), 'This chat has 0 earlier questions.', 'no --resume: a fresh chat')
  t.equal(await ask(a, 'anything'), 'Answer 1: you asked "anything"')
  const stored = JSON.parse(readFileSync(join(a.dir, 'chats', `${chatA}.json`), 'utf8'))
  t.same(stored.turns.map((turn: Json) => turn.question), ['first a', 'second a', 'What is my HISTORY?'])
})

t.test('stream-json: event order and shapes', async (t) => {
  const a = agent(t)
  const chat = await createChat(a)
  const r = await a.exec([...STREAM, '--resume', chat, '--model', 'sonnet-4.5', '--trust'], { input: 'hello stream\n' })
  t.equal(r.code, 0)
  t.equal(r.stderr, '')
  const lines = r.stdout.split('\n')
  t.equal(lines.pop(), '', 'ends with a newline')
  const events = lines.map((line) => JSON.parse(line))
  t.same(events.map((e) => e.type + (e.subtype ? '/' + e.subtype : '')), [
    'system/init', 'user', 'thinking/delta', 'thinking/completed',
    'tool_call/started', 'tool_call/completed', 'assistant', 'assistant', 'result/success'
  ])
  for (const e of events) t.equal(e.session_id, chat, `${e.type} carries the chat id`)
  const [init, user, delta, completed, started, done, a1, a2, result] = events
  t.match(init, { apiKeySource: 'login', cwd: process.cwd(), model: String, permissionMode: 'default' })
  t.same(user.message, { role: 'user', content: [{ type: 'text', text: 'hello stream' }] })
  t.type(delta.text, 'string')
  t.type(delta.timestamp_ms, 'number')
  t.type(completed.timestamp_ms, 'number')
  t.equal(started.call_id, done.call_id)
  t.same(started.tool_call, { shellToolCall: { args: { command: 'ls' } } })
  t.match(done.tool_call, { shellToolCall: { args: { command: 'ls' }, result: { success: { exitCode: 0, stdout: String } } } })
  const answer = 'Answer 1: you asked "hello stream"'
  for (const e of [a1, a2]) {
    t.equal(e.message.role, 'assistant')
    t.equal(e.message.content.length, 1)
    t.ok(e.message.content[0].text.length > 0, 'each half has text')
  }
  t.equal(a1.message.content[0].text + a2.message.content[0].text, answer, 'assistant text concatenates to the answer')
  t.match(result, { subtype: 'success', is_error: false, result: answer, duration_ms: Number, duration_api_ms: Number })
  t.match(result.request_id, UUID)
})

t.test('stream-json with --stream-partial-output: deltas plus one full repeat', async (t) => {
  const a = agent(t)
  const r = await a.exec([...STREAM, '--stream-partial-output'], { input: 'partial' })
  t.equal(r.code, 0)
  const assistants = parseEvents(r.stdout).filter((e) => e.type === 'assistant')
  const deltas = assistants.filter((e) => e.timestamp_ms !== undefined && e.model_call_id === undefined)
  const full = assistants.filter((e) => e.model_call_id !== undefined)
  t.equal(deltas.map((e) => e.message.content[0].text).join(''), 'Answer 1: you asked "partial"')
  t.equal(full.length, 1)
  t.equal(full[0].message.content[0].text, 'Answer 1: you asked "partial"')
})

t.test('json format: one result line', async (t) => {
  const a = agent(t)
  const chat = await createChat(a)
  const r = await a.exec(['-p', '--output-format', 'json', '--resume', chat], { input: 'json please' })
  t.equal(r.code, 0)
  t.match(r.stdout, /^\{.*\}\n$/)
  const result = JSON.parse(r.stdout)
  t.match(result, {
    type: 'result',
    subtype: 'success',
    is_error: false,
    duration_ms: Number,
    duration_api_ms: Number,
    result: 'Answer 1: you asked "json please"',
    session_id: chat,
    usage: { inputTokens: Number, outputTokens: Number, cacheReadTokens: Number, cacheWriteTokens: Number }
  })
  t.match(result.request_id, UUID)
})

t.test('text format (the default) prints only the answer', async (t) => {
  const a = agent(t)
  for (const args of [['-p'], ['-p', '--output-format', 'text'], ['--print']]) {
    const r = await a.exec(args, { input: 'plain' })
    t.equal(r.code, 0)
    t.equal(r.stdout, 'Answer 1: you asked "plain"\n', args.join(' '))
  }
})

t.test('prompt: stdin beats positional words; flags on stdin are text', async (t) => {
  const a = agent(t)
  t.equal((await a.exec(['-p', 'from', 'argv'], { input: 'from stdin' })).stdout, 'Answer 1: you asked "from stdin"\n')
  t.equal((await a.exec(['-p', 'from', 'argv'], { input: ' \n' })).stdout, 'Answer 1: you asked "from argv"\n', 'blank stdin falls back to words')
  const v = await a.exec(['-p'], { input: '--version' })
  t.equal(v.code, 0)
  t.equal(v.stdout, 'Answer 1: you asked "--version"\n')
  const h = await a.exec(['-p', '--output-format', 'json'], { input: '--resume nope --model bad' })
  t.equal(h.code, 0)
  t.equal(JSON.parse(h.stdout).result, 'Answer 1: you asked "--resume nope --model bad"')
})

t.test('directives: show cwd, env and argv', async (t) => {
  const a = agent(t)
  const cwd = realpathSync(a.dir)
  const c = await a.exec(['-p'], { input: 'where [[show:cwd]]', cwd })
  t.equal(c.stdout, cwd + '\n')
  const e = await a.exec(['-p', '--output-format', 'json'], { input: '[[show:env]]', env: { SOME_VAR: 'some value' } })
  const env = JSON.parse(JSON.parse(e.stdout).result)
  t.equal(env.SOME_VAR, 'some value')
  t.equal(env.FAKE_AGENT_STATE_DIR, a.dir)
  const args = ['-p', '--output-format', 'json', '--model', 'gpt-5', '-f', '--workspace', cwd]
  const g = await a.exec(args, { input: 'args? [[show:argv]]' })
  t.same(JSON.parse(JSON.parse(g.stdout).result), args)
  const chat = await createChat(a)
  await a.exec(['-p', '--resume', chat], { input: 'x [[show:cwd]] y' })
  t.equal(await ask(a, 'history', chat), 'This chat has 1 earlier questions: x  y', 'directives are removed from the question')
})

t.test('usage errors: message on stderr, exit 1, nothing on stdout', async (t) => {
  const a = agent(t)
  const chat = await createChat(a)
  const cases: Array<{ name: string, args: string[], input?: string, env?: Record<string, string>, stderr: string | RegExp }> = [
    { name: '--output-format without -p', args: ['--output-format', 'json'], input: 'hi', stderr: 'Error: --output-format can only be used with --print\n' },
    { name: 'empty prompt', args: ['-p'], input: '', stderr: 'Error: No prompt provided\n' },
    { name: 'blank prompt', args: ['-p'], input: '  \n ', stderr: 'Error: No prompt provided\n' },
    { name: '--resume without id', args: ['-p', '--resume'], input: 'hi', stderr: /No previous chats found\./ },
    { name: '--resume unknown id', args: ['-p', '--resume', '00000000-0000-4000-8000-000000000000'], input: 'hi', stderr: 'Error: Chat 00000000-0000-4000-8000-000000000000 not found.\n' },
    { name: 'CURSOR_API_KEY=invalid', args: ['-p'], input: 'hi', env: { CURSOR_API_KEY: 'invalid' }, stderr: 'Warning: The provided API key is invalid.\n' },
    { name: '--api-key invalid', args: ['-p', '--api-key', 'invalid'], input: 'hi', stderr: 'Warning: The provided API key is invalid.\n' },
    { name: 'bad model', args: ['-p', '--model', 'gpt-9'], input: 'hi', stderr: `Cannot use this model: gpt-9. Available models: ${MODELS}\n` },
    { name: 'untrusted workspace', args: ['-p', '--resume', chat], input: 'hi', env: { FAKE_AGENT_REQUIRE_TRUST: '1' }, stderr: /Workspace Trust Required/ }
  ]
  const results = await Promise.all(cases.map((c) => a.exec(c.args, { input: c.input, env: c.env })))
  for (const [i, c] of cases.entries()) {
    const r = results[i]
    t.equal(r.code, 1, `${c.name}: exit 1`)
    t.equal(r.stdout, '', `${c.name}: no stdout`)
    if (typeof c.stderr === 'string') t.equal(r.stderr, c.stderr, `${c.name}: stderr`)
    else t.match(r.stderr, c.stderr, `${c.name}: stderr`)
  }
  await Promise.all(['--trust', '--force', '-f'].map(async (flag) => {
    const r = await a.exec(['-p', flag], { input: 'trusted', env: { FAKE_AGENT_REQUIRE_TRUST: '1' } })
    t.equal(r.code, 0, `${flag} passes the trust check`)
  }))
  await Promise.all(MODELS.split(', ').map(async (model) => {
    t.equal((await a.exec(['-p', '--model', model], { input: 'm' })).code, 0, `model ${model} accepted`)
  }))
  t.equal(await ask(a, 'history', chat), 'This chat has 0 earlier questions.', 'failed turns are not remembered')
})

t.test('failure faults, from FAKE_AGENT_FAULTS and from prompt directives', async (t) => {
  const a = agent(t)
  const chat = await createChat(a)
  const cases: Array<[string, string | RegExp]> = [
    ['not-logged-in', AUTH + '\n'],
    ['invalid-key', 'Warning: The provided API key is invalid.\n'],
    ['usage-limit', "Error: You've hit your usage limit. Upgrade to Pro for more usage.\n"],
    ['rate-limit', 'Error: Request failed with status 429: rate limit exceeded, try again later\n'],
    ['unknown-chat', `Error: Chat ${chat} not found.\n`],
    ['exit-1', 'Error: Something unexpected happened (code 17)\n']
  ]
  await Promise.all(cases.map(async ([fault, stderr]) => {
    const [viaEnv, viaPrompt] = await Promise.all([
      a.exec([...STREAM, '--resume', chat], { input: 'q', env: { FAKE_AGENT_FAULTS: fault } }),
      a.exec([...STREAM, '--resume', chat], { input: `q [[fault:${fault}]]` })
    ])
    for (const [how, r] of [['env', viaEnv], ['directive', viaPrompt]] as const) {
      t.equal(r.code, 1, `${fault} (${how}): exit 1`)
      t.equal(r.stdout, '', `${fault} (${how}): nothing on stdout`)
      t.equal(r.stderr, stderr, `${fault} (${how}): stderr`)
    }
  }))
  t.equal(await ask(a, 'history', chat), 'This chat has 0 earlier questions.')
})

t.test('create-chat honours FAKE_AGENT_FAULTS', async (t) => {
  const a = agent(t)
  const g = await a.exec(['create-chat'], { env: { FAKE_AGENT_FAULTS: 'create-chat-garbage' } })
  t.equal(g.code, 0)
  t.equal(g.stdout, 'not-a-uuid\n')
  const n = await a.exec(['create-chat'], { env: { FAKE_AGENT_FAULTS: 'not-logged-in' } })
  t.equal(n.code, 1)
  t.equal(n.stdout, '')
  t.equal(n.stderr, AUTH + '\n')
  const k = await a.exec(['create-chat'], { env: { CURSOR_API_KEY: 'invalid' } })
  t.equal(k.code, 1)
  t.equal(k.stdout, '')
})

t.test('late-stderr: exit 1, and the error text comes from a child once the main process has gone', async (t) => {
  const a = agent(t)
  const r = a.run(['-p'], { input: 'q [[fault:late-stderr]]' })
  const exit = await within(r.exited, 'main to exit')
  t.same(exit, { code: 1, signal: null })
  // The child writes as soon as the main process's end of fd 3 closes, which
  // happens during its exit, before the exit is reported to us: whether this
  // process reads the text before or after the exit event is the scheduler's
  // call. The service must (and does: agent-faults) get it either way.
  const late = a.pids().find((p) => p.role === 'late-stderr')
  t.ok(late, 'the child is in pids.log')
  await within(r.closed, 'stderr to close')
  t.equal(r.err(), AUTH + '\n')
  t.equal(r.out(), '')
})

t.test('crash-mid-stream: one assistant event, no result, exit 1', async (t) => {
  const a = agent(t)
  const r = await a.exec(STREAM, { input: 'q [[fault:crash-mid-stream]]' })
  t.equal(r.code, 1)
  t.same(parseEvents(r.stdout).map((e) => e.type), ['system', 'user', 'assistant'])
  t.equal(r.stderr, 'Error: Connection lost\n')
})

t.test('garbage: noise between events, the answer survives', async (t) => {
  const a = agent(t)
  const r = await a.exec(STREAM, { input: 'q', env: { FAKE_AGENT_FAULTS: 'garbage' } })
  t.equal(r.code, 0)
  const lines = r.stdout.split('\n').slice(0, -1)
  t.ok(lines.some((l) => l.trim() === ''), 'blank lines')
  t.ok(lines.some((l) => l.trim() !== '' && !l.startsWith('{')), 'non-JSON lines')
  const events = parseEvents(r.stdout)
  const known = ['system', 'user', 'thinking', 'tool_call', 'assistant', 'result']
  t.ok(events.some((e) => !known.includes(e.type)), 'unknown event types')
  const ordered = events.filter((e) => known.includes(e.type))
  t.equal(ordered[0].type, 'system')
  t.equal(ordered[1].type, 'user')
  t.equal(events[events.length - 1].type, 'result', 'the result is last')
  const text = ordered.filter((e) => e.type === 'assistant').map((e) => e.message.content[0].text).join('')
  t.equal(text, 'Answer 1: you asked "q"')
  t.equal(events[events.length - 1].result, text)
})

t.test('big=BYTES: a large answer in every format', async (t) => {
  const a = agent(t)
  const size = 300_000
  const s = await a.exec(STREAM, { input: `q [[fault:big=${size}]]` })
  t.equal(s.code, 0)
  const events = parseEvents(s.stdout)
  const result = events.find((e) => e.type === 'result').result as string
  t.equal(result.length, size)
  t.ok(result.startsWith('BIG-START') && result.endsWith('BIG-END'))
  t.equal(events.filter((e) => e.type === 'assistant').map((e) => e.message.content[0].text).join(''), result)
  const x = await a.exec(['-p'], { input: 'q', env: { FAKE_AGENT_FAULTS: `big=${size}` } })
  t.equal(x.stdout, result + '\n')
})

t.test('stderr-flood=BYTES: noise on stderr, normal answer', async (t) => {
  const a = agent(t)
  const r = await a.exec(['-p'], { input: 'q [[fault:stderr-flood=200000]]' })
  t.equal(r.code, 0)
  t.ok(r.stderr.length >= 200_000, `stderr has ${r.stderr.length} chars`)
  t.equal(r.stdout, 'Answer 1: you asked "q"\n')
})

t.test('slow=MS: thinking deltas while waiting', async (t) => {
  const a = agent(t)
  const started = Date.now()
  const r = await a.exec(STREAM, { input: 'q [[fault:slow=600]]' })
  t.ok(Date.now() - started >= 550, 'took at least the delay')
  t.equal(r.code, 0)
  const deltas = parseEvents(r.stdout).filter((e) => e.type === 'thinking' && e.subtype === 'delta')
  // One before the delay, then one per 100 ms of it, however late the timers fire.
  t.equal(deltas.length, 1 + 6, `${deltas.length} thinking deltas`)
  t.equal(parseEvents(r.stdout).pop().result, 'Answer 1: you asked "q"')
})

t.test('grandchild: a child in the same group outlives the main process', async (t) => {
  const a = agent(t)
  const r = await a.exec(['-p'], { input: 'q [[fault:grandchild]]' })
  t.equal(r.code, 0)
  t.equal(r.stdout, 'Answer 1: you asked "q"\n')
  const logged = a.pids()
  t.match(logged, [{ pid: r.pid, role: 'main' }, { role: 'grandchild' }])
  const gc = logged[1].pid
  everyPid.add(gc)
  await sleep(200)
  t.ok(isAlive(gc), 'the grandchild is still running')
  t.equal(pgidOf(gc), r.pid, 'it is in the main process group')
})

t.test('worker-server: stdout stays open after the main process exits', async (t) => {
  const a = agent(t)
  const r = a.run(STREAM, { input: 'q', env: { FAKE_AGENT_FAULTS: 'worker-server' } })
  const exit = await within(r.exited, 'main to exit')
  t.same(exit, { code: 0, signal: null })
  await waitFor(() => r.events().some((e) => e.type === 'result'), 'the result line')
  const worker = a.pids().find((p) => p.role === 'worker-server')
  t.ok(worker, 'worker-server in pids.log')
  everyPid.add(worker!.pid)
  await sleep(600)
  t.notOk(r.isClosed(), 'pipes still open 600 ms after exit')
  t.ok(isAlive(worker!.pid), 'worker-server still running')
  t.equal(pgidOf(worker!.pid), r.pid)
  process.kill(-r.pid, 'SIGKILL')
  await within(r.closed, 'pipes to close once the group is killed')
  t.pass('pipes closed after the group was killed')
})

t.test('hang-after-result: prints the result and stays alive', async (t) => {
  const a = agent(t)
  const chat = await createChat(a)
  const r = a.run([...STREAM, '--resume', chat], { input: 'q [[fault:hang-after-result]]' })
  await waitFor(() => r.events().some((e) => e.type === 'result'), 'the result line')
  t.equal(r.events().pop().result, 'Answer 1: you asked "q"')
  await sleep(600)
  t.equal(r.child.exitCode, null, 'still running after its result')
  t.ok(isAlive(r.pid))
  t.equal(await ask(a, 'history', chat), 'This chat has 1 earlier questions: q', 'the turn was recorded')
  process.kill(-r.pid, 'SIGTERM')
  t.same(await within(r.exited, 'exit on SIGTERM'), { code: null, signal: 'SIGTERM' })
})

t.test('stall: init and user, then silence', async (t) => {
  const a = agent(t)
  const r = a.run(STREAM, { input: 'q', env: { FAKE_AGENT_FAULTS: 'stall' } })
  await waitFor(() => r.events().length >= 2, 'init and user events')
  await sleep(600)
  t.same(r.events().map((e) => e.type), ['system', 'user'])
  t.equal(r.child.exitCode, null, 'still running')
  process.kill(-r.pid, 'SIGTERM')
  t.same(await within(r.exited, 'exit on SIGTERM'), { code: null, signal: 'SIGTERM' })
})

t.test('ignore-sigterm: main and children survive SIGTERM, SIGKILL ends them', async (t) => {
  const a = agent(t)
  const r = a.run(STREAM, { input: 'q [[fault:grandchild]]', env: { FAKE_AGENT_FAULTS: 'ignore-sigterm,stall' } })
  await waitFor(() => r.events().length >= 2, 'init and user events')
  const gc = a.pids().find((p) => p.role === 'grandchild')
  t.ok(gc, 'grandchild in pids.log')
  everyPid.add(gc!.pid)
  process.kill(-r.pid, 'SIGTERM')
  await sleep(600)
  t.equal(r.child.exitCode, null, 'main survived SIGTERM')
  t.ok(isAlive(gc!.pid), 'grandchild survived SIGTERM')
  process.kill(-r.pid, 'SIGKILL')
  t.same(await within(r.exited, 'exit on SIGKILL'), { code: null, signal: 'SIGKILL' })
  await waitFor(() => !isAlive(gc!.pid), 'grandchild to die')
  t.pass('grandchild gone')

  const ok = await a.exec(['-p'], { input: 'still answers', env: { FAKE_AGENT_FAULTS: 'ignore-sigterm' } })
  t.equal(ok.code, 0, 'without a hang fault it answers and exits')
  t.equal(ok.stdout, 'Answer 1: you asked "still answers"\n')
})

t.test('pid log: one "<pid> <role>" line per process', async (t) => {
  const a = agent(t)
  await a.exec(['--version'])
  await a.exec(['create-chat'], { env: { FAKE_AGENT_FAULTS: 'grandchild' } })
  const w = a.run(['-p'], { input: 'q', env: { FAKE_AGENT_FAULTS: 'worker-server' } })
  await within(w.exited, 'main to exit') // the worker keeps the pipes open
  const text = readFileSync(join(a.dir, 'pids.log'), 'utf8')
  t.match(text, /^(\d+ (main|grandchild|worker-server|late-stderr)\n)+$/)
  t.same(a.pids().map((p) => p.role), ['main', 'main', 'grandchild', 'main', 'worker-server'])
})

t.test('no process left behind', async (t) => {
  t.ok(everyPid.size > 30, `${everyPid.size} pids tracked`)
  await waitFor(() => [...everyPid].every((pid) => !isAlive(pid)), 'every tracked process to be gone')
  t.same([...everyPid].filter(isAlive), [], 'all gone')
})
