// Questions and answers are about someone's code: at info (the production
// level) the logs carry only their sizes; debug may carry the text.

import t, { type Test } from 'tap'
import { Writable } from 'node:stream'
import { FakeDriver } from './helpers/fake-driver.js'
import { agentWrapper, build, sandbox, SIMULATOR, waitFor } from './helpers/index.js'

interface Captured { lines: string[], records: Array<Record<string, unknown>> }

function capture (): { stream: Writable, captured: Captured } {
  const captured: Captured = { lines: [], records: [] }
  let pending = ''
  const stream = new Writable({
    write (chunk: Buffer, _encoding, done) {
      pending += String(chunk)
      let nl: number
      while ((nl = pending.indexOf('\n')) !== -1) {
        const line = pending.slice(0, nl)
        pending = pending.slice(nl + 1)
        captured.lines.push(line)
        try { captured.records.push(JSON.parse(line)) } catch {}
      }
      done()
    }
  })
  return { stream, captured }
}

// Every way a question's text could travel: answered, failed half-way, refused as too large, of the wrong type.
async function exercise (t: Test, level: string): Promise<{ captured: Captured, secret: string }> {
  const secret = `PRIVATE-${level}-${Math.random().toString(36).slice(2)}`
  const { stream, captured } = capture()
  const box = sandbox(t)
  const app = await build(t, box, { logger: { level, stream }, maxQuestionBytes: 2000 })
  const start = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(start.statusCode, 200)
  const id = start.json().session_id as string
  const url = `/api/ask?session_id=${id}`

  const answered = await app.inject({ method: 'POST', url, payload: { question: `what is ${secret}?` } })
  t.equal(answered.statusCode, 200)
  t.match(answered.json().answer, secret, 'the answer repeats the question, so it carries the secret too')

  const crashed = await app.inject({ method: 'POST', url, payload: { question: `crash on ${secret} [[fault:crash-mid-stream]]` } })
  t.equal(crashed.statusCode, 502)
  const tooBig = await app.inject({ method: 'POST', url, payload: { question: `${secret} ${'x'.repeat(3000)}` } })
  t.equal(tooBig.statusCode, 413)
  const wrongType = await app.inject({ method: 'POST', url, payload: { question: { text: secret } } })
  t.equal(wrongType.statusCode, 400)
  const extra = await app.inject({ method: 'POST', url, payload: { question: 'fine', note: secret } })
  t.ok(extra.statusCode < 500)
  await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })
  await app.close()
  return { captured, secret }
}

t.test('at info, neither questions nor answers are logged, only their sizes', async (t) => {
  const { captured, secret } = await exercise(t, 'info')
  t.ok(captured.lines.length > 5, `${captured.lines.length} log lines captured`)
  const leaks = captured.lines.filter((line) => line.includes(secret))
  t.same(leaks, [], 'no log line carries the question or answer text')
  const received = captured.records.find((r) => r.msg === 'question received')
  t.type(received?.questionBytes, 'number', 'the question\'s size is logged')
  const answered = captured.records.find((r) => r.msg === 'question answered')
  t.type(answered?.answerBytes, 'number', 'the answer\'s size is logged')
})

t.test('at debug, the text is there for whoever turned debug on', async (t) => {
  const { captured, secret } = await exercise(t, 'debug')
  const question = captured.records.find((r) => r.msg === 'question text')
  t.match(question?.question, secret, 'the question is logged at debug')
  const answer = captured.records.find((r) => r.msg === 'answer text')
  t.match(answer?.answer, secret, 'the answer is logged at debug')
  for (const record of captured.records) {
    if (JSON.stringify(record).includes(secret)) t.equal(record.level, 20, `only at debug: ${String(record.msg)}`)
  }
})

