// The ACP driver through the HTTP API, against the ACP simulator: one live
// agent per session, cancel, permission policy, Cursor's own requests, every
// fault of the simulator, and every pid checked gone afterwards.

import t, { type Test } from 'tap'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import { AGENT_CALL_TIMEOUT_MS, ask, build, sandbox, startSession, waitFor, waitForGone, type BuildOptions, type Sandbox } from './helpers/index.js'
import { isProcessAlive } from '../lib/processes/terminate.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))

async function acpApp (t: Test, box: Sandbox, options: BuildOptions & { faults?: string } = {}): Promise<FastifyInstance> {
  const { faults = '', ...rest } = options
  return await build(t, box, {
    agentProtocol: 'acp',
    agentCommand: [process.execPath, ACP_SIMULATOR],
    // No hibernation here, so no start-up probe of the agent: the agents these tests count are the sessions' own.
    agentIdleTimeout: 0,
    ...rest,
    agentEnv: { FAKE_ACP_FAULTS: faults, ...rest.agentEnv }
  })
}

async function cancel (app: FastifyInstance, id: string): Promise<{ cancelled: boolean }> {
  const res = await app.inject({ method: 'POST', url: `/api/cancel?session_id=${id}` })
  if (res.statusCode !== 200) throw new Error(`cancel: ${res.statusCode} ${res.body}`)
  return res.json()
}

/** Resolves once the simulator logged this call (e.g. the turn reached the agent). */
async function callSeen (box: Sandbox, pattern: RegExp, what: string): Promise<void> {
  await waitFor(() => box.calls().some((line) => pattern.test(line)), what)
}

/** The agent processes running now (the start-up probe's has come and gone). */
function mainPids (box: Sandbox): number[] {
  return box.pids().filter((p) => p.role === 'main' && isProcessAlive(p.pid)).map((p) => p.pid)
}

t.test('one live agent per session: start, two turns with context, health, end leaves nothing', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box)
  const id = await startSession(app)
  const [agentPid] = mainPids(box)
  t.ok(isProcessAlive(agentPid), 'the agent lives between turns')

  const first = await ask(app, id, 'What does app.ts do?')
  t.equal(first.statusCode, 200, first.body)
  t.same(first.json(), { answer: 'Answer 1 to "What does app.ts do?": no earlier turns.', session_id: id, stop_reason: 'end_turn' })
  const second = await ask(app, id, 'And server.ts?')
  t.match(second.json().answer, /1 earlier turn, previous question "What does app.ts do\?"/, 'the same agent kept the conversation')
  t.same(mainPids(box), [agentPid], 'both turns went to the one live process')

  const health = (await app.inject({ method: 'GET', url: '/api/health' })).json()
  t.match(health.agent, { protocol: 'acp', name: 'Fake ACP agent', version: '1.0.0-fake', available: true, can_resume: true, live_processes: 1 })
  t.ok(health.agent.live_rss_mb > 0, `live agents hold ${health.agent.live_rss_mb} MB`)

  const end = await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })
  t.equal(end.statusCode, 200)
  t.same(await waitForGone([agentPid]), [], 'the agent is gone after the end')
  t.ok(box.calls().some((line) => line.includes('session/close')), 'a real end closes the agent session politely first')
})

t.test('a start that fails leaves nothing running and says why', async (t) => {
  const cases: Array<{ name: string, options: BuildOptions & { faults?: string }, status: number, code: string, details: RegExp }> = [
    { name: 'agent exits before initialize', options: { faults: 'exit-on-start' }, status: 502, code: 'AGENT_START_FAILED', details: /exited with code 1 during initialize/ },
    { name: 'missing program', options: { agentCommand: ['/nonexistent/agent', 'acp'] }, status: 502, code: 'PROCESS_SPAWN_FAILED', details: /not found: check AGENT_COMMAND/ },
    { name: 'authentication needed, no method configured', options: { faults: 'require-auth' }, status: 502, code: 'AGENT_AUTH_FAILED', details: /AGENT_AUTH_METHOD.*fake-login/ },
    { name: 'authentication refused', options: { faults: 'require-auth,refuse-auth', agentAuthMethod: 'fake-login' }, status: 502, code: 'AGENT_AUTH_FAILED', details: /refused authentication/ }
  ]
  for (const c of cases) {
    const box = sandbox(t)
    const app = await acpApp(t, box, c.options)
    const res = await app.inject({ method: 'POST', url: '/api/session/start' })
    t.equal(res.statusCode, c.status, `${c.name}: ${res.body}`)
    t.equal(res.json().error, c.code, c.name)
    t.match(res.json().details, c.details, c.name)
    t.same(app.agentSessions.counts(), { active: 0, busy: 0, starting: 0, closing: 0 }, `${c.name}: no session`)
    t.same(await waitForGone(box.pids().map((p) => p.pid)), [], `${c.name}: nothing left running`)
  }
})

