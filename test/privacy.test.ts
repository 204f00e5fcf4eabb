// Questions and answers are about someone's code: at info (the production
// level) the logs carry only their sizes; debug may carry the text.

import t, { type Test } from 'tap'
import { Writable } from 'node:stream'
import { FakeDriver } from './helpers/fake-driver.js'
import { build, sandbox, waitFor } from './helpers/index.js'

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
