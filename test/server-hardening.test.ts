// The built standalone server against clients that misbehave: requests
// trickled in (RECEIVE_TIMEOUT), oversized headers (431). (Proxies and a blank
// API_TOKEN: test/server-proxy.test.ts; a stdout whose reader is gone:
// test/server-stdout.test.ts.) `npm test` builds dist/ before tap runs.

import t, { type Test } from 'tap'
import { connect, type Socket } from 'node:net'
import { existsSync } from 'node:fs'
import { sandbox } from './helpers/index.js'
import { SERVER, startServer as startServerProcess, type ServerProcess } from './helpers/server-process.js'

interface Server extends ServerProcess { port: number }

/** The built server with the simulator keeping its chats in this test's sandbox. */
async function startServer (t: Test, env: Record<string, string>): Promise<Server> {
  const box = sandbox(t)
  const server = await startServerProcess(t, { env: { FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR', ...env } })
  return { ...server, port: Number(new URL(server.url).port) }
}

interface RawResponse { status: number, headers: Record<string, string>, body: string, closedAfterMs: number }

/** Opens a raw connection, runs `feed` on it, and resolves with what came back once the server closed it (or the guard did). */
function raw (port: number, feed: (socket: Socket) => void, guardMs: number): Promise<RawResponse | 'still open'> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1')
    const opened = Date.now()
    let data = ''
    let settled = false
    const done = (value: RawResponse | 'still open'): void => {
      if (settled) return
      settled = true
      clearTimeout(guard)
      socket.destroy()
      resolve(value)
    }
    const guard = setTimeout(() => done('still open'), guardMs)
    socket.setEncoding('utf8')
    socket.on('data', (chunk: string) => { data += chunk })
    socket.on('error', () => {})
    socket.on('close', () => {
      const [head, ...rest] = data.split('\r\n\r\n')
      const [statusLine, ...headerLines] = head.split('\r\n')
      const headers = Object.fromEntries(headerLines.map((l) => [l.slice(0, l.indexOf(':')).toLowerCase(), l.slice(l.indexOf(':') + 1).trim()]))
      done({ status: Number(statusLine.split(' ')[1]), headers, body: rest.join('\r\n\r\n'), closedAfterMs: Date.now() - opened })
    })
    socket.on('connect', () => feed(socket))
  })
}

function checkApiError (t: Test, res: RawResponse | 'still open', status: number, code: string, what: string): void {
  if (res === 'still open') {
    t.fail(`${what}: the server still held the connection`)
    return
  }
  t.equal(res.status, status, `${what}: ${res.status} ${res.body}`)
  const body = JSON.parse(res.body) as Record<string, unknown>
  t.equal(body.error, code, what)
  t.type(body.details, 'string', what)
  t.ok(res.headers['x-request-id'], `${what}: X-Request-ID`)
  t.equal(body.request_id, res.headers['x-request-id'], `${what}: request_id matches X-Request-ID`)
  t.match(res.headers['content-type'], /^application\/json/, what)
}

t.before(() => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
})

t.test('RECEIVE_TIMEOUT cuts off clients that trickle a request; an answer may take longer than it', async (t) => {
  const server = await startServer(t, { RECEIVE_TIMEOUT: '1s' })
  const start = await fetch(`${server.url}/api/session/start`, { method: 'POST' })
  const id = ((await start.json()) as { session_id: string }).session_id
  const head = (length: number): string => `POST /api/ask?session_id=${id} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: ${length}\r\n\r\n`
  // Anything still open 20x the limit later was never going to be cut off.
  const GUARD_MS = 20_000

  const oneByte = await raw(server.port, (socket) => socket.write(head(100) + '{'), GUARD_MS)
  checkApiError(t, oneByte, 408, 'REQUEST_RECEIVE_TIMEOUT', 'Content-Length: 100 and one byte')

  // A byte every 200 ms: no pause is long, yet the whole request never arrives in time.
  let timer: NodeJS.Timeout | undefined
  const trickle = await raw(server.port, (socket) => {
    socket.write(head(100))
    timer = setInterval(() => { if (!socket.destroyed) socket.write(' ') }, 200)
  }, GUARD_MS)
  clearInterval(timer)
  checkApiError(t, trickle, 408, 'REQUEST_RECEIVE_TIMEOUT', 'a body byte every 200 ms')

  const headerLines = `POST /api/session/start HTTP/1.1\r\nHost: 127.0.0.1\r\n${'X-Slow: x\r\n'.repeat(1000)}`
  const slowHeaders = await raw(server.port, (socket) => {
    let i = 0
    timer = setInterval(() => { if (!socket.destroyed && i < headerLines.length) socket.write(headerLines[i++]) }, 100)
  }, GUARD_MS)
  clearInterval(timer)
  checkApiError(t, slowHeaders, 408, 'REQUEST_RECEIVE_TIMEOUT', 'headers a byte every 100 ms')

  // The limit is on receiving, never on answering: a turn of 3 s, three times the limit, is answered.
  const slow = await fetch(`${server.url}/api/ask?session_id=${id}`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'take your time [[fault:slow=3000]]' })
  })
  t.equal(slow.status, 200, 'an ask that answers after 3 s')
  t.match(((await slow.json()) as { answer: string }).answer, /take your time/)
  t.ok(server.logs.some((l) => l.code === 'REQUEST_RECEIVE_TIMEOUT'), 'the cut-offs are logged')
})

t.test('headers over the limit get 431 HEADERS_TOO_LARGE in the API\'s error shape, with X-Request-ID', async (t) => {
  const server = await startServer(t, {})
  const res = await raw(server.port, (socket) => {
    socket.write(`GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ${'a'.repeat(20_000)}\r\n\r\n`)
  }, 20_000)
  checkApiError(t, res, 431, 'HEADERS_TOO_LARGE', '20 KB of headers')
  const malformed = await raw(server.port, (socket) => socket.write('NOT HTTP AT ALL\r\n\r\n'), 20_000)
  checkApiError(t, malformed, 400, 'INVALID_REQUEST', 'malformed HTTP')
  t.equal((await fetch(`${server.url}/api/health`)).status, 200, 'the server goes on')
})
