// The agent runs shell commands in the workspace: whatever is in its
// environment, a question can print. The service's own settings (API_TOKEN
// above all) and NODE_OPTIONS must not reach it; what cursor-agent needs must.
// The simulator answers `[[show:env]]` with its whole environment as JSON.

import t from 'tap'
import { SETTINGS } from '../lib/config.js'
import { build, sandbox } from './helpers/index.js'

const TOKEN = 'secret-token-must-not-reach-the-agent-7f3a9c'
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
  NODE_OPTIONS: SERVICE_NODE_OPTIONS
}
Object.assign(process.env, serviceEnv, {
  CURSOR_API_KEY: CURSOR_KEY,
  AGENT_SESSIONS_TEST_UNRELATED: 'passes-through'
})

t.test('the agent gets PATH, HOME and CURSOR_API_KEY, never API_TOKEN or another service setting', async (t) => {
  t.ok(process.env.PATH, 'PATH is set in the server')
  t.ok(process.env.HOME, 'HOME is set in the server')
  const box = sandbox(t)
  const app = await build(t, box, { agentEnv: { EXTRA_FOR_AGENT: 'from-agentEnv' } })
  t.equal(app.agentSessionsConfig.apiToken, TOKEN, 'the service itself read API_TOKEN from the environment')
  // tap's process-info hook copies the test process's NODE_OPTIONS into every
  // child spawned without one; the service captured its environment above, so
  // drop ours now: only a leak by the service can put it in the agent's.
  delete process.env.NODE_OPTIONS
  const auth = { authorization: `Bearer ${TOKEN}` }

  const start = await app.inject({ method: 'POST', url: '/api/session/start', headers: auth })
  t.equal(start.statusCode, 200, start.body)
  const id = start.json().session_id as string
  const res = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, headers: auth, payload: { question: 'env please [[show:env]]' } })
  t.equal(res.statusCode, 200, res.body.slice(0, 300))
  const answer = res.json().answer as string
  const env = JSON.parse(answer) as Record<string, string>

  t.equal(env.PATH, process.env.PATH, 'PATH reaches the agent')
  t.equal(env.HOME, process.env.HOME, 'HOME reaches the agent')
  t.equal(env.CURSOR_API_KEY, CURSOR_KEY, 'CURSOR_API_KEY reaches the agent')
  t.equal(env.AGENT_SESSIONS_TEST_UNRELATED, 'passes-through', 'the rest of the environment reaches the agent')
  t.equal(env.EXTRA_FOR_AGENT, 'from-agentEnv', 'agentEnv is added')

  for (const name of Object.keys(serviceEnv)) {
    if (name === 'NODE_OPTIONS') continue
    t.notOk(name in env, `${name} is withheld`)
  }
  t.notMatch(env.NODE_OPTIONS ?? '', /max-old-space-size/, `the service's NODE_OPTIONS is withheld (the agent has ${JSON.stringify(env.NODE_OPTIONS)})`)
  for (const setting of SETTINGS) {
    t.notOk(setting.env in env, `setting ${setting.env} is withheld`)
  }
  t.notOk(answer.includes(TOKEN), 'the token appears nowhere in the agent\'s environment, under any name')
})