t.test('error replies carry a code and our own message; the agent\'s paths and error output go to the log only', async (t) => {
  const HOME_PATH = '/home/alice/.local/share/cursor-agent/versions/2026.11.20/index.js'
  // An agent that dies with a stack trace naming its home directory.
  const { bin } = agentWrapper(t, `if [ "$1" = "create-chat" ]; then exec "${process.execPath}" "${SIMULATOR}" "$@"; fi
cat >/dev/null
printf 'TypeError: Cannot read properties of undefined\\n    at run (${HOME_PATH}:1:2)\\n    at secret-token-in-stderr-93f1\\n' >&2
exit 3`)
  const { stream, captured } = capture()
  const box = sandbox(t)
  const app = await build(t, box, { logger: { level: 'info', stream }, cursorAgentBin: bin })
  const id = (await app.inject({ method: 'POST', url: '/api/session/start' })).json().session_id as string

  const crashed = await app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: 'crash please' } })
  t.equal(crashed.statusCode, 502)
  t.equal(crashed.json().error, 'PROCESS_COMMUNICATION_FAILED')
  t.equal(crashed.json().details, 'cursor-agent exited with code 3 without an answer; its error message is in the server log.')
  for (const leak of [HOME_PATH, '/home/alice', 'secret-token-in-stderr', 'TypeError', bin]) t.notMatch(crashed.body, leak, `the reply has no ${leak}`)
  const logged = captured.records.find((r) => r.msg === 'request failed' && JSON.stringify(r).includes('secret-token-in-stderr'))
  t.ok(logged, 'the agent\'s own words are in the log')
  t.match((logged?.diagnostics as Record<string, unknown>)?.agentMessage, HOME_PATH)
  t.equal((logged?.diagnostics as Record<string, unknown>)?.exitCode, 3)

  // A missing binary: the reply names the setting, the log names the path.
  const missing = await build(t, box, { logger: { level: 'info', stream }, cursorAgentBin: '/srv/private/tools/cursor-agent' })
  const refused = await missing.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(refused.statusCode, 502)
  t.equal(refused.json().error, 'PROCESS_SPAWN_FAILED')
  t.equal(refused.json().details, 'The agent program was not found: check CURSOR_AGENT_BIN on the server')
  t.notMatch(refused.body, '/srv/private', 'the reply has no path')
  const spawnLog = captured.records.find((r) => r.msg === 'request failed' && (r.diagnostics as Record<string, unknown> | undefined)?.bin === '/srv/private/tools/cursor-agent')
  t.equal((spawnLog?.diagnostics as Record<string, unknown>)?.spawnError, 'ENOENT', 'the log has the path and why')

  // A known failure keeps its code and our message, not the agent's text.
  const limited = await build(t, box, { logger: { level: 'info', stream }, agentEnv: { FAKE_AGENT_FAULTS: 'usage-limit' } })
  const usage = await limited.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(usage.json().error, 'AGENT_USAGE_LIMIT')
  t.equal(usage.json().details, 'The Cursor account has hit its usage limit')
  const usageLog = captured.records.find((r) => r.msg === 'request rejected' && r.code === 'AGENT_USAGE_LIMIT')
  t.match((usageLog?.diagnostics as Record<string, unknown>)?.agentMessage, /Upgrade to Pro/, 'a 4xx logs the agent\'s words too')
})

t.test('"question received" is logged once per question a session took, never for refused ones', async (t) => {
  const { stream, captured } = capture()
  const driver = new FakeDriver()
  const app = await build(t, sandbox(t), { driver, logger: { level: 'info', stream } })
  const received = (): Array<Record<string, unknown>> => captured.records.filter((r) => r.msg === 'question received')
  const askOn = (id: string, question: string) => app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question } })
  const id = (await app.inject({ method: 'POST', url: '/api/session/start' })).json().session_id as string

  t.equal((await askOn('6b1c1a7e-0000-4000-8000-000000000000', 'anyone there?')).statusCode, 404)
  t.same(received(), [], 'not for an unknown session')

  const first = askOn(id, 'the first question')
  await waitFor(() => driver.turns.length === 1, 'the first turn')
  t.equal(received().length, 1, 'logged once the session took it')
  for (let i = 0; i < 3; i++) t.equal((await askOn(id, 'me too')).statusCode, 409)
  t.equal(received().length, 1, 'not for questions refused as busy')
  driver.turns[0].answer('one')
  driver.turns[0].finish()
  t.equal((await first).statusCode, 200)

  await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })
  t.equal((await askOn(id, 'still there?')).statusCode, 404)
  t.equal(received().length, 1, 'not for an ended session')
  t.match(received()[0], { level: 30, sessionId: id, questionBytes: Buffer.byteLength('the first question') })
  t.notOk(JSON.stringify(received()[0]).includes('the first question'), 'the text stays out of info logs')
})
