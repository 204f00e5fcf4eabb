// Settings: durations, validation messages that name the variable, and the
// rule that plugin options win over the environment.

import t from 'tap'
import Fastify from 'fastify'
import { parseDuration } from '../lib/config.js'
import { liftDecorators, SIMULATOR } from './helpers/index.js'

t.test('durations', async (t) => {
  t.equal(parseDuration('500ms'), 500)
  t.equal(parseDuration('30s'), 30_000)
  t.equal(parseDuration('10m'), 600_000)
  t.equal(parseDuration('1h'), 3_600_000)
  t.equal(parseDuration('1.5s'), 1500)
  t.equal(parseDuration('250'), 250)
  t.equal(parseDuration(' 2m '), 120_000)
  t.equal(parseDuration(42), 42)
  for (const bad of ['', 'soon', '10 minutes', '-5s', '1d', 's', '1e3']) t.equal(parseDuration(bad), undefined, JSON.stringify(bad))
  t.equal(parseDuration(-1), undefined)
  t.equal(parseDuration(Number.NaN), undefined)
})

async function configOf (options: Record<string, unknown>): Promise<Record<string, unknown>> {
  const app = Fastify()
  await app.register(liftDecorators, { cursorAgentBin: SIMULATOR, ...options })
  await app.ready()
  const config = { ...app.agentSessionsConfig }
  await app.close()
  return config
}

t.test('defaults match the design', async (t) => {
  const saved = { ...process.env }
  t.teardown(() => { process.env = saved })
  for (const name of ['SESSION_TIMEOUT', 'CLEANUP_INTERVAL', 'KILL_GRACE', 'ASK_TIMEOUT', 'MAX_SESSIONS', 'KILL_SIGNAL', 'MAX_SESSION_TIMEOUT']) delete process.env[name]
  t.match(await configOf({}), {
    sessionTimeoutMs: 600_000,
    cleanupIntervalMs: 60_000,
    killGraceMs: 5000,
    killSignal: 'SIGTERM',
    askTimeoutMs: 60_000,
    maxSessions: 100,
    maxSessionTimeoutMs: 86_400_000,
    agentTrust: true,
    agentForce: false,
    workspaceDir: process.cwd()
  })
})

t.test('the environment configures; options given in code win over it', async (t) => {
  const saved = { ...process.env }
  t.teardown(() => { process.env = saved })
  process.env.SESSION_TIMEOUT = '3m'
  process.env.MAX_SESSIONS = '7'
  process.env.AGENT_FORCE = 'true'
  t.match(await configOf({}), { sessionTimeoutMs: 180_000, maxSessions: 7, agentForce: true })
  t.match(await configOf({ sessionTimeout: '45s', maxSessions: 3, agentForce: false }), { sessionTimeoutMs: 45_000, maxSessions: 3, agentForce: false })
  t.match(await configOf({ sessionTimeout: 1234 }), { sessionTimeoutMs: 1234 }, 'a number option is milliseconds')
})

t.test('a bad value stops start-up with a message naming the variable and the option', async (t) => {
  const cases: Array<[Record<string, unknown>, RegExp]> = [
    [{ sessionTimeout: 'soon' }, /SESSION_TIMEOUT \(option sessionTimeout\) must be a duration/],
    [{ killGrace: '5 seconds' }, /KILL_GRACE \(option killGrace\) must be a duration/],
    [{ maxSessions: 0 }, /MAX_SESSIONS \(option maxSessions\) must be at least 1/],
    [{ maxSessions: 'many' }, /MAX_SESSIONS \(option maxSessions\) must be a whole number/],
    [{ killSignal: 'SIGKILL' }, /KILL_SIGNAL \(option killSignal\) must be one of SIGTERM/],
    [{ agentForce: 'maybe' }, /AGENT_FORCE \(option agentForce\) must be true or false/],
    [{ workspaceDir: '/nonexistent/place' }, /WORKSPACE_DIR \(option workspaceDir\) must be an existing directory/],
    [{ sessionTimeout: '2h', maxSessionTimeout: '1h' }, /SESSION_TIMEOUT must not exceed MAX_SESSION_TIMEOUT/]
  ]
  for (const [options, message] of cases) {
    await t.rejects(configOf(options), { message }, JSON.stringify(options))
  }
})

t.test('a bad server-only setting names the variable alone: it has no option', async (t) => {
  const saved = { ...process.env }
  t.teardown(() => { process.env = saved })
  const cases: Array<[Record<string, string>, RegExp]> = [
    [{ PORT: 'http' }, /^Invalid configuration: PORT must be a whole number, got "http"$/],
    [{ PORT: '70000' }, /^Invalid configuration: PORT must be between 0 and 65535, got "70000"$/],
    [{ LOG_LEVEL: 'loud' }, /^Invalid configuration: LOG_LEVEL must be one of fatal, error, warn, info, debug, trace, silent, got "loud"$/],
    [{ ALLOW_UNAUTHENTICATED_NON_LOOPBACK: 'yes' }, /^Invalid configuration: ALLOW_UNAUTHENTICATED_NON_LOOPBACK must be one of i-understand, got "yes"$/]
  ]
  for (const [env, message] of cases) {
    process.env = { ...saved, ...env }
    await t.rejects(configOf({}), { message }, JSON.stringify(env))
  }
})

t.test('a relative CURSOR_AGENT_BIN is relative to the server, not to WORKSPACE_DIR', async (t) => {
  const { tmpdir } = await import('node:os')
  const { relative } = await import('node:path')
  const config = await configOf({ cursorAgentBin: './' + relative(process.cwd(), SIMULATOR), workspaceDir: tmpdir() })
  t.equal(config.cursorAgentBin, SIMULATOR)
  t.equal((await configOf({ cursorAgentBin: 'cursor-agent' })).cursorAgentBin, 'cursor-agent', 'a bare name stays a PATH lookup')
})
