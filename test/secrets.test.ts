// The agent runs shell commands in the workspace: whatever is in its
// environment, a question can print. Its environment is an allow-list: a base
// set (PATH, HOME, USER, LOGNAME, SHELL, LANG, LC_*, TZ, TERM, TMPDIR), the
// names in AGENT_ENV_PASS, the driver's own credentials (CURSOR_API_KEY) and
// agentEnv. Nothing else: not the service's settings (API_TOKEN above all),
// not NODE_OPTIONS, not an embedding host's own secrets.
// The simulator answers `[[show:env]]` with its whole environment as JSON.

import t from 'tap'
import { SETTINGS } from '../lib/config.js'
import { agentEnvironment, BASE_ENV_NAMES } from '../lib/processes/environment.js'
import { build, sandbox } from './helpers/index.js'

const TOKEN = 'secret-token-must-not-reach-the-agent-7f3a9c'
const HOST_SECRET = 'host-app-secret-the-agent-must-not-see-41d2'
const CURSOR_KEY = 'key_test_cursor_api_key_for_the_agent'
const SERVICE_NODE_OPTIONS = '--max-old-space-size=3072'

// The service reads these from the environment (this file runs in its own process).
const serviceEnv: Record<string, string> = {
  API_TOKEN: TOKEN,
  HOST: '127.0.0.1',
  PORT: '3999',
  LOG_LEVEL: 'warn',
  SESSION_TIMEOUT: '10m',
  MAX_SESSIONS: '50',
  START_RATE_LIMIT: '100',
  ALLOW_UNAUTHENTICATED_NON_LOOPBACK: 'i-understand',
  AGENT_ENV_PASS: 'AGENT_SESSIONS_TEST_PASSED, HTTPS_PROXY',
  NODE_OPTIONS: SERVICE_NODE_OPTIONS
}
const inBase: Record<string, string> = { LANG: 'C.UTF-8', LC_ALL: 'C.UTF-8', LC_MESSAGES: 'C', TZ: 'Europe/Paris', TERM: 'xterm-256color', TMPDIR: '/tmp', SHELL: '/bin/sh' }
const notAllowed: Record<string, string> = {
  // An embedder's host reads its own token from here and hands it over as apiToken.
  AGENT_API_TOKEN: HOST_SECRET,
  DATABASE_URL: `postgres://app:${HOST_SECRET}@db/app`,
  AWS_SECRET_ACCESS_KEY: HOST_SECRET,
  AGENT_SESSIONS_TEST_UNRELATED: 'must-not-pass',
  LC: 'not a locale variable',
  XLC_ALL: 'not a locale variable either'
}
Object.assign(process.env, serviceEnv, inBase, notAllowed, {
  CURSOR_API_KEY: CURSOR_KEY,
  AGENT_SESSIONS_TEST_PASSED: 'passed-by-name',
  HTTPS_PROXY: 'http://proxy.example:3128'
})

