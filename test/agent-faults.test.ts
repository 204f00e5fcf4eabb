// Each cursor-agent failure mode the simulator reproduces, driven through the
// real HTTP path with real processes: the client gets the right answer or
// JSON error, the session stays usable, and every recorded pid is gone.

import t from 'tap'
import { AGENT_CALL_TIMEOUT_MS, agentWrapper, ask, build, EVENT_TIMEOUT_MS, onlyTheseTurnsTimeOut, RUN_SIMULATOR, sandbox, sleep, startSession, waitForGone, type BuildOptions } from './helpers/index.js'

const KILL_GRACE_MS = 1000
// Elapsed-time claims ("gone within KILL_GRACE", "answered near ASK_TIMEOUT")
// get this much slack on top: room for a loaded machine, yet far from the
// failures they catch (a process left running, an answer held until the
// timeout of every other agent call, AGENT_CALL_TIMEOUT_MS).
const SLACK_MS = 9000

t.test('start fails cleanly, creating no session', async (t) => {
  const cases: Array<{ name: string, options: BuildOptions, status: number, code: string, details: RegExp }> = [
    { name: 'not logged in', options: { agentEnv: { FAKE_AGENT_FAULTS: 'not-logged-in' } }, status: 502, code: 'AGENT_NOT_AUTHENTICATED', details: /cursor-agent login.*CURSOR_API_KEY/ },
    { name: 'invalid key', options: { agentEnv: { CURSOR_API_KEY: 'invalid' } }, status: 502, code: 'AGENT_INVALID_API_KEY', details: /API key/ },
    { name: 'missing binary', options: { cursorAgentBin: '/nonexistent/cursor-agent' }, status: 502, code: 'PROCESS_SPAWN_FAILED', details: /^The agent program was not found: check CURSOR_AGENT_BIN on the server$/ },
    { name: 'no chat id printed', options: { agentEnv: { FAKE_AGENT_FAULTS: 'create-chat-garbage' } }, status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /chat id/ }
  ]
  for (const c of cases) {
    const box = sandbox(t)
    const app = await build(t, box, c.options)
    const res = await app.inject({ method: 'POST', url: '/api/session/start', headers: { 'content-type': 'application/json' } })
    t.equal(res.statusCode, c.status, `${c.name}: ${res.body}`)
    t.equal(res.json().error, c.code, c.name)
    t.match(res.json().details, c.details, c.name)
    t.same(app.agentSessions.counts(), { active: 0, busy: 0, starting: 0, closing: 0 }, `${c.name}: no session`)
    t.same(await waitForGone(box.pids().map((p) => p.pid)), [], `${c.name}: no process left`)
  }
})

t.test('a failed turn is classified from stderr and leaves the session usable', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const cases = [
    { fault: 'not-logged-in', status: 502, code: 'AGENT_NOT_AUTHENTICATED', details: /cursor-agent login/ },
    { fault: 'invalid-key', status: 502, code: 'AGENT_INVALID_API_KEY', details: /CURSOR_API_KEY/ },
    { fault: 'usage-limit', status: 429, code: 'AGENT_USAGE_LIMIT', details: /usage limit/ },
    { fault: 'rate-limit', status: 429, code: 'AGENT_RATE_LIMITED', details: /rate limit/ },
    { fault: 'unknown-chat', status: 502, code: 'AGENT_CHAT_NOT_FOUND', details: /chat/ },
    { fault: 'exit-1', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 1 without an answer; its error message is in the server log/ },
    { fault: 'crash-mid-stream', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 1 without an answer; its error message is in the server log/ },
    // The process exits before its stderr arrives (a child writes it right
    // after the exit): we still wait, briefly, for it.
    { fault: 'late-stderr', status: 502, code: 'AGENT_NOT_AUTHENTICATED', details: /cursor-agent login/ }
  ]
  for (const c of cases) {
    const res = await ask(app, id, `fail please [[fault:${c.fault}]]`)
    t.equal(res.statusCode, c.status, `${c.fault}: ${res.body}`)
    t.equal(res.json().error, c.code, c.fault)
    t.match(res.json().details, c.details, c.fault)
    if (c.status === 429) t.ok(res.headers['retry-after'], `${c.fault}: Retry-After`)
    const ok = await ask(app, id, `after ${c.fault}`)
    t.equal(ok.statusCode, 200, `${c.fault}: the session still answers`)
  }
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no process left')
})

