// Hibernation and the cap on live agents, with the ACP simulator: an idle live
// agent is stopped (never with session/close) and the next ask brings the
// conversation back; the least recently used idle agent makes room; a resume
// that fails ends the session, never silently starting a blank conversation.

import t, { type Test } from 'tap'
import { rmSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { FastifyInstance } from 'fastify'
import { ask, build, sandbox, startSession, waitFor, waitForGone, type BuildOptions, type Sandbox } from './helpers/index.js'
import { isProcessAlive } from '../lib/processes/terminate.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
const GENEROUS_MS = 15_000

async function acpApp (t: Test, box: Sandbox, options: BuildOptions & { faults?: string } = {}): Promise<FastifyInstance> {
  const { faults = '', ...rest } = options
  return await build(t, box, {
    agentProtocol: 'acp',
    agentCommand: [process.execPath, ACP_SIMULATOR],
    ...rest,
    agentEnv: { FAKE_ACP_FAULTS: faults, ...rest.agentEnv }
  })
}

/** The agent processes running now (the start-up probe's comes and goes). */
function mainPids (box: Sandbox): number[] {
  return box.pids().filter((p) => p.role === 'main' && isProcessAlive(p.pid)).map((p) => p.pid)
}

/** The one live agent, once the start-up probe has gone. */
async function onlyAgent (box: Sandbox): Promise<number> {
  return await waitFor(() => { const live = mainPids(box); return live.length === 1 ? live[0] : undefined }, 'one live agent', GENEROUS_MS)
}

function hibernated (app: FastifyInstance, sessionId?: string): Promise<{ sessionId: string, why: string }> {
  return new Promise((resolve) => {
    const listener = (event: { sessionId: string, why: string }): void => {
      if (sessionId !== undefined && event.sessionId !== sessionId) return
      app.agentSessions.off('session-hibernated', listener)
      resolve(event)
    }
    app.agentSessions.on('session-hibernated', listener)
  })
}

t.test('an idle live agent hibernates; heartbeats do not stop that clock; the next ask resumes with the context', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { agentIdleTimeout: '400ms', cleanupInterval: '100ms' })
  const id = await startSession(app)
  t.equal((await ask(app, id, 'remember me')).statusCode, 200)
  const firstAgent = await onlyAgent(box)
  const slept = hibernated(app, id)
  // Heartbeats keep the session, not the agent.
  const beating = setInterval(() => { void app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}` }) }, 100)
  t.teardown(() => clearInterval(beating))
  t.equal((await slept).why, 'idle')
  clearInterval(beating)
  t.same(await waitForGone([firstAgent], GENEROUS_MS), [], 'the agent process is gone while hibernated')
  t.equal(app.agentSessions.get(id).state, 'hibernated')
  t.notOk(box.calls().some((line) => line.includes('session/close')), 'hibernation never sends session/close')
  const health = (await app.inject({ method: 'GET', url: '/api/health' })).json()
  t.equal(health.hibernated_sessions, 1)
  t.equal(health.agent.live_processes, 0)
  const beat = await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}` })
  t.equal(beat.statusCode, 200, 'a hibernated session answers heartbeats')

  const resumed = await ask(app, id, 'who am I?')
  t.equal(resumed.statusCode, 200, resumed.body)
  t.match(resumed.json().answer, /previous question "remember me"/, 'the conversation came back')
  t.ok(box.calls().some((line) => line.includes('session/load')), 'brought back with session/load')
  const replayed = resumed.json().answer as string
  t.notMatch(replayed, /Answer 1/, 'the replayed history is not sent as new output')
  const running = mainPids(box).filter(isProcessAlive)
  t.equal(running.length, 1, 'one live agent')
  t.not(running[0], firstAgent, 'a new agent process')
  t.equal(app.agentSessions.get(id).state, 'idle')
  const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body
  t.match(metrics, /agent_hibernations_total\{why="idle"\} 1/)
  t.match(metrics, /agent_resumes_total\{outcome="ok"\} 1/)
})