t.test('AGENT_AUTH_METHOD authenticates an agent that requires it', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { faults: 'require-auth', agentAuthMethod: 'fake-api-key' })
  const id = await startSession(app)
  t.equal((await ask(app, id, 'hi')).statusCode, 200)
  t.ok(box.calls().some((line) => / authenticate /.test(line)), 'authenticate was called')
})

t.test('cancel: the ask answers cancelled with what arrived, and the session stays usable', async (t) => {
  const box = sandbox(t)
  // KILL_GRACE is how long a cancel may take before the agent is torn down: not under test here.
  const app = await acpApp(t, box, { killGrace: '30s' })
  const id = await startSession(app)
  t.same(await cancel(app, id), { session_id: id, cancelled: false }, 'nothing to cancel between turns')

  const pending = ask(app, id, 'think forever [[fault:hang-on-prompt]]')
  await callSeen(box, /session\/prompt/, 'the turn reached the agent')
  t.same(await cancel(app, id), { session_id: id, cancelled: true })
  const res = await pending
  t.equal(res.statusCode, 200, res.body)
  t.equal(res.json().stop_reason, 'cancelled')
  t.ok(box.calls().some((line) => line.includes('session/cancel')), 'session/cancel was sent')
  const [agentPid] = mainPids(box)
  t.ok(isProcessAlive(agentPid), 'the agent that honoured the cancel keeps running')
  const next = await ask(app, id, 'still there?')
  t.equal(next.statusCode, 200)
  t.equal(next.json().stop_reason, 'end_turn')
})

t.test('a cancel mid-stream answers with the text that arrived before it', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box)
  const id = await startSession(app)
  const firstChunk = new Promise<string>((resolve) => {
    const listener = ({ event }: { event: { type: string, text?: string } }): void => {
      if (event.type !== 'chunk') return
      app.agentSessions.off('turn-event', listener)
      resolve(event.text ?? '')
    }
    app.agentSessions.on('turn-event', listener)
  })
  // 1 s before every update: the cancel has 3 s (three more chunks) to arrive, however busy the machine.
  const pending = ask(app, id, 'slowly [[fault:slow=1000]]')
  const chunk = await firstChunk
  await cancel(app, id)
  const res = await pending
  t.equal(res.statusCode, 200, res.body)
  t.equal(res.json().stop_reason, 'cancelled')
  t.ok(res.json().answer.startsWith(chunk) && chunk !== '', `the answer keeps what streamed: ${JSON.stringify(res.json().answer)}`)
  t.not(res.json().answer, 'Answer 1 to "slowly": no earlier turns.', 'not the whole answer')
})

t.test('an agent that ignores the cancel is torn down after KILL_GRACE; the next ask loads the conversation', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { killGrace: '500ms' })
  const id = await startSession(app)
  t.equal((await ask(app, id, 'remember me')).statusCode, 200)
  const pending = ask(app, id, 'stuck [[fault:hang-on-prompt]] [[fault:ignore-cancel]] [[fault:ignore-sigterm]] [[fault:grandchild]]')
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'the grandchild started')
  await cancel(app, id)
  const res = await pending
  t.equal(res.statusCode, 200, res.body)
  t.equal(res.json().stop_reason, 'cancelled')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'the agent, its grandchild included, is gone')

  const next = await ask(app, id, 'are you back?')
  t.equal(next.statusCode, 200, next.body)
  t.match(next.json().answer, /previous question "remember me"/, 'session/load brought the conversation back')
  t.ok(box.calls().some((line) => line.includes('session/load')), 'resumed with session/load')
})

t.test('permission requests follow PERMISSION_POLICY', async (t) => {
  for (const [policy, option] of [['reject', 'reject-once'], ['allow', 'allow-once']] as const) {
    const box = sandbox(t)
    const app = await acpApp(t, box, { permissionPolicy: policy })
    const id = await startSession(app)
    const res = await ask(app, id, 'may I? [[fault:ask-permission]]')
    t.equal(res.statusCode, 200, res.body)
    t.match(res.json().answer, new RegExp(`Permission: selected ${option}`), `${policy}: ${option}`)
  }
})

t.test('Cursor\'s own requests are answered and unknown requests get -32601: no turn strands', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box)
  const id = await startSession(app)
  const cursor = await ask(app, id, 'plan it [[fault:cursor-requests]]')
  t.equal(cursor.statusCode, 200, cursor.body)
  t.match(cursor.json().answer, /cursor\/ask_question: /)
  t.match(cursor.json().answer, /cursor\/create_plan: /)
  const unknown = await ask(app, id, 'odd [[fault:unknown-request]]')
  t.equal(unknown.statusCode, 200, unknown.body)
  t.match(unknown.json().answer, /Unknown request: error -32601/)
})