t.test('an unknown model is reported as such', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { agentModel: 'gpt-0' })
  const id = await startSession(app)
  const res = await ask(app, id, 'hello')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'AGENT_UNKNOWN_MODEL')
  t.match(res.json().details, /does not know the configured model \(AGENT_MODEL\)/)
})

t.test('a turn that hangs after its result still answers; its processes go within KILL_GRACE', async (t) => {
  for (const faults of ['[[fault:hang-after-result]]', '[[fault:hang-after-result]] [[fault:ignore-sigterm]] [[fault:grandchild]]']) {
    const box = sandbox(t)
    const app = await build(t, box)
    const id = await startSession(app)
    const res = await ask(app, id, `hang ${faults}`)
    const answeredAt = Date.now()
    t.equal(res.statusCode, 200, faults)
    t.equal(res.json().answer, 'Answer 1: you asked "hang"')
    const turnPids = box.pids().map((p) => p.pid)
    t.same(await waitForGone(turnPids), [], `${faults}: all gone`)
    t.ok(Date.now() - answeredAt <= KILL_GRACE_MS + SLACK_MS, `${faults}: gone ${Date.now() - answeredAt} ms after the result (KILL_GRACE ${KILL_GRACE_MS} ms)`)
    const next = await ask(app, id, 'next')
    t.equal(next.statusCode, 200, 'the next turn runs once the hung one is gone')
  }
})

t.test('a stalled turn answers 504 near ASK_TIMEOUT and leaves no process, even ignoring SIGTERM with a grandchild', async (t) => {
  const box = sandbox(t)
  const askTimeoutMs = 1500
  // ASK_TIMEOUT is short for the stalled turn only: the turn after it has time (and starts have START_TIMEOUT).
  // The stall is the shell's: it ignores SIGTERM and has its grandchild within milliseconds
  // of the spawn, long before ASK_TIMEOUT, however busy the machine (Node.js can take seconds).
  const app = await build(t, box, {
    cursorAgentBin: misbehavingAgent(t),
    askTimeout: askTimeoutMs,
    wrapDriver: onlyTheseTurnsTimeOut((prompt) => prompt.startsWith('stall'))
  })
  const id = await startSession(app)
  const started = Date.now()
  const res = await ask(app, id, 'stall STALL-IGNORING-SIGTERM')
  const elapsed = Date.now() - started
  t.equal(res.statusCode, 504, res.body)
  t.equal(res.json().error, 'REQUEST_TIMEOUT')
  t.match(res.json().details, /1500ms/, 'the timeout is ASK_TIMEOUT')
  t.ok(elapsed >= askTimeoutMs - 100 && elapsed < askTimeoutMs + SLACK_MS, `answered after ${elapsed} ms (ASK_TIMEOUT ${askTimeoutMs} ms)`)
  const pids = box.pids()
  t.ok(pids.some((p) => p.role === 'grandchild'), 'the grandchild was started')
  t.same(await waitForGone(pids.map((p) => p.pid)), [], 'turn, grandchild all gone')
  t.equal((await ask(app, id, 'again')).statusCode, 200, 'the session still answers')
})

t.test('a worker-server child holding stdout open does not hold the answer, and is torn down', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  // The worker never exits by itself: an answer held until its pipes close would be a 504 at ASK_TIMEOUT.
  const res = await ask(app, id, 'with a worker [[fault:worker-server]]')
  t.equal(res.statusCode, 200)
  t.equal(res.json().answer, 'Answer 1: you asked "with a worker"')
  const worker = box.pids().find((p) => p.role === 'worker-server')
  t.ok(worker, 'a worker-server was started')
  t.same(await waitForGone([worker!.pid]), [], 'the worker is gone')
})

t.test('noisy, garbled and enormous output', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)

  const garbage = await ask(app, id, 'noise [[fault:garbage]]')
  t.equal(garbage.statusCode, 200)
  t.equal(garbage.json().answer, 'Answer 1: you asked "noise"', 'non-JSON lines and unknown events are ignored')

  const flood = await ask(app, id, 'flood [[fault:stderr-flood=2000000]]')
  t.equal(flood.statusCode, 200, 'a stderr flood does not block or fail the turn')

  const big = await ask(app, id, 'big [[fault:big=3000000]]')
  t.equal(big.statusCode, 200)
  const answer: string = big.json().answer
  t.equal(answer.length, 3_000_000)
  t.ok(answer.startsWith('BIG-START') && answer.endsWith('BIG-END'))
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [])
})