t.test('a hibernated session still expires after SESSION_TIMEOUT', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { agentIdleTimeout: '200ms', sessionTimeout: '1500ms', cleanupInterval: '100ms' })
  const id = await startSession(app)
  await hibernated(app, id)
  await waitFor(() => app.agentSessions.endedReason(id) === 'expired', 'the expiry', GENEROUS_MS)
  const res = await ask(app, id, 'still there?')
  t.equal(res.statusCode, 404)
  t.equal(res.json().reason, 'expired')
})

t.test('an agent without loadSession is never hibernated', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { faults: 'no-load-session', agentIdleTimeout: '100ms', cleanupInterval: '50ms' })
  const id = await startSession(app)
  const agent = await onlyAgent(box)
  const sweeps = app.agentSessionsReaper.stats().sweeps
  await waitFor(() => app.agentSessionsReaper.stats().sweeps >= sweeps + 5, 'five sweeps past the idle timeout', GENEROUS_MS)
  t.equal(app.agentSessions.get(id).state, 'idle', 'still live')
  t.ok(isProcessAlive(agent), 'its agent keeps running')
})

t.test('a resume that fails answers RESUME_FAILED and ends the session: never a blank conversation', async (t) => {
  const box = sandbox(t)
  const app = await acpApp(t, box, { agentIdleTimeout: '200ms', cleanupInterval: '100ms' })
  const id = await startSession(app)
  t.equal((await ask(app, id, 'something to lose')).statusCode, 200)
  await hibernated(app, id)
  // The agent's own record of the conversation is gone: session/load must fail.
  rmSync(join(box.stateDir, 'sessions'), { recursive: true, force: true })
  const res = await ask(app, id, 'are you there?')
  t.equal(res.statusCode, 502, res.body)
  t.equal(res.json().error, 'RESUME_FAILED')
  await waitFor(() => app.agentSessions.endedReason(id), 'the end', GENEROUS_MS)
  const after = await ask(app, id, 'and now?')
  t.equal(after.statusCode, 404)
  t.equal(after.json().reason, 'resume_failed')
  t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'no agent left running')
})

t.test('MAX_LIVE_AGENTS: the least recently used idle agent makes room; all busy answers 503 with Retry-After', async (t) => {
  const box = sandbox(t)
  // The stuck turns must outlast both refusals (each waits a few seconds for a slot).
  const app = await acpApp(t, box, { maxLiveAgents: 2, askTimeout: '120s' })
  const first = await startSession(app)
  const second = await startSession(app)
  t.equal((await ask(app, first, 'older')).statusCode, 200)
  t.equal((await ask(app, second, 'newer')).statusCode, 200)
  const made = hibernated(app)
  const third = await startSession(app)
  t.same(await made, { sessionId: first, why: 'capacity' }, 'the least recently used idle agent hibernated')
  t.same(app.agentSessions.agentCounts(), { live: 2, hibernated: 1 })

  // Both live agents busy: the hibernated one cannot come back, nor can a new one start.
  const stuck = [
    ask(app, second, 'busy [[fault:hang-on-prompt]]'),
    ask(app, third, 'busy [[fault:hang-on-prompt]]')
  ]
  await waitFor(() => app.agentSessions.counts().busy === 2, 'two busy sessions', GENEROUS_MS)
  const refused = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(refused.statusCode, 503, refused.body)
  t.equal(refused.json().error, 'LIVE_AGENT_LIMIT_REACHED')
  t.ok(Number(refused.headers['retry-after']) > 0)
  const waiting = await ask(app, first, 'let me back in')
  t.equal(waiting.statusCode, 503, waiting.body)
  t.equal(waiting.json().error, 'LIVE_AGENT_LIMIT_REACHED')
  t.equal(app.agentSessions.get(first).state, 'hibernated', 'the session is kept for a later try')

  for (const id of [second, third]) await app.inject({ method: 'POST', url: `/api/cancel?session_id=${id}` })
  await Promise.all(stuck)
  const back = await ask(app, first, 'now?')
  t.equal(back.statusCode, 200, back.body)
  t.match(back.json().answer, /previous question "older"/)
  t.equal(app.agentSessions.agentCounts().live, 2, 'still no more than two live agents')
})