t.test('the agent gets the base set, AGENT_ENV_PASS, CURSOR_API_KEY and agentEnv; nothing else', async (t) => {
  t.ok(process.env.PATH, 'PATH is set in the server')
  t.ok(process.env.HOME, 'HOME is set in the server')
  const box = sandbox(t)
  // The README's embedding: the host's own token, read from its environment, becomes apiToken.
  const app = await build(t, box, { apiToken: process.env.AGENT_API_TOKEN, agentEnv: { EXTRA_FOR_AGENT: 'from-agentEnv' } })
  t.equal(app.agentSessionsConfig.apiToken, HOST_SECRET, 'the option beat API_TOKEN from the environment')
  t.same(app.agentSessionsConfig.agentEnvPass, ['AGENT_SESSIONS_TEST_PASSED', 'HTTPS_PROXY'], 'AGENT_ENV_PASS read from the environment')
  // tap's process-info hook copies the test process's NODE_OPTIONS into every
  // child spawned without one; the service captured its environment above, so
  // drop ours now: only a leak by the service can put it in the agent's.
  delete process.env.NODE_OPTIONS
  const auth = { authorization: `Bearer ${HOST_SECRET}` }

  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: auth })
  t.equal(start.statusCode, 200, start.body)
  const id = start.json().session_id as string
  const res = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, headers: auth, payload: { question: 'env please [[show:env]]' } })
  t.equal(res.statusCode, 200, res.body.slice(0, 300))
  const answer = res.json().answer as string
  const env = JSON.parse(answer) as Record<string, string>

  t.equal(env.PATH, process.env.PATH, 'PATH reaches the agent')
  t.equal(env.HOME, process.env.HOME, 'HOME reaches the agent')
  for (const [name, value] of Object.entries(inBase)) t.equal(env[name], value, `${name} reaches the agent`)
  t.equal(env.CURSOR_API_KEY, CURSOR_KEY, 'CURSOR_API_KEY reaches the agent')
  t.equal(env.AGENT_SESSIONS_TEST_PASSED, 'passed-by-name', 'a name in AGENT_ENV_PASS reaches the agent')
  t.equal(env.HTTPS_PROXY, 'http://proxy.example:3128', 'so does the other one')
  t.equal(env.EXTRA_FOR_AGENT, 'from-agentEnv', 'agentEnv is added')

  for (const name of Object.keys(notAllowed)) t.notOk(name in env, `${name} is not passed`)
  for (const name of Object.keys(serviceEnv)) {
    if (name === 'NODE_OPTIONS') continue
    t.notOk(name in env, `${name} is withheld`)
  }
  t.notMatch(env.NODE_OPTIONS ?? '', /max-old-space-size/, `the service's NODE_OPTIONS is withheld (the agent has ${JSON.stringify(env.NODE_OPTIONS)})`)
  for (const setting of SETTINGS) t.notOk(setting.env in env, `setting ${setting.env} is withheld`)
  t.notOk(answer.includes(TOKEN), 'API_TOKEN appears nowhere in the agent\'s environment, under any name')
  t.notOk(answer.includes(HOST_SECRET), 'nor does the host\'s own secret')
  // What is there, and only that: the simulator's own state dir came through agentEnv.
  const expected = new Set([...BASE_ENV_NAMES, ...Object.keys(inBase), 'CURSOR_API_KEY', 'AGENT_SESSIONS_TEST_PASSED', 'HTTPS_PROXY',
    'EXTRA_FOR_AGENT', 'FAKE_AGENT_STATE_DIR'])
  // tap's process-info hook adds NODE_OPTIONS and its _TAPJS_* variables to every child this process spawns.
  const unexpected = Object.keys(env).filter((name) => !expected.has(name) && !name.startsWith('LC_') && name !== 'NODE_OPTIONS' && !name.startsWith('_TAPJS_'))
  t.same(unexpected, [], 'no other variable reached the agent')
})

t.test('agentEnvironment is the allow-list any driver uses, with its own credential names', async (t) => {
  const source = { PATH: '/bin', HOME: '/root', USER: 'root', LOGNAME: 'root', LC_TIME: 'C', OPENAI_API_KEY: 'k', SECRET: 's', GEMINI_API_KEY: 'g' }
  t.same(agentEnvironment(source), { PATH: '/bin', HOME: '/root', USER: 'root', LOGNAME: 'root', LC_TIME: 'C' }, 'the base set only')
  t.same(agentEnvironment(source, { pass: ['GEMINI_API_KEY'] }), { PATH: '/bin', HOME: '/root', USER: 'root', LOGNAME: 'root', LC_TIME: 'C', GEMINI_API_KEY: 'g' },
    'a driver names its own credentials')
  t.same(agentEnvironment(source, { extra: { PATH: '/opt/bin', X: '1' } }).PATH, '/opt/bin', 'extra wins')
  const asUser = agentEnvironment(source, { user: { uid: 1001, gid: 1001, name: 'agent', home: '/home/agent' } })
  t.match(asUser, { HOME: '/home/agent', USER: 'agent', LOGNAME: 'agent' }, 'HOME, USER and LOGNAME describe the agent user')
  const unknown = agentEnvironment(source, { user: { uid: 1234, gid: 1234 } })
  t.notOk('HOME' in unknown || 'USER' in unknown || 'LOGNAME' in unknown, 'a uid the user database does not list gets none of the server\'s')
  t.equal(agentEnvironment(source, { user: { uid: 1001, gid: 1001, name: 'agent', home: '/home/agent' }, extra: { HOME: '/srv/agent' } }).HOME, '/srv/agent',
    'unless the operator sets them')
})

t.test('AGENT_ENV_PASS takes variable names, never the service\'s own settings', async (t) => {
  const box = sandbox(t)
  for (const [value, message] of [
    ['API_TOKEN', /AGENT_ENV_PASS \(option agentEnvPass\) must be names of variables for the agent, not the service's own settings, got "API_TOKEN"/],
    ['FOO,API_TOKEN_FILE', /not the service's own settings, got "API_TOKEN_FILE"/],
    ['FOO BAR', /AGENT_ENV_PASS \(option agentEnvPass\) must be a comma-separated list of environment variable names, got "FOO BAR"/],
    ['1ABC', /environment variable names, got "1ABC"/]
  ] as const) {
    await t.rejects(build(t, box, { agentEnvPass: value }), { message }, value)
  }
  const app = await build(t, box, { agentEnvPass: ['A_B', 'c'] })
  t.same(app.agentSessionsConfig.agentEnvPass, ['A_B', 'c'], 'an array of names works as an option')
})
