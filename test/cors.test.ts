import t from 'tap'
import { build, sandbox } from './helpers/index.js'

const ALLOWED = 'http://localhost:5173'
const OTHER_ALLOWED = 'https://janus.example.com'
const DENIED = 'https://evil.example'

function preflight (origin: string, url = '/api/ask?session_id=x'): { method: 'OPTIONS', url: string, headers: Record<string, string> } {
  return {
    method: 'OPTIONS',
    url,
    headers: { origin, 'access-control-request-method': 'POST', 'access-control-request-headers': 'content-type,authorization' }
  }
}

t.test('CORS is off by default: no CORS headers, and a preflight is just an unknown route', async (t) => {
  const app = await build(t, sandbox(t))
  const pre = await app.inject(preflight(ALLOWED))
  t.equal(pre.statusCode, 404)
  t.equal(pre.json().error, 'NOT_FOUND')
  t.notOk(pre.headers['access-control-allow-origin'])
  const health = await app.inject({ method: 'GET', url: '/api/health', headers: { origin: ALLOWED } })
  t.equal(health.statusCode, 200)
  t.notOk(health.headers['access-control-allow-origin'])
})

t.test('CORS_ORIGINS as a list: allowed origins are echoed, others get no CORS headers', async (t) => {
  const app = await build(t, sandbox(t), { corsOrigins: `${ALLOWED}, ${OTHER_ALLOWED}` })
  t.same(app.agentSessionsConfig.corsOrigins, [ALLOWED, OTHER_ALLOWED])

  for (const origin of [ALLOWED, OTHER_ALLOWED]) {
    const pre = await app.inject(preflight(origin))
    t.equal(pre.statusCode, 204, `preflight from ${origin}`)
    t.equal(pre.headers['access-control-allow-origin'], origin)
    t.match(pre.headers['access-control-allow-methods'], /POST/)
    t.match(String(pre.headers['access-control-allow-headers']).toLowerCase(), /authorization/)
    t.match(String(pre.headers['access-control-allow-headers']).toLowerCase(), /content-type/)
    t.equal(pre.headers['access-control-max-age'], '600')
    t.match(pre.headers.vary, /Origin/, 'caches keep answers per origin')
    t.notOk(pre.headers['access-control-allow-credentials'])
  }

  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: { origin: ALLOWED, 'content-type': 'application/json' } })
  t.equal(start.statusCode, 200, start.body)
  t.equal(start.headers['access-control-allow-origin'], ALLOWED)
  t.match(start.headers['access-control-expose-headers'], /X-Request-ID/, 'scripts may read X-Request-ID')

  const deniedPre = await app.inject(preflight(DENIED))
  t.notOk(deniedPre.headers['access-control-allow-origin'], 'a denied preflight carries no Allow-Origin')
  const denied = await app.inject({ method: 'GET', url: '/api/health', headers: { origin: DENIED } })
  t.notOk(denied.headers['access-control-allow-origin'], 'a denied origin gets no Allow-Origin, so the browser blocks it')

  // Errors carry the headers too, so a browser client can read them.
  const missing = await app.inject({ method: 'POST', url: '/api/heartbeat?session_id=nope', headers: { origin: ALLOWED } })
  t.equal(missing.statusCode, 404)
  t.equal(missing.headers['access-control-allow-origin'], ALLOWED)
})

t.test('CORS_ORIGINS=* allows any origin', async (t) => {
  const app = await build(t, sandbox(t), { corsOrigins: '*' })
  const pre = await app.inject(preflight(DENIED))
  t.equal(pre.statusCode, 204)
  t.equal(pre.headers['access-control-allow-origin'], '*')
  const health = await app.inject({ method: 'GET', url: '/api/health', headers: { origin: DENIED } })
  t.equal(health.headers['access-control-allow-origin'], '*')
})

t.test('with API_TOKEN a preflight needs no token and a 401 still carries CORS headers', async (t) => {
  const app = await build(t, sandbox(t), { corsOrigins: [ALLOWED], apiToken: 'sesame' })
  const pre = await app.inject(preflight(ALLOWED))
  t.equal(pre.statusCode, 204)
  t.equal(pre.headers['access-control-allow-origin'], ALLOWED)
  const denied = await app.inject({ method: 'POST', url: '/api/session/start', headers: { origin: ALLOWED } })
  t.equal(denied.statusCode, 401)
  t.equal(denied.headers['access-control-allow-origin'], ALLOWED, 'the browser can read the 401')
})

t.test('CORS_ORIGINS from the environment, and bad values stop start-up naming the variable', async (t) => {
  const saved = process.env.CORS_ORIGINS
  t.after(() => {
    if (saved === undefined) delete process.env.CORS_ORIGINS
    else process.env.CORS_ORIGINS = saved
  })
  process.env.CORS_ORIGINS = OTHER_ALLOWED
  const app = await build(t, sandbox(t))
  const pre = await app.inject(preflight(OTHER_ALLOWED))
  t.equal(pre.headers['access-control-allow-origin'], OTHER_ALLOWED)
  delete process.env.CORS_ORIGINS

  for (const bad of ['https://janus.example.com/', 'janus.example.com', 'https://a.example/app', `*,${ALLOWED}`]) {
    await t.rejects(build(t, sandbox(t), { corsOrigins: bad }), /CORS_ORIGINS \(option corsOrigins\) must be \*/, JSON.stringify(bad))
  }
})
