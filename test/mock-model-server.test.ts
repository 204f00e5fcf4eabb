// Pins test/fixtures/mock-model-server.mjs: the real-agent tests and the
// benchmarks trust it to speak both providers' streams, to log what it gets,
// and to stream slowly or hang on demand.

import t, { type Test } from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { gzipSync } from 'node:zlib'
import { answerFor, sampleFromSchema, startMockModel, type MockModel } from './fixtures/mock-model-server.mjs'

const SCRIPT = fileURLToPath(new URL('./fixtures/mock-model-server.mjs', import.meta.url))

interface SseEvent { event?: string, data: any }

/** Reads an SSE body; onEvent sees each event as it arrives. */
async function readSse (res: Response, onEvent: (e: SseEvent) => void = () => {}): Promise<SseEvent[]> {
  const events: SseEvent[] = []
  const decoder = new TextDecoder()
  let buf = ''
  for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) {
    buf += decoder.decode(chunk, { stream: true }).replaceAll('\r\n', '\n')
    let i
    while ((i = buf.indexOf('\n\n')) !== -1) {
      const block = buf.slice(0, i)
      buf = buf.slice(i + 2)
      const e: SseEvent = { data: undefined }
      for (const line of block.split('\n')) {
        if (line.startsWith('event: ')) e.event = line.slice(7)
        if (line.startsWith('data: ')) e.data = JSON.parse(line.slice(6))
      }
      events.push(e)
      onEvent(e)
    }
  }
  return events
}

async function mock (t: Test, options = {}): Promise<MockModel> {
  const m = await startMockModel(options)
  t.after(() => m.close())
  return m
}

function openaiBody (...userTexts: string[]): object {
  return {
    model: 'gpt-5.4-mini',
    stream: true,
    input: [
      { type: 'message', role: 'developer', content: [{ type: 'input_text', text: 'be brief' }] },
      ...userTexts.flatMap((text, i) => [
        { type: 'message', role: 'user', content: [{ type: 'input_text', text }] },
        ...(i < userTexts.length - 1 ? [{ type: 'message', role: 'assistant', content: [{ type: 'output_text', text: answerFor(text) }] }] : [])
      ])
    ]
  }
}

function geminiBody (...userTexts: string[]): object {
  return {
    contents: userTexts.flatMap((text, i) => [
      // gemini-cli puts its session context in an earlier part of the first turn.
      { role: 'user', parts: i === 0 ? [{ text: '<session_context>cwd</session_context>' }, { text }] : [{ text }] },
      ...(i < userTexts.length - 1 ? [{ role: 'model', parts: [{ text: answerFor(text) }] }] : [])
    ])
  }
}

const post = (url: string, body: unknown, headers: Record<string, string> = {}): Promise<Response> =>
  fetch(url, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify(body) })

t.test('OpenAI Responses stream: the events codex-acp needs, the answer in several deltas, usage', async (t) => {
  const m = await mock(t)
  const res = await post(`${m.url}/v1/responses`, openaiBody('first question', 'second question'))
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^text\/event-stream/)
  const events = await readSse(res)
  const types = events.map((e) => e.event)
  t.same(types.filter((x) => !['response.in_progress', 'response.content_part.added', 'response.content_part.done', 'response.output_text.done', 'response.output_text.delta'].includes(x!)),
    ['response.created', 'response.output_item.added', 'response.output_item.done', 'response.completed'])
  for (const e of events) t.equal(e.data.type, e.event, 'data.type repeats the event name')
  const deltas = events.filter((e) => e.event === 'response.output_text.delta').map((e) => e.data.delta)
  t.ok(deltas.length >= 3, 'streamed in several deltas')
  t.equal(deltas.join(''), answerFor('second question'), 'answers the LAST user message')
  t.equal(deltas.join(''), 'Mock answer: you said "second question".')
  const done = events.find((e) => e.event === 'response.output_item.done')!.data
  t.equal(done.item.content[0].text, deltas.join(''))
  const completed = events.at(-1)!.data
  t.equal(completed.response.status, 'completed')
  t.equal(completed.response.id, events[0].data.response.id)
  t.ok(completed.response.usage.total_tokens > 0)

  const [logged] = m.requests()
  t.equal(logged.method, 'POST')
  t.equal(logged.path, '/v1/responses')
  t.equal(logged.api, 'openai-responses')
  t.same(logged.body, openaiBody('first question', 'second question'), 'the parsed body is logged')
})

