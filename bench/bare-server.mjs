// The baseline of the standalone heartbeat benchmark: a bare Fastify server in
// a process of its own, run by plain `node` like `node dist/server.js` (no
// TypeScript loader), with Fastify's own logger (pino) at the same LOG_LEVEL,
// answering POST /api/heartbeat with the same JSON after the same Map lookup.
// Nothing else: default request ids, no hooks, no schemas.
//
// Environment: PORT, HOST (127.0.0.1), LOG_LEVEL (info), BARE_SESSIONS (how
// many entries the Map holds). Prints the ids it holds as one JSON line on fd 3
// (when open), so the benchmark can heartbeat one of them; logs go to stdout.
//
// BARE_BESIDE=app: the same bare route, with the whole app (dist/app.js)
// also registered in this process on a second Fastify instance that never
// listens, with BARE_SESSIONS sessions started through it (the agent and
// STATE_DIR come from the environment, as for the standalone server). Its
// heartbeats then run no line of the app, yet in a process that has loaded it,
// spawned agents and written its store: what that alone costs a request
// (V8's feedback for Node's stream and event code is shared by the whole
// process) is the difference to the plain bare server.
//
// BARE_BESIDE=ordinary-app: the same, with an ordinary Fastify app of the same
// size instead (bench/ordinary-app.mjs: no code of this project), with
// ORDINARY_APP_ROUTES routes, each called 20 times: what any such app costs
// the route.

import { randomUUID } from 'node:crypto'
import { writeSync } from 'node:fs'
import { setFlagsFromString } from 'node:v8'
import Fastify from 'fastify'

const beside = process.env.BARE_BESIDE ?? ''
if (!['', 'app', 'ordinary-app'].includes(beside)) throw new Error(`BARE_BESIDE must be app or ordinary-app, not ${beside}`)

const sessions = Number(process.env.BARE_SESSIONS ?? '1')
const map = new Map()
for (let i = 0; i < sessions; i++) {
  const id = Buffer.from(randomUUID(), 'latin1').toString('latin1')
  map.set(id, { id, state: 'idle', lastActivity: Date.now(), idleTimeoutMs: 600_000 })
}

const app = Fastify({ logger: { level: process.env.LOG_LEVEL ?? 'info' } })
app.post('/api/heartbeat', async (request, reply) => {
  const session = map.get(request.query.session_id ?? '')
  if (session === undefined) return await reply.code(404).send({ error: 'SESSION_NOT_FOUND' })
  session.lastActivity = Date.now()
  return {
    message: 'Heartbeat received',
    session_id: session.id,
    last_activity: new Date(session.lastActivity).toISOString(),
    idle_timeout_seconds: session.idleTimeoutMs / 1000,
    expires_at: new Date(session.lastActivity + session.idleTimeoutMs).toISOString()
  }
})

let idleApp
// As server.ts does, so the processes differ only in where the heartbeat is answered.
if (beside !== '') setFlagsFromString('--no-allocation-site-pretenuring')
if (beside === 'ordinary-app') {
  // Imported only here: the plain bare server loads nothing but Fastify.
  const { startOrdinaryApp } = await import('./ordinary-app.mjs')
  const routes = Number(process.env.ORDINARY_APP_ROUTES)
  if (!Number.isInteger(routes) || routes < 1) throw new Error(`ORDINARY_APP_ROUTES must be a positive integer, not ${process.env.ORDINARY_APP_ROUTES}`)
  idleApp = await startOrdinaryApp(routes, 20)
}
if (beside === 'app') {
  const { default: agentSessions } = await import('../dist/app.js')
  idleApp = Fastify({ logger: false })
  await idleApp.register(agentSessions)
  await idleApp.ready()
  for (let i = 0; i < sessions; i++) {
    const res = await idleApp.inject({ method: 'POST', url: '/api/session/start' })
    if (res.statusCode !== 200) throw new Error(`the app beside the bare route answered a start with ${res.statusCode}: ${res.body}`)
  }
}

await app.listen({ host: process.env.HOST ?? '127.0.0.1', port: Number(process.env.PORT ?? '0') })
try {
  writeSync(3, JSON.stringify({ ids: [...map.keys()] }) + '\n')
} catch {}
// Close on a signal like the standalone server does (and so a --cpu-prof profile is written).
for (const signal of ['SIGINT', 'SIGTERM']) {
  process.once(signal, () => { void Promise.all([app.close(), idleApp?.close()]).then(() => process.exit(0)) })
}