t.test('an agent that dies mid-turn answers at once with AGENT_EXITED; the next ask brings it back', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box)
  const id = await startSession(app)
  t.equal((await ask(app, id, 'first')).statusCode, 200)
  const started = performance.now()
  const res = await ask(app, id, 'boom [[fault:crash-mid-turn]]')
  t.equal(res.statusCode, 502, res.body)
  t.equal(res.json().error, 'AGENT_EXITED')
  t.ok(performance.now() - started < AGENT_CALL_TIMEOUT_MS / 2, 'answered, not hung until ASK_TIMEOUT')
  const next = await ask(app, id, 'again')
  t.equal(next.statusCode, 200, next.body)
  t.match(next.json().answer, /previous question "first"/, 'context kept through session/load')
})

t.test('an agent that dies between turns is noticed at once and resumed by the next ask', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box)
  const exited = new Promise<{ duringTurn: boolean }>((resolve) => app.agentSessions.once('agent-exited', resolve))
  const id = await startSession(app)
  t.equal((await ask(app, id, 'then die [[fault:die-between-turns]]')).statusCode, 200)
  t.equal((await exited).duringTurn, false, 'the death was noticed without a request')
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /agent_exits_total\{when="between_turns"\} 1/)
  const next = await ask(app, id, 'back?')
  t.equal(next.statusCode, 200, next.body)
  t.match(next.json().answer, /previous question "then die"/)
})

t.test('an agent that cannot load sessions and dies between turns ends its session: agent_exited', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { faults: 'no-load-session' })
  const id = await startSession(app)
  const ended = new Promise<{ reason: string }>((resolve) => app.agentSessions.once('session-ended', resolve))
  t.equal((await ask(app, id, 'then die [[fault:die-between-turns]]')).statusCode, 200)
  t.equal((await ended).reason, 'agent_exited')
  const next = await ask(app, id, 'anyone?')
  t.equal(next.statusCode, 404)
  t.equal(next.json().reason, 'agent_exited')
  t.match(next.json().details, /agent process exited/)
})

t.test('a prompt that never returns is cancelled at ASK_TIMEOUT (504), then torn down', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { askTimeout: '1s', killGrace: '500ms' })
  const id = await startSession(app)
  const res = await ask(app, id, 'never [[fault:hang-on-prompt]] [[fault:ignore-cancel]] [[fault:ignore-sigterm]]')
  t.equal(res.statusCode, 504, res.body)
  t.equal(res.json().error, 'REQUEST_TIMEOUT')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'the stuck agent is gone')
})

t.test('bad output never crashes or blocks the service', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { maxAnswerBytes: 65536 })
  const id = await startSession(app)
  const garbage = await ask(app, id, 'noisy [[fault:garbage-stdout]] [[fault:stderr-noise]]')
  t.equal(garbage.statusCode, 200, 'non-JSON lines on stdout are skipped')
  const huge = await ask(app, id, 'huge [[fault:huge-line=1000000]]')
  t.equal(huge.statusCode, 200, `a line over the limit is dropped, the turn goes on: ${huge.body.slice(0, 200)}`)
  const health = await app.inject({ method: 'GET', url: '/api/health' })
  t.equal(health.statusCode, 200, 'the server keeps serving')
})

t.test('end, reap and shutdown of agents that ignore SIGTERM and spawn grandchildren leave nothing', async (t) => {
  const box = sandbox(t)
  // Only the session that must be reaped has a short idle timeout: the others start one by one, seconds apart on a busy machine.
  const app = await acpApp(t, box, { faults: 'ignore-sigterm,grandchild', killGrace: '500ms', cleanupInterval: '100ms' })
  const ended = await startSession(app)
  // Through the manager: the API's shortest idle timeout is 10 s.
  const reaped = (await app.agentSessions.create({ idleTimeoutMs: 1000 })).id
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${ended}` })).statusCode, 200, 'ended by the client')
  await waitFor(() => app.agentSessions.endedReason(reaped) === 'expired', 'the idle session was reaped')
  await startSession(app)
  await startSession(app)
  const closing = performance.now()
  await app.close()
  const closeMs = performance.now() - closing
  // About KILL_GRACE; the bound only separates it from a close that waits for something else.
  t.ok(closeMs < 30 * 500, `closing 2 stuck sessions took ${Math.round(closeMs)} ms (KILL_GRACE 500 ms)`)
  const pids = box.pids().map((p) => p.pid)
  t.ok(pids.length >= 8, `${pids.length} agent processes and grandchildren recorded`)
  t.same(await waitForGone(pids), [], 'every one of them is gone')
})