t.test('Gemini: streamGenerateContent (SSE and JSON array), generateContent with a JSON schema, countTokens', async (t) => {
  const m = await mock(t)
  const q = 'what is in this repo?'
  const res = await post(`${m.url}/v1beta/models/gemini-x:streamGenerateContent?alt=sse`, geminiBody('earlier', q))
  t.equal(res.status, 200)
  const events = await readSse(res)
  const text = events.map((e) => e.data.candidates[0].content.parts[0].text).join('')
  t.ok(events.length >= 3)
  t.equal(text, answerFor(q), 'the last text part of the last user turn')
  t.equal(events.at(-1)!.data.candidates[0].finishReason, 'STOP')
  t.ok(events.at(-1)!.data.usageMetadata.totalTokenCount > 0)

  const arr = await post(`${m.url}/v1beta/models/gemini-x:streamGenerateContent`, geminiBody(q))
  const chunks = await arr.json() as any[]
  t.equal(chunks.map((c) => c.candidates[0].content.parts[0].text).join(''), answerFor(q))

  const plain = await (await post(`${m.url}/v1beta/models/gemini-x:generateContent`, geminiBody(q))).json() as any
  t.equal(plain.candidates[0].content.parts[0].text, answerFor(q))

  // gemini-cli's model router asks for a JSON verdict: the answer must satisfy the schema.
  const schema = {
    type: 'OBJECT',
    properties: { complexity_reasoning: { type: 'STRING' }, complexity_score: { type: 'INTEGER' }, next_speaker: { type: 'string', enum: ['user', 'model'] } },
    required: ['complexity_reasoning', 'complexity_score']
  }
  const json = await (await post(`${m.url}/v1beta/models/gemini-x:generateContent`, {
    ...geminiBody(q), generationConfig: { responseMimeType: 'application/json', responseJsonSchema: schema }
  })).json() as any
  t.same(JSON.parse(json.candidates[0].content.parts[0].text), { complexity_reasoning: 'mock', complexity_score: 1, next_speaker: 'user' })

  const count = await (await post(`${m.url}/v1beta/models/gemini-x:countTokens`, geminiBody(q))).json() as any
  t.ok(count.totalTokens > 0)

  t.same(m.requests().map((r) => [r.api, r.model, r.query]), [
    ['gemini-streamGenerateContent', 'gemini-x', { alt: 'sse' }],
    ['gemini-streamGenerateContent', 'gemini-x', {}],
    ['gemini-generateContent', 'gemini-x', {}],
    ['gemini-generateContent', 'gemini-x', {}],
    ['gemini-countTokens', 'gemini-x', {}]
  ])
  t.equal(m.modelRequests().length, 4, 'countTokens is not a model turn')
})

t.test('sampleFromSchema honours enum, minimum, nested objects and arrays', async (t) => {
  t.same(sampleFromSchema({ type: 'object', properties: { a: { type: 'number', minimum: 5 }, b: { type: 'array' }, c: { properties: { d: { type: 'boolean' } } } } }),
    { a: 5, b: [], c: { d: false } })
  t.equal(sampleFromSchema({ anyOf: [{ type: 'string', enum: ['x'] }] }), 'x')
})

t.test('unknown paths answer 404 and are logged; a gzip body is decoded', async (t) => {
  const m = await mock(t)
  const res = await fetch(`${m.url}/v1/nothing-here`)
  t.equal(res.status, 404)
  const gz = await fetch(`${m.url}/v1/responses`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
    body: gzipSync(JSON.stringify(openaiBody('zipped')))
  })
  const events = await readSse(gz)
  t.equal(events.filter((e) => e.event === 'response.output_text.delta').map((e) => e.data.delta).join(''), answerFor('zipped'))
  t.same(m.requests().map((r) => [r.method, r.path, r.api]), [['GET', '/v1/nothing-here', null], ['POST', '/v1/responses', 'openai-responses']])
  m.clear()
  t.same(m.requests(), [])
})

