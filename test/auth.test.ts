// API_TOKEN: every route of the app but GET /api/health needs the bearer token.
// The routes are collected as the app registers them, so a route someone adds
// later (metrics, docs) is checked without touching this file.

import t, { type Test } from 'tap'
import fp from 'fastify-plugin'
import Fastify, { type FastifyInstance, type FastifyPluginAsync, type HTTPMethods, type LightMyRequestResponse } from 'fastify'
import agentSessions, { type AgentSessionsOptions } from '../app.js'
import { ROOT, SIMULATOR, build, sandbox, type Sandbox } from './helpers/index.js'

const TOKEN = 'test-token-0123456789abcdef'
const AUTH = { authorization: `Bearer ${TOKEN}` }

interface RouteSeen { method: string, url: string }

async function buildWithRoutes (t: Test, box: Sandbox, options: { apiToken?: string, prefix?: string, wrap?: boolean } = {}): Promise<{ app: FastifyInstance, routes: RouteSeen[] }> {
  const app = Fastify({ logger: false, return503OnClosing: false })
  const routes: RouteSeen[] = []
  app.addHook('onRoute', (route) => {
    for (const method of ([] as string[]).concat(route.method as string | string[])) routes.push({ method, url: route.url ?? route.path })
  })
  // fp() marks the function it is given, so wrap a fresh function each time:
  // fp(agentSessions) itself would strip the encapsulation from every later use.
  const fresh: FastifyPluginAsync<AgentSessionsOptions> = async (instance, opts) => { await agentSessions(instance, opts) }
  const plugin = options.wrap === false ? fresh : fp(fresh)
  await app.register(plugin, {
    prefix: options.prefix,
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    killGrace: '1s',
    ...(options.apiToken === undefined ? {} : { apiToken: options.apiToken }),
    agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir }
  })
  await app.ready()
  t.after(() => app.close())
  return { app, routes }
}

// A concrete URL for a route pattern: parameters and wildcards get a harmless value.
function concrete (url: string): string {
  return url.replace(/:[^/]+/g, 'x').replace(/\*/g, 'x')
}

function checkUnauthorized (t: Test, res: LightMyRequestResponse, what: string, wwwAuthenticate: string): void {
  t.equal(res.statusCode, 401, `${what}: ${res.body}`)
  const body = res.json()
  t.equal(body.error, 'UNAUTHORIZED', what)
  t.type(body.details, 'string', what)
  t.equal(body.request_id, res.headers['x-request-id'], `${what}: request_id matches X-Request-ID`)
  t.ok(!Number.isNaN(Date.parse(body.timestamp)), `${what}: timestamp`)
  t.equal(res.headers['www-authenticate'], wwwAuthenticate, `${what}: WWW-Authenticate`)
}

t.test('with API_TOKEN, every route but health refuses requests without the right bearer token', async (t) => {
  const box = sandbox(t)
  const { app, routes } = await buildWithRoutes(t, box, { apiToken: TOKEN })
  const protectedRoutes = routes.filter((r) => !(/^\/api\/health(?:\/live|\/ready)?$/.test(r.url) && (r.method === 'GET' || r.method === 'HEAD')))
  t.ok(protectedRoutes.length >= 4, `routes found: ${protectedRoutes.map((r) => `${r.method} ${r.url}`).join(', ')}`)
  // The not-found handler is behind the token too: no probing which routes exist.
  protectedRoutes.push({ method: 'GET', url: '/api/nope' }, { method: 'DELETE', url: '/' })

  const wrong: Array<[string, Record<string, string>, string]> = [
    ['no header', {}, 'Bearer'],
    ['empty header', { authorization: '' }, 'Bearer'],
    ['wrong scheme', { authorization: `Basic ${Buffer.from(`user:${TOKEN}`).toString('base64')}` }, 'Bearer'],
    ['scheme only', { authorization: 'Bearer' }, 'Bearer'],
    ['token without scheme', { authorization: TOKEN }, 'Bearer'],
    ['wrong token', { authorization: 'Bearer not-the-token' }, 'Bearer error="invalid_token"'],
    ['token prefix', { authorization: `Bearer ${TOKEN.slice(0, -1)}` }, 'Bearer error="invalid_token"'],
    ['token plus suffix', { authorization: `Bearer ${TOKEN}x` }, 'Bearer error="invalid_token"'],
    ['token in other case', { authorization: `Bearer ${TOKEN.toUpperCase()}` }, 'Bearer error="invalid_token"'],
    ['two tokens', { authorization: `Bearer ${TOKEN} ${TOKEN}` }, 'Bearer']
  ]
  for (const route of protectedRoutes) {
    const url = `${concrete(route.url)}?session_id=6b1c1a7e-0000-4000-8000-000000000000`
    for (const [name, headers, challenge] of wrong) {
      const res = await app.inject({ method: route.method as HTTPMethods, url, headers })
      if (route.method === 'HEAD') {
        t.equal(res.statusCode, 401, `HEAD ${route.url}, ${name}`)
        continue
      }
      checkUnauthorized(t, res, `${route.method} ${route.url}, ${name}`, challenge)
    }
  }
  t.same(box.pids(), [], 'no unauthenticated request started an agent process')
  t.same(app.agentSessions.counts(), { active: 0, busy: 0, starting: 0, closing: 0 })
  for (const route of protectedRoutes) {
    const url = `${concrete(route.url)}?session_id=6b1c1a7e-0000-4000-8000-000000000000`
    const ok = await app.inject({ method: route.method as HTTPMethods, url, headers: AUTH })
    t.not(ok.statusCode, 401, `${route.method} ${route.url} with the token: ${ok.statusCode}`)
  }

  const health = await app.inject({ method: 'GET', url: '/api/health' })
  t.equal(health.statusCode, 200, 'health needs no token')
  t.equal((await app.inject({ method: 'HEAD', url: '/api/health' })).statusCode, 200, 'HEAD health too')
})

