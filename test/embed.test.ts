// The plugin as an embedder uses it: registered into a host app that has its
// own `config` decorator and its own @fastify/env, under a prefix.

import t from 'tap'
import Fastify, { type FastifyInstance } from 'fastify'
import fastifyEnv from '@fastify/env'
import fp from 'fastify-plugin'
import agentSessions, { type AgentSessionsDecorators, type AgentSessionsOptions } from '../app.js'
import { ROOT, SIMULATOR, sandbox, sleep, waitFor, waitForGone } from './helpers/index.js'

// What the host's own @fastify/env decorates (its default confKey). Not a
// global `declare module` here: it would apply to every test file.
function hostConfig (host: FastifyInstance): { GREETING: string, SESSION_TIMEOUT: string } {
  return (host as unknown as { config: { GREETING: string, SESSION_TIMEOUT: string } }).config
}

const JSON_HEADERS = { 'content-type': 'application/json' }

/** Sets environment variables for one test and restores them after it. */
function withEnv (t: { after: (fn: () => void) => void }, values: Record<string, string>): void {
  const saved = Object.fromEntries(Object.keys(values).map((name) => [name, process.env[name]]))
  Object.assign(process.env, values)
  t.after(() => {
    for (const [name, value] of Object.entries(saved)) {
      if (value === undefined) delete process.env[name]
      else process.env[name] = value
    }
  })
}

/** The app's own instance, caught as the host creates it (the host itself cannot see into it). */
function catchAppInstance (host: FastifyInstance): () => AgentSessionsDecorators {
  const children: FastifyInstance[] = []
  host.addHook('onRegister', (instance) => { children.push(instance) })
  return () => {
    const app = children.find((c) => c.hasDecorator('agentSessionsReaper'))
    if (app === undefined) throw new Error('the app instance was not registered')
    return app
  }
}

t.test('a host with its own config and @fastify/env uses the whole API under a prefix; options win over the environment', async (t) => {
  const box = sandbox(t)
  // The environment says something else for every option the host passes in code.
  withEnv(t, { SESSION_TIMEOUT: '1h', CURSOR_AGENT_BIN: '/nonexistent/cursor-agent', MAX_SESSIONS: '1', CLEANUP_INTERVAL: '10m' })

  const host = Fastify({ logger: false })
  await host.register(fastifyEnv, {
    schema: {
      type: 'object',
      required: ['GREETING'],
      properties: { GREETING: { type: 'string' }, SESSION_TIMEOUT: { type: 'string' } }
    },
    data: { ...process.env, GREETING: 'hello from the host' }
  })
  const appInstance = catchAppInstance(host)
  const options: AgentSessionsOptions = {
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    sessionTimeout: '2m',
    maxSessions: 3,
    cleanupInterval: '50ms',
    killGrace: '1s',
    agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir }
  }
  await host.register(agentSessions, { prefix: '/agent', ...options })
  host.get('/own', async () => ({ greeting: hostConfig(host).GREETING }))
  await host.ready()
  t.after(() => host.close())

  // The host keeps its own config; ours is namespaced and encapsulated.
  t.same(hostConfig(host), { GREETING: 'hello from the host', SESSION_TIMEOUT: '1h' })
  t.notOk(host.hasDecorator('agentSessions'), 'the app does not decorate the host')
  t.same((await host.inject({ method: 'GET', url: '/own' })).json(), { greeting: 'hello from the host' })
  const hostMiss = await host.inject({ method: 'GET', url: '/nope' })
  t.equal(hostMiss.statusCode, 404)
  t.equal(hostMiss.json().error, 'Not Found', 'the host keeps its own not-found answer')
  t.equal((await host.inject({ method: 'GET', url: '/api/health' })).statusCode, 404, 'nothing outside the prefix')
  const ourMiss = await host.inject({ method: 'GET', url: '/agent/nope' })
  t.equal(ourMiss.json().error, 'NOT_FOUND', 'under the prefix, the app answers its JSON error shape')

  const app = appInstance()
  t.equal(app.agentSessionsConfig.sessionTimeoutMs, 120_000, 'sessionTimeout option beat SESSION_TIMEOUT=1h')
  t.equal(app.agentSessionsConfig.cursorAgentBin, SIMULATOR, 'cursorAgentBin option beat CURSOR_AGENT_BIN')
  t.equal(app.agentSessionsConfig.maxSessions, 3)
  t.equal(app.agentSessionsConfig.cleanupIntervalMs, 50)

  // The Janus sequence under the prefix.
  const start = await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: JSON_HEADERS })
  t.equal(start.statusCode, 200, start.body)
  t.equal(start.json().idle_timeout_seconds, 120)
  const id: string = start.json().session_id
  const answer = await host.inject({ method: 'POST', url: `/agent/api/ask?session_id=${id}`, payload: { question: 'What does app.ts do?' } })
  t.equal(answer.statusCode, 200, answer.body)
  t.equal(answer.json().answer, 'Answer 1: you asked "What does app.ts do?"')
  const beat = await host.inject({ method: 'POST', url: `/agent/api/heartbeat?session_id=${id}` })
  t.equal(beat.statusCode, 200)
  t.equal(beat.json().session_id, id)
  const health = await host.inject({ method: 'GET', url: '/agent/api/health' })
  t.equal(health.statusCode, 200)
  t.equal(health.json().active_sessions, 1)
  t.equal(health.json().agent.binary, SIMULATOR)
  const end = await host.inject({ method: 'POST', url: `/agent/api/session/end?session_id=${id}` })
  t.same(end.json(), { message: 'Session ended', session_id: id })
  t.equal((await host.inject({ method: 'POST', url: `/agent/api/heartbeat?session_id=${id}` })).json().reason, 'ended')

  // MAX_SESSIONS=1 in the environment lost to maxSessions: 3.
  const ids: string[] = []
  for (let i = 0; i < 3; i++) {
    const res = await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: JSON_HEADERS })
    t.equal(res.statusCode, 200, `session ${i + 1} of 3`)
    ids.push(res.json().session_id)
  }
  t.equal((await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: JSON_HEADERS })).json().error, 'SESSION_LIMIT_REACHED')
  await host.inject({ method: 'POST', url: `/agent/api/session/end?session_id=${ids.pop()!}` })

  // Metrics and the OpenAPI document live under the prefix too.
  const metrics = await host.inject({ method: 'GET', url: '/agent/metrics' })
  t.match(metrics.body, /^agent_sessions_started_total 4$/m)
  const doc = (await host.inject({ method: 'GET', url: '/agent/documentation/json' })).json()
  t.same(Object.keys(doc.paths).sort(),
    ['/agent/api/ask', '/agent/api/cancel', '/agent/api/health', '/agent/api/health/live', '/agent/api/health/ready', '/agent/api/heartbeat',
      '/agent/api/permission', '/agent/api/session/end', '/agent/api/session/events', '/agent/api/session/history', '/agent/api/session/start', '/agent/metrics'])

  // The reaper runs: a session with a short idle timeout is reaped by itself.
  // (Over HTTP idle_timeout is at least 10 s; the manager itself takes any.)
  const shortId = (await app.agentSessions.create({ idleTimeoutMs: 200 })).id
  await waitFor(() => app.agentSessions.endedReason(shortId), 'the short session to be reaped')
  const reaped = await host.inject({ method: 'POST', url: `/agent/api/heartbeat?session_id=${shortId}` })
  t.equal(reaped.statusCode, 404)
  t.equal(reaped.json().reason, 'expired', 'reaped by the sweep, not by a request')
  t.ok(app.agentSessionsReaper.stats().sweeps > 0)
  t.equal(app.agentSessions.counts().active, 2, 'the long-timeout sessions stay')

  // host.close() stops the reaper and ends what is left.
  await host.close()
  const stopped = app.agentSessionsReaper.stats()
  t.equal(stopped.running, false, 'the reaper timer is gone')
  for (const left of ids) t.equal(app.agentSessions.endedReason(left), 'shutdown')
  await sleep(300)
  t.equal(app.agentSessionsReaper.stats().sweeps, stopped.sweeps, 'no sweep after close')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'no agent process left')
})