t.test('output past MAX_ANSWER_BYTES is cut off with a clear error', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxAnswerBytes: 100_000 })
  const id = await startSession(app)
  const res = await ask(app, id, 'big [[fault:big=500000]]')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'PROCESS_COMMUNICATION_FAILED')
  t.match(res.json().details, /100000 bytes/)
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [])
  t.equal((await ask(app, id, 'small')).statusCode, 200)
})

t.test('the agent binary disappearing after start-up fails the turn, not the server', async (t) => {
  const { bin, remove } = agentWrapper(t)
  const box = sandbox(t)
  const app = await build(t, box, { cursorAgentBin: bin })
  const id = await startSession(app)
  remove()
  const res = await ask(app, id, 'are you there?')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'PROCESS_SPAWN_FAILED')
  t.match(res.json().details, /CURSOR_AGENT_BIN/)
  t.equal((await app.inject({ method: 'GET', url: '/api/health' })).statusCode, 200)
})

// Misbehaviours the simulator has no switch for, played by a shell wrapper that
// answers some questions itself and hands every other call to the simulator.
// Its stall ignores SIGTERM and has a grandchild that does too, within
// milliseconds of the spawn (the simulator's takes two Node.js start-ups).
function misbehavingAgent (t: { after: (fn: () => unknown) => void }): string {
  return agentWrapper(t, `echo "$$ main" >> "$FAKE_AGENT_STATE_DIR/pids.log"
stall () {
  trap '' TERM
  (exec sleep 600) &
  echo "$! grandchild" >> "$FAKE_AGENT_STATE_DIR/pids.log"
  exec sleep 600
}
if [ "$1" = "create-chat" ]; then
  case "$WRAPPER_CREATE_CHAT" in
    silent) exit 0 ;;
    segv) kill -SEGV $$ ;;
    stall) stall ;;
  esac
  ${RUN_SIMULATOR}
fi
input=$(cat)
case "$input" in
  *PLAIN-ONLY*) printf 'Thinking about it...\\nThe answer is 42, in plain text.\\n'; exit 0 ;;
  *NO-RESULT*) printf '{"type":"system","subtype":"init"}\\n{"type":"assistant","message":{"role":"assistant","content":[{"type":"text","text":"half an answ"}]}}\\n'; exit 0 ;;
  *NO-TRAILING-NEWLINE*) printf '{"type":"result","subtype":"success","is_error":false,"result":"no newline at the end"}'; exit 0 ;;
  *FLOOD-NO-NEWLINE*) yes xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx | tr -d '\\n'; exit 0 ;;
  *KILLED-MID-STREAM*) printf '{"type":"system","subtype":"init"}\\n'; kill -KILL $$ ;;
  *STDERR-FLOOD-THEN-FAIL*) yes '[noise] worker: still alive' | head -c 5000000 >&2; printf 'Error: the last words\\n' >&2; exit 1 ;;
  *STDERR-ONE-LINE-THEN-FAIL*) head -c 5000000 /dev/zero | tr '\\0' 'e' >&2; printf '\\nError: the last words\\n' >&2; exit 1 ;;
  *STALL-IGNORING-SIGTERM*) stall ;;
esac
printf '%s' "$input" | ${RUN_SIMULATOR}`).bin
}

