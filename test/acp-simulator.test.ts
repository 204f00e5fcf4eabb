// Drives test/fixtures/fake-acp-agent.mjs directly over stdio: the ACP driver's
// tests trust every fault of it to do what it says, so each one is proven here
// (a fault that silently did nothing would make those tests meaningless).
// Mostly through a raw JSON-lines harness (to see and break the wire), and
// through the official SDK (bench/acp-direct-client.ts) to show the driver's
// library gets along with it. Every process a test starts, the simulator's
// grandchildren included (read from its pids.log), is SIGKILLed in that test's
// teardown; the last test checks they are all gone.

import t, { type Test } from 'tap'
import { spawn, type ChildProcess } from 'node:child_process'
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { DirectAcpClient, textOf } from '../bench/acp-direct-client.js'

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any

const FAKE = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/
// Generous: these only bound how long a broken simulator makes a test hang
// (Node.js alone can take 5 s to start on a loaded machine).
const WAIT = 120_000

const everyPid = new Set<number>()
const sleep = (ms: number): Promise<void> => new Promise((resolve) => setTimeout(resolve, ms))

function procStat (pid: number): { state: string, pgid: number } | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8')
    const rest = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return { state: rest[0], pgid: Number(rest[2]) }
  } catch {
    return null
  }
}

/** Alive = in /proc and not a zombie. */
function isAlive (pid: number): boolean {
  const s = procStat(pid)
  return s !== null && s.state !== 'Z' && s.state !== 'X'
}