t.test('with the token the whole Janus sequence works; the scheme is case-insensitive', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { apiToken: TOKEN })
  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: { authorization: `bearer  ${TOKEN}`, 'content-type': 'application/json' } })
  t.equal(start.statusCode, 200, start.body)
  const id = start.json().session_id as string
  const asked = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, headers: AUTH, payload: { question: 'hi' } })
  t.equal(asked.statusCode, 200, asked.body)
  t.equal(asked.json().answer, 'Answer 1: you asked "hi"')
  t.equal((await app.inject({ method: 'POST', url: `/api/heartbeat?session_id=${id}`, headers: AUTH })).statusCode, 200)
  // A request with a wrong token does not touch the session: it is not activity, nor an end.
  const sneaky = await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}`, headers: { authorization: 'Bearer guess' } })
  t.equal(sneaky.statusCode, 401)
  t.equal(app.agentSessions.counts().active, 1, 'the session survived the unauthenticated end')
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}`, headers: AUTH })).statusCode, 200)
})

// The README's recipe for routes of your own next to the API: the app without
// encapsulation in a prefixed scope. The scope's route answers OPTIONS too.
async function scopeWithOwnRoute (t: Test, box: Sandbox, extra: AgentSessionsOptions = {}): Promise<{ host: FastifyInstance, handled: string[] }> {
  const host = Fastify({ logger: false })
  const handled: string[] = []
  await host.register(async (scope) => {
    await scope.register(fp<AgentSessionsOptions>(async (instance, opts) => { await agentSessions(instance, opts) }), {
      cursorAgentBin: SIMULATOR,
      workspaceDir: ROOT,
      apiToken: TOKEN,
      agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir },
      ...extra
    })
    scope.route({
      method: ['GET', 'OPTIONS'],
      url: '/my/sessions',
      handler: async (request) => {
        handled.push(request.method)
        return scope.agentSessions.list()
      }
    })
  }, { prefix: '/agent' })
  await host.ready()
  t.after(() => host.close())
  return { host, handled }
}

const PREFLIGHT = { origin: 'https://app.example.com', 'access-control-request-method': 'GET' }

t.test('without CORS an OPTIONS preflight needs the token like any request, and never reaches a handler', async (t) => {
  const box = sandbox(t)
  const { host, handled } = await scopeWithOwnRoute(t, box)
  t.equal((await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: AUTH })).statusCode, 200, 'a session exists')

  const preflight = await host.inject({ method: 'OPTIONS', url: '/agent/my/sessions', headers: PREFLIGHT })
  checkUnauthorized(t, preflight, 'preflight to the scope\'s own route', 'Bearer')
  t.notMatch(preflight.body, /"id"/, 'no session listed')
  const toApp = await host.inject({ method: 'OPTIONS', url: '/agent/api/session/start', headers: { ...PREFLIGHT, 'access-control-request-method': 'POST' } })
  checkUnauthorized(t, toApp, 'preflight to an API route', 'Bearer')
  const plain = await host.inject({ method: 'OPTIONS', url: '/agent/my/sessions' })
  checkUnauthorized(t, plain, 'plain OPTIONS', 'Bearer')
  t.same(handled, [], 'no handler ran without the token')

  const withToken = await host.inject({ method: 'OPTIONS', url: '/agent/my/sessions', headers: AUTH })
  t.equal(withToken.statusCode, 200, 'with the token the route answers')
  t.same(handled, ['OPTIONS'])
})

