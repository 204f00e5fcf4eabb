// The client side of bench/sse-fanout.ts, in a process of its own so that the
// server's event loop and CPU time are measured without the clients' work.
// Opens one POST per path with Accept: text/event-stream, counts the `chunk`
// events each stream delivers and whether it ended with `answer`.
//
// IPC: receives {type: 'open', base, paths} (once per batch); sends {type: 'opened'} once every
// stream delivered its first chunk; answers {type: 'count'} with the chunks
// delivered so far; sends {type: 'done', ...} when every stream has ended.

import { Agent, request } from 'node:http'

interface Open { type: 'open', base: string, paths: string[] }

const agent = new Agent({ keepAlive: false, maxSockets: Infinity })
let chunks = 0
let answers = 0
let errors = 0
let ended = 0
let streaming = 0
let total = 0
let opened = false

function send (message: Record<string, unknown>): void {
  process.send?.(message)
}

function openOne (base: string, path: string): void {
  const url = new URL(path, base)
  const body = '{"question":"stream"}'
  let seenChunk = false
  let pending = ''
  let answered = false
  const finish = (failed: boolean): void => {
    if (failed) errors++
    if (answered) answers++
    ended++
    if (!seenChunk) {
      // A stream that failed before its first chunk must not hold the 'opened' report back.
      streaming++
      maybeOpened()
    }
    if (ended === total) send({ type: 'done', chunks, answers, errors, streams: total })
  }
  const req = request({
    host: url.hostname,
    port: url.port,
    path: url.pathname + url.search,
    method: 'POST',
    agent,
    headers: { accept: 'text/event-stream', 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }
  }, (res) => {
    res.setEncoding('utf8')
    res.on('data', (data: string) => {
      pending += data
      let cut: number
      while ((cut = pending.indexOf('\n\n')) !== -1) {
        const block = pending.slice(0, cut)
        pending = pending.slice(cut + 2)
        if (block.includes('event: chunk')) {
          chunks++
          if (!seenChunk) {
            seenChunk = true
            streaming++
            maybeOpened()
          }
        } else if (block.includes('event: answer')) {
          answered = true
        }
      }
    })
    res.on('end', () => { finish(res.statusCode !== 200 || !answered) })
    res.on('error', () => { finish(true) })
  })
  req.on('error', () => { finish(true) })
  req.end(body)
}

function maybeOpened (): void {
  if (!opened && streaming === total) {
    opened = true
    send({ type: 'opened' })
  }
}

process.on('message', (raw) => {
  const message = raw as { type: string }
  if (message.type === 'open') {
    // Each open is a batch of its own (a warm-up, then the measured one).
    const { base, paths } = message as Open
    chunks = answers = errors = ended = streaming = 0
    opened = false
    total = paths.length
    for (const path of paths) openOne(base, path)
  } else if (message.type === 'count') {
    send({ type: 'count', chunks })
  }
})
process.on('disconnect', () => {
  agent.destroy()
  process.exit(0)
})