t.test('to use the decorators, register it without encapsulation in a prefixed scope of your own', async (t) => {
  const box = sandbox(t)
  const host = Fastify({ logger: false })
  await host.register(async (scope) => {
    // Wrap it (fp mutates the function it is given; never fp the export itself).
    await scope.register(fp<AgentSessionsOptions>(async (instance, opts) => { await agentSessions(instance, opts) }), {
      cursorAgentBin: SIMULATOR,
      workspaceDir: ROOT,
      agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir }
    })
    scope.get('/my/sessions', async () => scope.agentSessions.list().map((s) => s.id))
  }, { prefix: '/agent' })
  await host.ready()
  t.after(() => host.close())
  const start = await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: JSON_HEADERS })
  t.equal(start.statusCode, 200)
  t.same((await host.inject({ method: 'GET', url: '/agent/my/sessions' })).json(), [start.json().session_id])
  t.notOk(host.hasDecorator('agentSessions'), 'still not on the host itself')
})

t.test('two instances in one host keep their own sessions, settings and metrics', async (t) => {
  const box = sandbox(t)
  const host = Fastify({ logger: false })
  const base = { cursorAgentBin: SIMULATOR, workspaceDir: ROOT, agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir } }
  await host.register(agentSessions, { prefix: '/a', ...base, sessionTimeout: '1m' })
  await host.register(agentSessions, { prefix: '/b', ...base, sessionTimeout: '2m' })
  await host.ready()
  t.after(() => host.close())
  const a = await host.inject({ method: 'POST', url: '/a/api/session/start', headers: JSON_HEADERS })
  t.equal(a.json().idle_timeout_seconds, 60)
  const b = await host.inject({ method: 'POST', url: '/b/api/session/start', headers: JSON_HEADERS })
  t.equal(b.json().idle_timeout_seconds, 120)
  t.equal((await host.inject({ method: 'POST', url: `/b/api/heartbeat?session_id=${a.json().session_id}` })).statusCode, 404, 'a session of /a is unknown to /b')
  t.match((await host.inject({ method: 'GET', url: '/a/metrics' })).body, /^agent_sessions_started_total 1$/m)
  t.match((await host.inject({ method: 'GET', url: '/b/metrics' })).body, /^agent_sessions_started_total 1$/m)
})