async function waitFor (cond: () => boolean, what: string, ms = WAIT): Promise<void> {
  const deadline = Date.now() + ms
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`)
    await sleep(10)
  }
}

async function within<T> (p: Promise<T>, what: string, ms = WAIT): Promise<T> {
  let timer: NodeJS.Timeout | undefined
  try {
    return await Promise.race([p, new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms)
    })])
  } finally {
    clearTimeout(timer)
  }
}

/** Resolves 'pending' if p has not settled after ms: for "nothing happens" checks (a slow machine cannot fake a pass). */
async function stillPending (p: Promise<unknown>, ms = 400): Promise<string> {
  return await Promise.race([p.then(() => 'settled', () => 'settled'), sleep(ms).then(() => 'pending')])
}

function baseEnv (): Record<string, string> {
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries(process.env)) {
    if (v === undefined || k.startsWith('FAKE_') || k === 'NODE_OPTIONS' || k.startsWith('_TAPJS_') || k.startsWith('TAP_')) continue
    env[k] = v
  }
  return env
}

type Responder = (msg: Json) => Json | undefined | Promise<Json | undefined>

interface Sim {
  child: ChildProcess
  pid: number
  dir: string
  /** Every stdout line, raw, in order. */
  lines: string[]
  /** Every stdout line that parsed as JSON, in order. */
  messages: Json[]
  stderr: () => string
  exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }>
  send: (msg: Json) => void
  request: (method: string, params?: Json) => Promise<Json>
  notify: (method: string, params?: Json) => void
  /** How to answer the agent's requests: return {result} or {error}; undefined leaves it unanswered. */
  respondWith: (fn: Responder) => void
  /** Resolves with the first message (from index `from`) that matches. */
  waitForMessage: (pred: (m: Json) => boolean, what: string, from?: number) => Promise<Json>
  updates: (sessionId?: string) => Json[]
  pids: () => Array<{ pid: number, role: string }>
  calls: () => string[]
}

interface SimHost {
  dir: string
  start: (faults?: string, extraEnv?: Record<string, string>) => Sim
  /** initialize + session/new; returns the session id. */
  open: (sim: Sim) => Promise<string>
}

/** A state dir shared by the simulators a test starts (so one can load another's session), and their teardown. */
function host (t: Test): SimHost {
  const dir = mkdtempSync(join(tmpdir(), 'fake-acp-test-'))
  const sims: Sim[] = []
  const readPids = (): Array<{ pid: number, role: string }> => {
    const file = join(dir, 'pids.log')
    if (!existsSync(file)) return []
    return readFileSync(file, 'utf8').split('\n').filter(Boolean).map((line) => {
      const [pid, role] = line.split(' ')
      return { pid: Number(pid), role }
    })
  }

  const start = (faults = '', extraEnv: Record<string, string> = {}): Sim => {
    const child = spawn(process.execPath, [FAKE], {
      detached: true,
      stdio: ['pipe', 'pipe', 'pipe'],
      cwd: dir,
      env: { ...baseEnv(), FAKE_AGENT_STATE_DIR: dir, FAKE_ACP_FAULTS: faults, ...extraEnv }
    })
    if (child.pid === undefined) throw new Error('spawn failed')
    everyPid.add(child.pid)
    const lines: string[] = []
    const messages: Json[] = []
    let stderr = ''
    let buf = ''
    let nextId = 1
    const waiting = new Map<number, (m: Json) => void>()
    const watchers = new Set<() => void>()
    let responder: Responder = () => undefined
    const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })))
    const send = (msg: Json): void => { child.stdin!.write(JSON.stringify({ jsonrpc: '2.0', ...msg }) + '\n') }
    child.stdin!.on('error', () => {})
    child.stderr!.setEncoding('utf8').on('data', (d: string) => { stderr += d })
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d
      let nl
      while ((nl = buf.indexOf('\n')) !== -1) {
        const line = buf.slice(0, nl)
        buf = buf.slice(nl + 1)
        lines.push(line)
        let msg: Json
        try { msg = JSON.parse(line) } catch { continue }
        if (msg === null || typeof msg !== 'object') continue
        messages.push(msg)
        if (msg.method !== undefined && msg.id !== undefined) {
          Promise.resolve(responder(msg)).then((answer) => { if (answer !== undefined) send({ id: msg.id, ...answer }) }, () => {})
        } else if (msg.method === undefined && waiting.has(msg.id)) {
          waiting.get(msg.id)!(msg)
          waiting.delete(msg.id)
        }
        for (const w of watchers) w()
      }
    })
    const sim: Sim = {
      child,
      pid: child.pid,
      dir,
      lines,
      messages,
      stderr: () => stderr,
      exited,
      send,
      request: async (method, params = {}) => {
        const id = nextId++
        const answer = new Promise<Json>((resolve) => waiting.set(id, resolve))
        send({ id, method, params })
        return await within(answer, `answer to ${method}`)
      },
      notify: (method, params = {}) => send({ method, params }),
      respondWith: (fn) => { responder = fn },
      waitForMessage: async (pred, what, from = 0) => {
        const find = (): Json => messages.slice(from).find(pred)
        if (find() !== undefined) return find()
        return await within(new Promise<Json>((resolve) => {
          const w = (): void => { const m = find(); if (m !== undefined) { watchers.delete(w); resolve(m) } }
          watchers.add(w)
        }), what)
      },
      updates: (sessionId) => messages.filter((m) => m.method === 'session/update' && (sessionId === undefined || m.params.sessionId === sessionId)).map((m) => m.params.update),
      pids: readPids,
      calls: () => existsSync(join(dir, 'calls.log')) ? readFileSync(join(dir, 'calls.log'), 'utf8').split('\n').filter(Boolean) : []
    }
    sims.push(sim)
    return sim
  }

  const open = async (sim: Sim): Promise<string> => {
    const init = await sim.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
    if (init.error) throw new Error(`initialize failed: ${JSON.stringify(init.error)}`)
    const res = await sim.request('session/new', { cwd: dir, mcpServers: [] })
    if (res.error) throw new Error(`session/new failed: ${JSON.stringify(res.error)}`)
    return res.result.sessionId
  }

  t.teardown(async () => {
    const all = new Set<number>()
    for (const s of sims) {
      all.add(s.pid)
      try { process.kill(-s.pid, 'SIGKILL') } catch {}
    }
    for (const { pid } of readPids()) {
      all.add(pid)
      everyPid.add(pid)
      try {
        if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes('fake-acp-agent')) process.kill(pid, 'SIGKILL')
      } catch {}
    }
    await waitFor(() => [...all].every((pid) => !isAlive(pid)), 'every process to die')
    for (const s of sims) {
      s.child.stdout!.destroy()
      s.child.stderr!.destroy()
      s.child.stdin!.destroy()
    }
    rmSync(dir, { recursive: true, force: true })
  })
  return { dir, start, open }
}

const prompt = async (sim: Sim, sessionId: string, text: string): Promise<Json> =>
  await sim.request('session/prompt', { sessionId, prompt: [{ type: 'text', text }] })

const answerText = (sim: Sim, sessionId: string, from = 0): string =>
  sim.messages.slice(from).filter((m) => m.method === 'session/update' && m.params.sessionId === sessionId && m.params.update.sessionUpdate === 'agent_message_chunk')
    .map((m) => m.params.update.content.text).join('')

// ---------------------------------------------------------------------------

t.test('initialize, session/new, a full turn: every kind of update, a deterministic answer that knows the earlier turns', async (t) => {
  const h = host(t)
  const sim = h.start()
  const init = await sim.request('initialize', { protocolVersion: 1, clientCapabilities: { fs: { readTextFile: false, writeTextFile: false }, terminal: false } })
  t.equal(init.result.protocolVersion, 1)
  t.same(init.result.agentInfo, { name: 'fake-acp-agent', title: 'Fake ACP agent', version: '1.0.0-fake' })
  t.equal(init.result.agentCapabilities.loadSession, true)
  t.same(init.result.agentCapabilities.sessionCapabilities, { resume: {}, close: {} })
  t.same(init.result.authMethods.map((m: Json) => m.id), ['fake-login', 'fake-api-key'])

  const bad = await sim.request('session/new', { cwd: 'relative/dir', mcpServers: [] })
  t.equal(bad.error.code, -32602, 'cwd must be absolute')
  const created = await sim.request('session/new', { cwd: h.dir, mcpServers: [] })
  const sid = created.result.sessionId
  t.match(sid, UUID)
  t.same(JSON.parse(readFileSync(join(h.dir, 'sessions', `${sid}.json`), 'utf8')).turns, [], 'stored under the state dir')

  const from = sim.messages.length
  const r1 = await prompt(sim, sid, 'What is up? [[fault:slow=1]]')
  t.same(r1.result, { stopReason: 'end_turn' })
  const kinds = sim.messages.slice(from).filter((m) => m.method === 'session/update').map((m) => m.params.update.sessionUpdate)
  t.same(kinds.filter((k, i) => k !== kinds[i - 1]), ['agent_thought_chunk', 'plan', 'tool_call', 'tool_call_update', 'agent_message_chunk', 'usage_update'])
  t.same(sim.updates(sid).filter((u) => u.sessionUpdate === 'tool_call_update').map((u) => u.status), ['in_progress', 'completed'])
  t.ok(kinds.filter((k) => k === 'agent_message_chunk').length >= 3, 'the answer comes in several chunks')
  t.equal(answerText(sim, sid, from), 'Answer 1 to "What is up?": no earlier turns.', 'the directive is removed from the echo')
  t.ok(sim.messages.slice(0, sim.messages.indexOf(r1)).some((m) => m.params?.update?.sessionUpdate === 'usage_update'), 'every update before the answer')

  const from2 = sim.messages.length
  t.same((await prompt(sim, sid, 'And now?')).result, { stopReason: 'end_turn' })
  t.equal(answerText(sim, sid, from2), 'Answer 2 to "And now?": 1 earlier turn, previous question "What is up?".')
  const from3 = sim.messages.length
  await prompt(sim, sid, 'Third')
  t.equal(answerText(sim, sid, from3), 'Answer 3 to "Third": 2 earlier turns, previous question "And now?".')

  t.same((await prompt(sim, 'no-such-session', 'x')).error.code, -32002, 'prompt on an unknown session: resource not found')
  const unknown = await sim.request('session/set_mode', { sessionId: sid, modeId: 'plan' })
  t.equal(unknown.error.code, -32601, 'unknown method -> -32601')
  sim.notify('some/notification', {})
  t.same((await sim.request('nope/nothing')).error.code, -32601, 'an unknown notification was ignored; the agent still answers')

  t.same(sim.pids(), [{ pid: sim.pid, role: 'main' }], 'pid log: "<pid> main"')
  t.same(sim.calls().slice(0, 4), [`${sim.pid} initialize -`, `${sim.pid} session/new -`, `${sim.pid} session/new -`, `${sim.pid} session/prompt ${sid}`])
})

t.test('session/load in a new process replays the history before answering, then answers with context; resume and close', async (t) => {
  const h = host(t)
  const a = h.start()
  const sid = await h.open(a)
  await prompt(a, sid, 'first question')
  await prompt(a, sid, 'second question')
  a.child.stdin!.end()
  t.same(await within(a.exited, 'exit on stdin EOF'), { code: 0, signal: null }, 'by default stdin EOF ends the agent (like gemini-cli)')

  const b = h.start()
  await b.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  t.equal((await prompt(b, sid, 'too early')).error.code, -32002, 'a session is not active in a new process before load')
  const from = b.messages.length
  const loaded = await b.request('session/load', { sessionId: sid, cwd: h.dir, mcpServers: [] })
  t.same(loaded.result, {})
  const answerAt = b.messages.indexOf(loaded)
  const replay = b.messages.slice(from, answerAt).filter((m) => m.method === 'session/update').map((m) => [m.params.update.sessionUpdate, m.params.update.content.text])
  t.same(replay, [
    ['user_message_chunk', 'first question'],
    ['agent_message_chunk', 'Answer 1 to "first question": no earlier turns.'],
    ['user_message_chunk', 'second question'],
    ['agent_message_chunk', 'Answer 2 to "second question": 1 earlier turn, previous question "first question".']
  ], 'the whole history, before the answer')
  const from2 = b.messages.length
  await prompt(b, sid, 'after the load')
  t.equal(answerText(b, sid, from2), 'Answer 3 to "after the load": 2 earlier turns, previous question "second question".')
  t.equal((await b.request('session/load', { sessionId: 'f00', cwd: h.dir, mcpServers: [] })).error.code, -32002, 'unknown session: -32002')

  const c = h.start()
  await c.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  const n = c.messages.length
  t.same((await c.request('session/resume', { sessionId: sid, cwd: h.dir, mcpServers: [] })).result, {})
  t.equal(c.messages.slice(n).filter((m) => m.method === 'session/update').length, 0, 'resume replays nothing')
  const from3 = c.messages.length
  await prompt(c, sid, 'after resume')
  t.match(answerText(c, sid, from3), /^Answer 4 to "after resume": 3 earlier turns/)
  t.same((await c.request('session/close', { sessionId: sid })).result, {})
  t.equal((await prompt(c, sid, 'closed?')).error.code, -32002, 'a closed session takes no prompt')
  t.ok(existsSync(join(h.dir, 'sessions', `${sid}.json`)), 'close keeps the stored history (a later load still works)')
  t.ok(c.calls().includes(`${c.pid} session/close ${sid}`), 'calls.log records session/close')
})

t.test('session/cancel: the prompt answers "cancelled" at once with the chunks already sent; the turn is not stored', async (t) => {
  const h = host(t)
  const sim = h.start()
  const sid = await h.open(sim)
  // slow=60000: without the cancel this turn would take minutes.
  const pending = prompt(sim, sid, 'cancel me [[fault:slow=60000]]')
  t.equal(await stillPending(pending, 200), 'pending')
  sim.notify('session/cancel', { sessionId: sid })
  t.same((await pending).result, { stopReason: 'cancelled' })

  // Cancel after the first text chunk: that chunk stays, nothing follows the answer.
  const from = sim.messages.length
  // Half a second before every update: the cancel has a second and a half (three more chunks) to arrive.
  const p2 = prompt(sim, sid, 'partial [[fault:slow=500]]')
  await sim.waitForMessage((m) => m.params?.update?.sessionUpdate === 'agent_message_chunk', 'a first text chunk', from)
  sim.notify('session/cancel', { sessionId: sid })
  const r2 = await p2
  t.same(r2.result, { stopReason: 'cancelled' })
  const text = answerText(sim, sid, from)
  t.ok(text.length > 0 && 'Answer 1 to "partial": no earlier turns.'.startsWith(text) && text !== 'Answer 1 to "partial": no earlier turns.', `partial text kept: ${JSON.stringify(text)}`)
  await sleep(300)
  t.equal(sim.messages.slice(sim.messages.indexOf(r2) + 1).length, 0, 'nothing after the cancelled answer')

  const from3 = sim.messages.length
  await prompt(sim, sid, 'next')
  t.equal(answerText(sim, sid, from3), 'Answer 1 to "next": no earlier turns.', 'cancelled turns are not stored')
})

t.test('hang-on-prompt never answers by itself; a cancel ends it; with ignore-cancel nothing does', async (t) => {
  const h = host(t)
  const sim = h.start()
  const sid = await h.open(sim)
  const from = sim.messages.length
  const p = prompt(sim, sid, 'hang [[fault:hang-on-prompt]]')
  await sim.waitForMessage((m) => m.params?.update?.sessionUpdate === 'agent_thought_chunk', 'the thought', from)
  t.equal(await stillPending(p, 500), 'pending', 'no answer')
  sim.notify('session/cancel', { sessionId: sid })
  t.same((await p).result, { stopReason: 'cancelled' })
  t.equal(answerText(sim, sid, from), '', 'no text')

  const stuck = h.start('hang-on-prompt,ignore-cancel')
  const sid2 = await h.open(stuck)
  const p2 = prompt(stuck, sid2, 'hang harder')
  await stuck.waitForMessage((m) => m.params?.update?.sessionUpdate === 'agent_thought_chunk', 'the thought')
  stuck.notify('session/cancel', { sessionId: sid2 })
  await waitFor(() => stuck.calls().includes(`${stuck.pid} session/cancel ${sid2}`), 'the cancel to arrive')
  t.equal(await stillPending(p2, 500), 'pending', 'the cancel arrived and changed nothing')
  t.ok(isAlive(stuck.pid))
})

t.test('ignore-cancel: the cancelled turn goes on to end_turn', async (t) => {
  const h = host(t)
  const sim = h.start('ignore-cancel')
  const sid = await h.open(sim)
  const from = sim.messages.length
  const p = prompt(sim, sid, 'carry on [[fault:slow=100]]')
  await sim.waitForMessage((m) => m.params?.update?.sessionUpdate === 'agent_thought_chunk', 'the thought', from)
  sim.notify('session/cancel', { sessionId: sid })
  t.same((await p).result, { stopReason: 'end_turn' })
  t.equal(answerText(sim, sid, from), 'Answer 1 to "carry on": no earlier turns.')
})

t.test('crash-mid-turn: one text chunk, then exit 1 without answering', async (t) => {
  const h = host(t)
  for (const how of ['env', 'directive']) {
    const sim = h.start(how === 'env' ? 'crash-mid-turn' : '')
    const sid = await h.open(sim)
    const from = sim.messages.length
    sim.send({ id: 99, method: 'session/prompt', params: { sessionId: sid, prompt: [{ type: 'text', text: how === 'env' ? 'boom' : 'boom [[fault:crash-mid-turn]]' }] } })
    t.same(await within(sim.exited, 'the crash'), { code: 1, signal: null }, how)
    const after = sim.messages.slice(from)
    t.equal(after.filter((m) => m.params?.update?.sessionUpdate === 'agent_message_chunk').length, 1, 'exactly one text chunk')
    t.notOk(after.some((m) => m.id === 99), 'the prompt never answered')
    t.match(sim.stderr(), /crashed mid-turn/)
  }
})

t.test('die-between-turns: exits 1 right after an answer; =MS: after MS ms idle, never during a turn', async (t) => {
  const h = host(t)
  const sim = h.start('die-between-turns')
  const sid = await h.open(sim)
  t.same((await prompt(sim, sid, 'last words')).result, { stopReason: 'end_turn' })
  t.same(await within(sim.exited, 'death after the turn'), { code: 1, signal: null })
  t.match(sim.stderr(), /died between turns/)
  t.equal(JSON.parse(readFileSync(join(h.dir, 'sessions', `${sid}.json`), 'utf8')).turns.length, 1, 'the turn was stored first (a load can resume it)')

  const d = h.start('', {})
  const sid2 = await h.open(d)
  t.same((await prompt(d, sid2, 'then die [[fault:die-between-turns]]')).result, { stopReason: 'end_turn' })
  t.same(await within(d.exited, 'death after the directive turn'), { code: 1, signal: null }, 'as a directive')

  const idle = h.start('die-between-turns=300')
  const sid3 = await h.open(idle)
  // A turn that outlasts the idle limit: slow=150 over ~8 steps.
  const started = Date.now()
  t.same((await prompt(idle, sid3, 'long turn [[fault:slow=150]]')).result, { stopReason: 'end_turn' }, 'no death during a turn')
  t.ok(Date.now() - started > 300, 'the turn took longer than the idle limit')
  t.same(await within(idle.exited, 'idle death'), { code: 1, signal: null })
  // Measured by the simulator from its answer to its exit: our own clock sees both late on a busy machine.
  const idleFor = Number(/died after 300 ms idle \(die-between-turns; idle for (\d+) ms\)/.exec(idle.stderr())?.[1])
  // (Timers count whole milliseconds of the loop's clock: 1 ms of slack.)
  t.ok(idleFor >= 299, `died only after the idle time (${idleFor} ms)`)
})

t.test('ask-permission: asks with allow_once / allow_always / reject_once, waits, and names the outcome', async (t) => {
  const h = host(t)
  const outcomes: Array<[Json, string, string]> = [
    [{ result: { outcome: { outcome: 'selected', optionId: 'allow-once' } } }, 'Permission: selected allow-once.', 'completed'],
    [{ result: { outcome: { outcome: 'selected', optionId: 'reject-once' } } }, 'Permission: selected reject-once.', 'failed'],
    [{ result: { outcome: { outcome: 'cancelled' } } }, 'Permission: cancelled.', 'failed'],
    [{ error: { code: -32601, message: 'Method not found' } }, 'Permission: error -32601.', 'failed']
  ]
  const sim = h.start('ask-permission')
  const sid = await h.open(sim)
  for (const [reply, note, status] of outcomes) {
    let release: () => void = () => {}
    const gate = new Promise<void>((resolve) => { release = resolve })
    const asked: Json[] = []
    sim.respondWith(async (msg) => { asked.push(msg); await gate; return reply })
    const from = sim.messages.length
    const p = prompt(sim, sid, 'may I?')
    await waitFor(() => asked.length === 1, 'the permission request')
    t.equal(asked[0].method, 'session/request_permission')
    t.same(asked[0].params.options.map((o: Json) => [o.optionId, o.kind]), [['allow-once', 'allow_once'], ['allow-always', 'allow_always'], ['reject-once', 'reject_once']])
    t.equal(asked[0].params.toolCall.toolCallId, 'call_2')
    t.equal(await stillPending(p, 300), 'pending', 'the turn waits for the answer')
    release()
    t.same((await p).result, { stopReason: 'end_turn' })
    t.ok(answerText(sim, sid, from).endsWith(' ' + note), note)
    t.equal(sim.updates(sid).filter((u) => u.toolCallId === 'call_2' && u.sessionUpdate === 'tool_call_update').at(-1).status, status)
  }
  t.ok(sim.calls().includes(`${sim.pid} reply:session/request_permission ok`))
  t.ok(sim.calls().includes(`${sim.pid} reply:session/request_permission error:-32601`))

  // A cancel while the question is open ends the turn.
  sim.respondWith(() => undefined)
  const p = prompt(sim, sid, 'may I, again?')
  await waitFor(() => sim.messages.filter((m) => m.method === 'session/request_permission').length === outcomes.length + 1, 'one more permission request')
  sim.notify('session/cancel', { sessionId: sid })
  t.same((await p).result, { stopReason: 'cancelled' })
})

t.test('cursor-requests: three blocking cursor/* requests, one after the other, each answer reported', async (t) => {
  const h = host(t)
  const sim = h.start()
  const sid = await h.open(sim)
  const seen: string[] = []
  const gates = new Map<string, () => void>()
  sim.respondWith(async (msg) => {
    seen.push(msg.method)
    await new Promise<void>((resolve) => gates.set(msg.method, resolve))
    return msg.method === 'cursor/update_todos' ? { error: { code: -32601, message: 'Method not found' } } : { result: {} }
  })
  const from = sim.messages.length
  const p = prompt(sim, sid, 'plan it [[fault:cursor-requests]]')
  for (const method of ['cursor/ask_question', 'cursor/create_plan', 'cursor/update_todos']) {
    await waitFor(() => gates.has(method), method)
    await sleep(100)
    t.equal(seen.at(-1), method, `${method} is the latest request: the next waits for its answer`)
    t.equal(await stillPending(p, 10), 'pending')
    gates.get(method)!()
  }
  t.same((await p).result, { stopReason: 'end_turn' })
  t.equal(answerText(sim, sid, from), 'Answer 1 to "plan it": no earlier turns. cursor/ask_question: answered; cursor/create_plan: answered; cursor/update_todos: error -32601.')
  t.same(sim.messages.filter((m) => m.method?.startsWith('cursor/')).map((m) => m.params.sessionId), [sid, sid, sid])
})

t.test('unknown-request: sends fake/unknown_method, waits for the answer, reports it', async (t) => {
  const h = host(t)
  const sim = h.start('unknown-request')
  const sid = await h.open(sim)
  let release: () => void = () => {}
  const gate = new Promise<void>((resolve) => { release = resolve })
  sim.respondWith(async (msg) => { await gate; return { error: { code: -32601, message: `Method not found: ${msg.method}` } } })
  const from = sim.messages.length
  const p = prompt(sim, sid, 'anything')
  await sim.waitForMessage((m) => m.method === 'fake/unknown_method', 'the unknown request')
  t.equal(await stillPending(p, 300), 'pending', 'stranded until answered')
  release()
  await p
  t.ok(answerText(sim, sid, from).endsWith(' Unknown request: error -32601.'))
})

t.test('slow=MS: MS ms before every update of the turn', async (t) => {
  const h = host(t)
  const sim = h.start('slow=120')
  const sid = await h.open(sim)
  const from = sim.messages.length
  const started = performance.now()
  await prompt(sim, sid, 'slowly')
  const elapsed = performance.now() - started
  const n = sim.messages.slice(from).filter((m) => m.method === 'session/update').length
  // A lower bound only: a busy machine makes it longer, never shorter.
  t.ok(elapsed >= 120 * n - 50, `${n} updates took ${Math.round(elapsed)} ms`)
})

t.test('no-load-session: loadSession false, no resume; session/load and session/resume are -32601', async (t) => {
  const h = host(t)
  const a = h.start()
  const sid = await h.open(a)
  await prompt(a, sid, 'remember me')
  const sim = h.start('no-load-session')
  const init = await sim.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  t.equal(init.result.agentCapabilities.loadSession, false)
  t.same(init.result.agentCapabilities.sessionCapabilities, { close: {} })
  t.equal((await sim.request('session/load', { sessionId: sid, cwd: h.dir, mcpServers: [] })).error.code, -32601)
  t.equal((await sim.request('session/resume', { sessionId: sid, cwd: h.dir, mcpServers: [] })).error.code, -32601)
  t.equal(sim.updates().length, 0, 'nothing replayed')
})

t.test('require-auth: session/new and session/load fail with -32000 until authenticate succeeds; refuse-auth refuses', async (t) => {
  const h = host(t)
  const sim = h.start('require-auth')
  const init = await sim.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  t.same(init.result.authMethods.map((m: Json) => m.id), ['fake-login', 'fake-api-key'])
  const denied = await sim.request('session/new', { cwd: h.dir, mcpServers: [] })
  t.equal(denied.error.code, -32000, 'auth_required')
  t.equal((await sim.request('session/load', { sessionId: 'x', cwd: h.dir, mcpServers: [] })).error.code, -32000)
  t.equal((await sim.request('authenticate', { methodId: 'not-listed' })).error.code, -32602, 'an unlisted method is invalid')
  t.equal((await sim.request('session/new', { cwd: h.dir, mcpServers: [] })).error.code, -32000, 'still required')
  t.same((await sim.request('authenticate', { methodId: 'fake-api-key' })).result, {})
  t.match((await sim.request('session/new', { cwd: h.dir, mcpServers: [] })).result.sessionId, UUID)

  const refusing = h.start('require-auth,refuse-auth')
  await refusing.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  const refused = await refusing.request('authenticate', { methodId: 'fake-login' })
  t.equal(refused.error.code, -32000)
  t.match(refused.error.message, /refused/)
  t.equal((await refusing.request('session/new', { cwd: h.dir, mcpServers: [] })).error.code, -32000, 'still not authenticated')

  const open = h.start()
  await open.request('initialize', { protocolVersion: 1, clientCapabilities: {} })
  t.match((await open.request('session/new', { cwd: h.dir, mcpServers: [] })).result.sessionId, UUID, 'without require-auth no authenticate is needed')
})

t.test('garbage-stdout: non-JSON lines before the first answer and between updates; the turn still completes', async (t) => {
  const h = host(t)
  const sim = h.start('garbage-stdout')
  const sid = await h.open(sim)
  const firstJson = sim.lines.findIndex((l) => l.startsWith('{"jsonrpc"'))
  t.ok(firstJson > 0, 'garbage before the initialize answer')
  const before = sim.lines.length
  t.same((await prompt(sim, sid, 'through the noise')).result, { stopReason: 'end_turn' })
  const turnLines = sim.lines.slice(before)
  const garbage = turnLines.filter((l) => { try { const v = JSON.parse(l); return v === null || typeof v !== 'object' || v.jsonrpc !== '2.0' } catch { return true } })
  t.ok(garbage.length >= 5, `${garbage.length} garbage lines in the turn`)
  t.ok(garbage.some((l) => l === ''), 'an empty line')
  t.ok(garbage.some((l) => l === '42'), 'JSON that is not a message')
  t.ok(garbage.some((l) => l.startsWith('{') && (() => { try { JSON.parse(l); return false } catch { return true } })()), 'a broken JSON object')
  t.equal(answerText(sim, sid, 0), 'Answer 1 to "through the noise": no earlier turns.')
  // The SDK answers each bad line with a parse error (id null): the agent must shrug that off.
  sim.send({ id: null, error: { code: -32700, message: 'Parse error' } })
  t.same((await prompt(sim, sid, 'still fine')).result, { stopReason: 'end_turn' })
})

t.test('huge-line=BYTES: one update of about BYTES bytes on one line', async (t) => {
  const h = host(t)
  const sim = h.start()
  const sid = await h.open(sim)
  const before = sim.lines.length
  t.same((await prompt(sim, sid, 'big [[fault:huge-line=3000000]]')).result, { stopReason: 'end_turn' })
  const huge = sim.lines.slice(before).filter((l) => l.length > 1_000_000)
  t.equal(huge.length, 1)
  t.equal(huge[0].length + 1, 3_000_000, 'BYTES long, newline included')
  const msg = JSON.parse(huge[0])
  t.equal(msg.params.update.sessionUpdate, 'agent_thought_chunk')
  t.ok(/^HUGE-STARTx*HUGE-END$/.test(msg.params.update.content.text), 'one padded text')
})

t.test('exit-on-start: exits 1 before answering initialize', async (t) => {
  const h = host(t)
  const sim = h.start('exit-on-start')
  sim.send({ id: 1, method: 'initialize', params: { protocolVersion: 1, clientCapabilities: {} } })
  t.same(await within(sim.exited, 'exit'), { code: 1, signal: null })
  t.same(sim.lines, [], 'nothing on stdout')
  t.match(sim.stderr(), /failed to start/)
  t.same(sim.pids().map((p) => p.role), ['main'])
})

t.test('unknown faults: in the environment exit 2; as a directive the prompt fails -32602', async (t) => {
  const h = host(t)
  const bad = h.start('no-such-fault')
  t.same(await within(bad.exited, 'exit'), { code: 2, signal: null })
  t.match(bad.stderr(), /unknown fault "no-such-fault"/)

  const sim = h.start()
  const sid = await h.open(sim)
  t.equal((await prompt(sim, sid, '[[fault:what-is-this]] hi')).error.code, -32602)
  const processOnly = await prompt(sim, sid, '[[fault:require-auth]] hi')
  t.equal(processOnly.error.code, -32602)
  t.match(processOnly.error.message, /only works in FAKE_ACP_FAULTS/)
})

t.test('stderr-noise[=BYTES]: that much log on stderr at start and per turn', async (t) => {
  const h = host(t)
  const sim = h.start('stderr-noise=50000')
  const sid = await h.open(sim)
  await waitFor(() => sim.stderr().length >= 50000, 'start-up noise')
  await prompt(sim, sid, 'noisy')
  await waitFor(() => sim.stderr().length >= 100000, 'turn noise')
  t.match(sim.stderr(), /^\[noise\]/)

  const d = h.start()
  const sid2 = await h.open(d)
  await prompt(d, sid2, 'default size [[fault:stderr-noise]]')
  await waitFor(() => d.stderr().length >= 262144, 'the default 256 KiB')
  t.pass('default size written')
})

t.test('stdin EOF: exits 0 by default; ignore-stdin-eof stays alive', async (t) => {
  const h = host(t)
  const quits = h.start()
  await h.open(quits)
  quits.child.stdin!.end()
  t.same(await within(quits.exited, 'exit on EOF'), { code: 0, signal: null })

  const stays = h.start('ignore-stdin-eof')
  await h.open(stays)
  stays.child.stdin!.end()
  await waitFor(() => stays.calls().includes(`${stays.pid} stdin-eof -`), 'the agent to see EOF')
  t.equal(await stillPending(stays.exited, 500), 'pending', 'alive after EOF')
  t.ok(isAlive(stays.pid))
})

t.test('ignore-sigterm and grandchild: the group survives SIGTERM; SIGKILL to the group ends it', async (t) => {
  const h = host(t)
  const sim = h.start('grandchild,ignore-sigterm')
  await h.open(sim)
  const gc = sim.pids().find((p) => p.role === 'grandchild')
  t.ok(gc, 'grandchild logged')
  everyPid.add(gc!.pid)
  t.ok(isAlive(gc!.pid))
  t.equal(procStat(gc!.pid)!.pgid, sim.pid, 'in the agent\'s process group')
  process.kill(-sim.pid, 'SIGTERM')
  await waitFor(() => sim.calls().includes(`${sim.pid} sigterm-ignored -`), 'the SIGTERM to be received and ignored')
  t.equal(await stillPending(sim.exited, 300), 'pending', 'main survived SIGTERM')
  t.ok(isAlive(gc!.pid), 'grandchild survived SIGTERM')
  process.kill(-sim.pid, 'SIGKILL')
  t.same(await within(sim.exited, 'SIGKILL'), { code: null, signal: 'SIGKILL' })
  await waitFor(() => !isAlive(gc!.pid), 'grandchild to die')

  // Without ignore-sigterm, SIGTERM to the group ends both; a directive starts a grandchild mid-turn.
  const plain = h.start()
  const sid = await h.open(plain)
  await prompt(plain, sid, 'spawn one [[fault:grandchild]]')
  const gc2 = plain.pids().filter((p) => p.role === 'grandchild').find((p) => p.pid !== gc!.pid)
  t.ok(gc2, 'grandchild started by the directive')
  everyPid.add(gc2!.pid)
  t.equal(procStat(gc2!.pid)!.pgid, plain.pid)
  process.kill(-plain.pid, 'SIGTERM')
  t.same(await within(plain.exited, 'SIGTERM'), { code: null, signal: 'SIGTERM' })
  await waitFor(() => !isAlive(gc2!.pid), 'grandchild to die on SIGTERM')

  // ignore-sigterm as a directive.
  const late = h.start()
  const sid3 = await h.open(late)
  await prompt(late, sid3, 'harden [[fault:ignore-sigterm]]')
  process.kill(late.pid, 'SIGTERM')
  await waitFor(() => late.calls().includes(`${late.pid} sigterm-ignored -`), 'SIGTERM ignored')
  t.ok(isAlive(late.pid))
})

t.test('show directives: cwd, session cwd, env, argv, client capabilities', async (t) => {
  const h = host(t)
  const sim = h.start('', { SOME_SETTING: 'visible' })
  const caps = { fs: { readTextFile: false, writeTextFile: false }, terminal: false }
  await sim.request('initialize', { protocolVersion: 1, clientCapabilities: caps })
  const sub = join(h.dir, 'sessions')
  const sid = (await sim.request('session/new', { cwd: sub, mcpServers: [] })).result.sessionId
  const ask = async (text: string): Promise<string> => {
    const from = sim.messages.length
    await prompt(sim, sid, text)
    return answerText(sim, sid, from)
  }
  t.equal(await ask('[[show:cwd]]'), h.dir)
  t.equal(await ask('[[show:session-cwd]]'), sub)
  t.equal(JSON.parse(await ask('[[show:env]]')).SOME_SETTING, 'visible')
  t.same(JSON.parse(await ask('[[show:argv]]')), [])
  t.same(JSON.parse(await ask('[[show:client-capabilities]]')), caps)
})

t.test('through the official SDK (the driver\'s library): turns, load, permission, cursor/* and unknown requests', async (t) => {
  const h = host(t)
  const clients: DirectAcpClient[] = []
  t.teardown(async () => { for (const c of clients) await c.kill() })
  const env = { ...baseEnv(), FAKE_AGENT_STATE_DIR: h.dir }
  const start = async (faults: string, authMethod: string | null = null): Promise<DirectAcpClient> => {
    const c = await DirectAcpClient.start({ argv: [process.execPath, FAKE], env: { ...env, FAKE_ACP_FAULTS: faults }, cwd: h.dir, authMethod, permission: 'allow' })
    clients.push(c)
    everyPid.add(c.pid)
    return c
  }

  const a = await start('require-auth,garbage-stdout', 'fake-login')
  t.equal(a.initializeResponse?.agentInfo?.name, 'fake-acp-agent')
  const sid = await a.newSession()
  const r1 = await a.prompt(sid, 'one [[fault:ask-permission,cursor-requests,unknown-request]]')
  t.equal(r1.stopReason, 'end_turn')
  t.equal(r1.text, 'Answer 1 to "one": no earlier turns. Permission: selected allow-once. ' +
    'cursor/ask_question: error -32601; cursor/create_plan: error -32601; cursor/update_todos: error -32601. Unknown request: error -32601.')
  t.same(a.agentRequests.map((r) => r.method), ['session/request_permission', 'cursor/ask_question', 'cursor/create_plan', 'cursor/update_todos', 'fake/unknown_method'])
  t.same([...new Set(r1.updates.map((u) => u.sessionUpdate))], ['agent_thought_chunk', 'plan', 'tool_call', 'tool_call_update', 'agent_message_chunk', 'usage_update'])
  t.equal((await a.prompt(sid, 'two')).text, 'Answer 2 to "two": 1 earlier turn, previous question "one".')
  t.equal(await a.stop(), 'signalled')

  const b = await start('')
  const replay = await b.loadSession(sid)
  t.equal(textOf(replay, 'user_message_chunk'), 'onetwo')
  t.equal((await b.prompt(sid, 'three')).text, 'Answer 3 to "three": 2 earlier turns, previous question "two".')

  const pending = b.prompt(sid, 'slow [[fault:slow=60000]]')
  // The agent reads the cancel after the prompt (one pipe, in order): no need to wait for an update.
  await b.cancel(sid)
  t.equal((await pending).stopReason, 'cancelled')
  t.equal(await b.stop(), 'signalled')
})

t.test('no process left behind', async (t) => {
  t.ok(everyPid.size > 20, `${everyPid.size} pids tracked`)
  await waitFor(() => [...everyPid].every((pid) => !isAlive(pid)), 'every tracked process to be gone')
  t.same([...everyPid].filter(isAlive), [], 'all gone')
})