t.test('delay: a pause before every delta, set per server and changed at run time', async (t) => {
  const m = await mock(t, { delayMs: 0 })
  m.setDelay(150)
  const started = performance.now()
  const arrivals: number[] = []
  await readSse(await post(`${m.url}/v1/responses`, openaiBody('slowly')), (e) => {
    if (e.event === 'response.output_text.delta') arrivals.push(performance.now())
  })
  const total = performance.now() - started
  // Lower bounds only: a busy machine makes these longer, never shorter.
  t.ok(arrivals.length >= 3)
  t.ok(total >= 150 * (arrivals.length + 1) - 20, `whole stream took ${Math.round(total)} ms`)
  t.ok(arrivals.at(-1)! - arrivals[0] >= 150 * (arrivals.length - 1) - 20, 'the first delta came well before the last')

  // A directive in the prompt overrides the server's delay for one request.
  m.setDelay(0)
  const s2 = performance.now()
  const events = await readSse(await post(`${m.url}/v1beta/models/g:streamGenerateContent?alt=sse`, geminiBody('[[mock:delay=120]] once')))
  t.ok(performance.now() - s2 >= 120 * events.length - 20)
  t.equal(events.map((e) => e.data.candidates[0].content.parts[0].text).join(''), answerFor('once'), 'directive removed from the echo')
})

t.test('hang: the stream starts, sends one delta and never completes; close() ends it', async (t) => {
  const m = await startMockModel({ hang: true })
  const res = await post(`${m.url}/v1/responses`, openaiBody('will you answer?'))
  let firstDelta: () => void
  const gotDelta = new Promise<void>((resolve) => { firstDelta = resolve })
  const seen: string[] = []
  const reading = readSse(res, (e) => {
    seen.push(e.event!)
    if (e.event === 'response.output_text.delta') firstDelta()
  }).then(() => 'ended', () => 'aborted')
  await gotDelta
  // Nothing more comes: give it ample time to misbehave.
  const raced = await Promise.race([reading, new Promise((resolve) => setTimeout(() => resolve('still open'), 500))])
  t.equal(raced, 'still open')
  t.notOk(seen.includes('response.completed'))
  await m.close()
  t.equal(await reading, 'aborted', 'close() cuts the hanging stream')
  t.equal(seen.filter((x) => x === 'response.output_text.delta').length, 1)

  // Switchable: setHang(false) and the per-request directive.
  const m2 = await mock(t)
  m2.setHang(true)
  m2.setHang(false)
  const ok = await readSse(await post(`${m2.url}/v1/responses`, openaiBody('fine')))
  t.equal(ok.at(-1)!.event, 'response.completed')
  const hung = await post(`${m2.url}/v1beta/models/g:streamGenerateContent?alt=sse`, geminiBody('[[mock:hang]] stuck'))
  const r2 = readSse(hung).then(() => 'ended', () => 'aborted')
  const raced2 = await Promise.race([r2, new Promise((resolve) => setTimeout(() => resolve('still open'), 300))])
  t.equal(raced2, 'still open')
  await m2.close()
  t.equal(await r2, 'aborted')
})

t.test('logFile: one JSON line per request, the same entries as requests()', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'mock-model-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const logFile = join(dir, 'requests.jsonl')
  const m = await mock(t, { logFile })
  await readSse(await post(`${m.url}/v1/responses`, openaiBody('logged')))
  await (await post(`${m.url}/v1beta/models/g:countTokens`, geminiBody('x'))).json()
  const lines = readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l))
  t.same(lines, m.requests())
  t.equal(lines.length, 2)
})

t.test('script mode: prints its URL, serves, is steered over HTTP, exits 0 on SIGTERM', async (t) => {
  const child = spawn(process.execPath, [SCRIPT, '--delay', '0'], { stdio: ['ignore', 'pipe', 'inherit'] })
  t.after(() => { try { child.kill('SIGKILL') } catch {} })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  const first = await new Promise<string>((resolve) => {
    let buf = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => {
      buf += d
      if (buf.includes('\n')) resolve(buf.slice(0, buf.indexOf('\n')))
    })
  })
  const { url, port } = JSON.parse(first)
  t.equal(url, `http://127.0.0.1:${port}`)
  const control = await (await post(`${url}/__mock/control`, { delayMs: 5, hang: false })).json()
  t.same(control, { delayMs: 5, hang: false })
  await readSse(await post(`${url}/v1/responses`, openaiBody('over http')))
  const log = await (await fetch(`${url}/__mock/requests`)).json() as any[]
  t.same(log.map((r) => r.api), ['openai-responses'], 'control requests are not logged')
  t.same((await (await post(`${url}/__mock/control`, { clear: true })).json()), { delayMs: 5, hang: false })
  t.same(await (await fetch(`${url}/__mock/requests`)).json(), [])
  child.kill('SIGTERM')
  t.equal(await exited, 0)
})