t.test('turns that end without a usable answer give a clear JSON error, leave no process and the session answers again', async (t) => {
  const { isGroupAlive } = await import('../lib/processes/terminate.js')
  const box = sandbox(t)
  const app = await build(t, box, { cursorAgentBin: misbehavingAgent(t), maxAnswerBytes: 1_000_000 })
  const id = await startSession(app)
  const cases: Array<{ marker: string, status: number, code: string, details: RegExp }> = [
    { marker: 'PLAIN-ONLY', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 0 without an answer or an error message/ },
    { marker: 'NO-RESULT', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 0 without an answer or an error message/ },
    // stdout that never ends a line must not grow without bound: MAX_ANSWER_BYTES cuts it off.
    { marker: 'FLOOD-NO-NEWLINE', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /more than 1000000 bytes/ },
    { marker: 'KILLED-MID-STREAM', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /killed by SIGKILL/ },
    // Megabytes of stderr: the reply says where its message went (the log; see test/privacy.test.ts), bounded.
    { marker: 'STDERR-FLOOD-THEN-FAIL', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 1 without an answer; its error message is in the server log/ },
    { marker: 'STDERR-ONE-LINE-THEN-FAIL', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /exited with code 1 without an answer; its error message is in the server log/ }
  ]
  for (const c of cases) {
    const before = new Set(box.pids().map((p) => p.pid))
    const started = Date.now()
    const res = await ask(app, id, `please ${c.marker}`)
    t.equal(res.statusCode, c.status, `${c.marker}: ${res.body.slice(0, 300)}`)
    t.equal(res.json().error, c.code, c.marker)
    t.match(res.json().details, c.details, c.marker)
    t.ok(res.json().details.length < 1200, `${c.marker}: details bounded (${res.json().details.length} chars)`)
    // ASK_TIMEOUT here is the helper's AGENT_CALL_TIMEOUT_MS: the answer must come from the agent's end, not from it.
    t.ok(Date.now() - started < AGENT_CALL_TIMEOUT_MS / 2, `${c.marker}: answered in ${Date.now() - started} ms, not at ASK_TIMEOUT`)
    const turnPids = box.pids().map((p) => p.pid).filter((pid) => !before.has(pid))
    t.ok(turnPids.length >= 1, `${c.marker}: the turn was recorded`)
    t.same(await waitForGone(turnPids), [], `${c.marker}: its process is gone`)
    // The wrapper's pid leads the group: yes, tr, head and the rest of it must be gone too.
    for (const pid of turnPids) {
      const deadline = Date.now() + EVENT_TIMEOUT_MS
      while (isGroupAlive(pid) && Date.now() < deadline) await sleep(25)
      t.notOk(isGroupAlive(pid), `${c.marker}: nothing left in group ${pid}`)
    }
    const next = await ask(app, id, 'and now a normal question')
    t.equal(next.statusCode, 200, `${c.marker}: the session answers again`)
  }

  const unterminated = await ask(app, id, 'NO-TRAILING-NEWLINE')
  t.equal(unterminated.statusCode, 200, 'a result line without its newline still answers')
  t.equal(unterminated.json().answer, 'no newline at the end')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no process left')
})

t.test('create-chat that prints nothing, dies of a signal or stalls: no session, no process', async (t) => {
  const bin = misbehavingAgent(t)
  const cases: Array<{ name: string, options: BuildOptions, status: number, code: string, details: RegExp }> = [
    { name: 'prints nothing', options: { cursorAgentBin: bin, agentEnv: { WRAPPER_CREATE_CHAT: 'silent' } }, status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /chat id/ },
    { name: 'killed by SIGSEGV', options: { cursorAgentBin: bin, agentEnv: { WRAPPER_CREATE_CHAT: 'segv' } }, status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /SIGSEGV/ },
    // START_TIMEOUT short for the one start under test: create-chat is the operation that times out.
    { name: 'stalls ignoring SIGTERM, with a grandchild', options: { cursorAgentBin: bin, startTimeout: '1500ms', agentEnv: { WRAPPER_CREATE_CHAT: 'stall' } }, status: 504, code: 'REQUEST_TIMEOUT', details: /create-chat/ }
  ]
  for (const c of cases) {
    const box = sandbox(t)
    const app = await build(t, box, c.options)
    const res = await app.inject({ method: 'POST', url: '/api/session/start' })
    t.equal(res.statusCode, c.status, `${c.name}: ${res.body}`)
    t.equal(res.json().error, c.code, c.name)
    t.match(res.json().details, c.details, c.name)
    t.same(app.agentSessions.counts(), { active: 0, busy: 0, starting: 0, closing: 0 }, `${c.name}: no session`)
    if (c.status === 504) t.ok(box.pids().some((p) => p.role === 'grandchild'), `${c.name}: the grandchild was started`)
    t.same(await waitForGone(box.pids().map((p) => p.pid)), [], `${c.name}: no process left`)
  }
})

t.test('the agent binary coming back after it disappeared: the same session answers again', async (t) => {
  const { bin, install, remove } = agentWrapper(t)
  const box = sandbox(t)
  const app = await build(t, box, { cursorAgentBin: bin })
  const id = await startSession(app)
  t.equal((await ask(app, id, 'first')).statusCode, 200)
  remove()
  const missing = await ask(app, id, 'second')
  t.equal(missing.statusCode, 502)
  t.equal(missing.json().error, 'PROCESS_SPAWN_FAILED')
  const health = (await app.inject({ method: 'GET', url: '/api/health' })).json()
  t.equal(health.active_sessions, 1, 'the session survives a failed spawn')
  install()
  const back = await ask(app, id, 'show the history')
  t.equal(back.statusCode, 200)
  t.equal(back.json().answer, 'This chat has 1 earlier questions: first', 'the same chat goes on')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [])
})