t.test('with CORS on, the CORS plugin answers preflights itself: no token needed, no handler reached, no data', async (t) => {
  const box = sandbox(t)
  const { host, handled } = await scopeWithOwnRoute(t, box, { corsOrigins: PREFLIGHT.origin })
  t.equal((await host.inject({ method: 'POST', url: '/agent/api/session/start', headers: AUTH })).statusCode, 200)
  for (const url of ['/agent/my/sessions', '/agent/api/session/start', '/agent/api/nope']) {
    const preflight = await host.inject({ method: 'OPTIONS', url, headers: PREFLIGHT })
    t.equal(preflight.statusCode, 204, `${url}: answered by CORS`)
    t.equal(preflight.headers['access-control-allow-origin'], PREFLIGHT.origin, `${url}: with CORS headers`)
    t.equal(preflight.body, '', `${url}: and nothing else`)
  }
  const denied = await host.inject({ method: 'OPTIONS', url: '/agent/my/sessions', headers: { ...PREFLIGHT, origin: 'https://evil.example' } })
  t.equal(denied.body, '', 'a denied origin gets no data either')
  t.notOk(denied.headers['access-control-allow-origin'])
  checkUnauthorized(t, await host.inject({ method: 'GET', url: '/agent/my/sessions', headers: { origin: PREFLIGHT.origin } }), 'the real request', 'Bearer')
  t.same(handled, [], 'no handler ran')
})

t.test('registered with prefix \'/agent/\', GET /agent/api/health needs no token; the rest still does', async (t) => {
  const box = sandbox(t)
  for (const prefix of ['/agent/', '/agent', '/a/b/']) {
    const { app } = await buildWithRoutes(t, box, { apiToken: TOKEN, prefix, wrap: false })
    const base = prefix.replace(/\/$/, '')
    t.equal((await app.inject({ method: 'GET', url: `${base}/api/health` })).statusCode, 200, `prefix ${prefix}: health is open`)
    t.equal((await app.inject({ method: 'HEAD', url: `${base}/api/health` })).statusCode, 200, `prefix ${prefix}: HEAD health too`)
    checkUnauthorized(t, await app.inject({ method: 'POST', url: `${base}/api/session/start` }), `prefix ${prefix}: start`, 'Bearer')
    checkUnauthorized(t, await app.inject({ method: 'GET', url: `${base}/metrics` }), `prefix ${prefix}: metrics`, 'Bearer')
  }
})

t.test('health without the token shows only what the Janus client reads; with it, everything', async (t) => {
  const box = sandbox(t)
  const { app } = await buildWithRoutes(t, box, { apiToken: TOKEN })
  const janusFields = ['active_sessions', 'memory_usage_mb', 'status', 'uptime_seconds', 'version']
  for (const [what, headers] of [['no token', {}], ['a wrong token', { authorization: 'Bearer nope' }]] as const) {
    const res = await app.inject({ method: 'GET', url: '/api/health', headers })
    t.equal(res.statusCode, 200, what)
    t.same(Object.keys(res.json()).sort(), janusFields, `${what}: exactly the Janus fields`)
    t.notMatch(res.body, SIMULATOR, `${what}: no agent path`)
    t.notMatch(res.body, /fake|2026\.11/, `${what}: no agent version`)
  }
  const full = await app.inject({ method: 'GET', url: '/api/health', headers: AUTH })
  t.same(Object.keys(full.json()).sort(), [...janusFields, 'agent', 'busy_sessions', 'hibernated_sessions', 'reaper', 'store'].sort(), 'with the token: everything')
  t.equal(full.json().agent.binary, SIMULATOR)
  t.equal(full.json().agent.version, '2026.11.20-fake')
})

t.test('without API_TOKEN the API is open (the server only listens on loopback then)', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const res = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(res.statusCode, 200, res.body)
})

t.test('embedded under a prefix: the app\'s routes need the token, the host\'s own routes are untouched', async (t) => {
  const box = sandbox(t)
  const { app } = await buildWithRoutes(t, box, { apiToken: TOKEN, prefix: '/agents', wrap: false })
  t.equal((await app.inject({ method: 'GET', url: '/agents/api/health' })).statusCode, 200, 'prefixed health is open')
  checkUnauthorized(t, await app.inject({ method: 'POST', url: '/agents/api/session/start' }), 'prefixed start', 'Bearer')
  t.equal((await app.inject({ method: 'POST', url: '/agents/api/session/start', headers: AUTH })).statusCode, 200)

  const host = Fastify({ logger: false })
  host.get('/host-route', async () => ({ ok: true }))
  await host.register(async (instance, opts: AgentSessionsOptions) => { await agentSessions(instance, opts) }, {
    prefix: '/agents',
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    killGrace: '1s',
    apiToken: TOKEN,
    agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir }
  })
  await host.ready()
  t.after(() => host.close())
  t.equal((await host.inject({ method: 'GET', url: '/host-route' })).statusCode, 200, 'the host\'s route needs no token')
  t.equal((await host.inject({ method: 'POST', url: '/agents/api/session/start' })).statusCode, 401)
})
