// The built standalone server behind proxies (TRUST_PROXY). `npm test` builds
// dist/ before tap runs.

import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import envSchema from 'env-schema'
import { envJsonSchema, resolveConfig } from '../lib/config.js'
import { ROOT, sandbox } from './helpers/index.js'
import { cleanEnv, SERVER, startServer as startServerProcess, type ServerProcess } from './helpers/server-process.js'

interface Server extends ServerProcess { port: number }

/** The built server with the simulator keeping its chats in this test's sandbox. */
async function startServer (t: Test, env: Record<string, string>): Promise<Server> {
  const box = sandbox(t)
  const server = await startServerProcess(t, { env: { FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR', ...env } })
  return { ...server, port: Number(new URL(server.url).port) }
}

t.before(() => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
})

t.test('TRUST_PROXY: behind the listed proxy X-Forwarded-For is the client; otherwise it is ignored', async (t) => {
  for (const [trust, separate] of [['127.0.0.1', true], ['10.0.0.0/8', false], ['', false]] as const) {
    const server = await startServer(t, { MAX_SESSIONS_PER_CLIENT: '1', ...(trust === '' ? {} : { TRUST_PROXY: trust }) })
    const start = async (client: string): Promise<number> => (await fetch(`${server.url}/api/session/start`, { method: 'POST', headers: { 'x-forwarded-for': client } })).status
    t.equal(await start('203.0.113.1'), 200, `TRUST_PROXY=${trust}: first client`)
    t.equal(await start('203.0.113.1'), 503, `TRUST_PROXY=${trust}: its second session`)
    t.equal(await start('203.0.113.2'), separate ? 200 : 503, `TRUST_PROXY=${trust}: another X-Forwarded-For ${separate ? 'is another client' : 'is ignored'}`)
    server.proc.kill('SIGTERM')
  }
  // The server refuses to start on a bad value (the others are checked in-process below).
  for (const [value, message] of [['true', /Invalid configuration: TRUST_PROXY must be a hop count, or a comma-separated list of proxy addresses or CIDRs .*got "true"/]] as const) {
    const proc = spawn(process.execPath, [SERVER], { cwd: ROOT, env: cleanEnv({ PORT: '0', TRUST_PROXY: value }), stdio: ['ignore', 'pipe', 'pipe'] })
    let stderr = ''
    proc.stderr.on('data', (chunk: Buffer) => { stderr += String(chunk) })
    t.equal(await new Promise((resolve) => proc.once('exit', resolve)), 1, `TRUST_PROXY=${value} is refused`)
    t.match(stderr, message)
  }
  for (const [value, message] of [['10.0.0.0/33', /TRUST_PROXY .*got "10.0.0.0\/33"/], ['0', /TRUST_PROXY .*hop count from 1 to 100/],
    ['10.0.0.1/8/2', /TRUST_PROXY .*got "10.0.0.1\/8\/2"/], ['proxy.example', /TRUST_PROXY .*got "proxy.example"/]] as const) {
    t.throws(() => resolveConfig(envSchema({ schema: structuredClone(envJsonSchema), data: { TRUST_PROXY: value }, dotenv: false })), { message }, value)
  }
  t.same(resolveConfig(envSchema({ schema: structuredClone(envJsonSchema), data: { TRUST_PROXY: '10.0.0.0/8, ::1,loopback' }, dotenv: false })).trustProxy,
    ['10.0.0.0/8', '::1', 'loopback'])
  t.equal(resolveConfig(envSchema({ schema: structuredClone(envJsonSchema), data: { TRUST_PROXY: '2' }, dotenv: false })).trustProxy, 2)
})
