// Each cursor-agent failure mode the simulator reproduces, driven through the
// real HTTP path with real processes: the client gets the right answer or
// JSON error, the session stays usable, and every recorded pid is gone.

import t from 'tap'
import { ask, build, sandbox, startSession, waitForGone, type BuildOptions } from './helpers/index.js'

const KILL_GRACE_MS = 1000

t.test('start fails cleanly, creating no session', async (t) => {
  const cases: Array<{ name: string, options: BuildOptions, status: number, code: string, details: RegExp }> = [
    { name: 'not logged in', options: { agentEnv: { FAKE_AGENT_FAULTS: 'not-logged-in' } }, status: 502, code: 'AGENT_NOT_AUTHENTICATED', details: /cursor-agent login.*CURSOR_API_KEY/ },
    { name: 'invalid key', options: { agentEnv: { CURSOR_API_KEY: 'invalid' } }, status: 502, code: 'AGENT_INVALID_API_KEY', details: /API key/ },
    { name: 'missing binary', options: { cursorAgentBin: '/nonexistent/cursor-agent' }, status: 502, code: 'PROCESS_SPAWN_FAILED', details: /CURSOR_AGENT_BIN.*\/nonexistent\/cursor-agent/ },
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
    t.same(await waitForGone(box.pids().map((p) => p.pid), 2000), [], `${c.name}: no process left`)
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
    { fault: 'exit-1', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /Something unexpected happened \(code 17\)/ },
    { fault: 'crash-mid-stream', status: 502, code: 'PROCESS_COMMUNICATION_FAILED', details: /Connection lost/ },
    // The process exits before its stderr arrives: we still wait (briefly) for it.
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
  t.same(await waitForGone(box.pids().map((p) => p.pid), 2000), [], 'no process left')
})

t.test('an unknown model is reported as such', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { agentModel: 'gpt-0' })
  const id = await startSession(app)
  const res = await ask(app, id, 'hello')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'AGENT_UNKNOWN_MODEL')
  t.match(res.json().details, /gpt-0/)
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
    t.same(await waitForGone(turnPids, KILL_GRACE_MS + 1000), [], `${faults}: all gone`)
    t.ok(Date.now() - answeredAt <= KILL_GRACE_MS + 1000, `${faults}: gone ${Date.now() - answeredAt} ms after the result`)
    const next = await ask(app, id, 'next')
    t.equal(next.statusCode, 200, 'the next turn runs once the hung one is gone')
  }
})

t.test('a stalled turn answers 504 near ASK_TIMEOUT and leaves no process, even ignoring SIGTERM with a grandchild', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { askTimeout: '1500ms' })
  const id = await startSession(app)
  const started = Date.now()
  const res = await ask(app, id, 'stall [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]')
  const elapsed = Date.now() - started
  t.equal(res.statusCode, 504, res.body)
  t.equal(res.json().error, 'REQUEST_TIMEOUT')
  t.ok(elapsed >= 1400 && elapsed < 1500 + 3000, `answered after ${elapsed} ms`)
  const pids = box.pids()
  t.ok(pids.some((p) => p.role === 'grandchild'), 'the grandchild was started')
  t.same(await waitForGone(pids.map((p) => p.pid), KILL_GRACE_MS + 1000), [], 'turn, grandchild all gone')
  t.equal((await ask(app, id, 'again')).statusCode, 200, 'the session still answers')
})

t.test('a worker-server child holding stdout open does not hold the answer, and is torn down', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const started = Date.now()
  const res = await ask(app, id, 'with a worker [[fault:worker-server]]')
  t.equal(res.statusCode, 200)
  t.equal(res.json().answer, 'Answer 1: you asked "with a worker"')
  t.ok(Date.now() - started < 5000)
  const worker = box.pids().find((p) => p.role === 'worker-server')
  t.ok(worker, 'a worker-server was started')
  t.same(await waitForGone([worker!.pid], KILL_GRACE_MS + 1000), [], 'the worker is gone')
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
  t.same(await waitForGone(box.pids().map((p) => p.pid), 2000), [])
})

t.test('output past MAX_ANSWER_BYTES is cut off with a clear error', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { maxAnswerBytes: 100_000 })
  const id = await startSession(app)
  const res = await ask(app, id, 'big [[fault:big=500000]]')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'PROCESS_COMMUNICATION_FAILED')
  t.match(res.json().details, /100000 bytes/)
  t.same(await waitForGone(box.pids().map((p) => p.pid), 2000), [])
  t.equal((await ask(app, id, 'small')).statusCode, 200)
})

t.test('the agent binary disappearing after start-up fails the turn, not the server', async (t) => {
  const { writeFileSync, rmSync, mkdtempSync } = await import('node:fs')
  const { join } = await import('node:path')
  const { tmpdir } = await import('node:os')
  const { SIMULATOR } = await import('./helpers/index.js')
  const dir = mkdtempSync(join(tmpdir(), 'agent-bin-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const bin = join(dir, 'cursor-agent')
  // Like the real one: a shell wrapper around a Node program.
  writeFileSync(bin, `#!/bin/sh\nexec "${process.execPath}" "${SIMULATOR}" "$@"\n`, { mode: 0o755 })
  const box = sandbox(t)
  const app = await build(t, box, { cursorAgentBin: bin })
  const id = await startSession(app)
  rmSync(bin)
  const res = await ask(app, id, 'are you there?')
  t.equal(res.statusCode, 502)
  t.equal(res.json().error, 'PROCESS_SPAWN_FAILED')
  t.match(res.json().details, /CURSOR_AGENT_BIN/)
  t.equal((await app.inject({ method: 'GET', url: '/api/health' })).statusCode, 200)
})
