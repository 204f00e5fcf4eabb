// Reading Server-Sent Events in tests: over fetch with eventsource-parser
// (an ask is a POST), as a list or one event at a time.

import { createParser, type EventSourceMessage } from 'eventsource-parser'

export interface SseEvent {
  event: string
  data: Record<string, unknown>
  id?: string
}

export interface SseResponse {
  status: number
  headers: Headers
  /** The JSON body when the server answered without streaming (an error before the turn started). */
  json?: Record<string, unknown>
  /** Events in arrival order; resolves `null` once the stream ended. */
  next: () => Promise<SseEvent | null>
  /** Every event until the stream ends. */
  all: () => Promise<SseEvent[]>
  /** Drops the connection (a phone losing its network). */
  abort: () => void
  /** Raw comment lines (`: heartbeat`) seen so far. */
  comments: () => number
}

export async function openSse (url: string, init: RequestInit = {}): Promise<SseResponse> {
  const controller = new AbortController()
  const res = await fetch(url, {
    ...init,
    signal: controller.signal,
    headers: { accept: 'text/event-stream', ...(init.body === undefined ? {} : { 'content-type': 'application/json' }), ...init.headers }
  })
  const queue: Array<SseEvent | null> = []
  const waiters: Array<(event: SseEvent | null) => void> = []
  let comments = 0
  const deliver = (event: SseEvent | null): void => {
    const waiter = waiters.shift()
    if (waiter !== undefined) waiter(event)
    else queue.push(event)
  }
  if (!(res.headers.get('content-type') ?? '').startsWith('text/event-stream')) {
    const json = await res.json() as Record<string, unknown>
    return { status: res.status, headers: res.headers, json, next: async () => null, all: async () => [], abort: () => {}, comments: () => 0 }
  }
  const parser = createParser({
    onEvent: (message: EventSourceMessage) => {
      deliver({ event: message.event ?? 'message', data: JSON.parse(message.data), ...(message.id === undefined ? {} : { id: message.id }) })
    },
    onComment: () => { comments++ }
  })
  void (async () => {
    const decoder = new TextDecoder()
    try {
      for await (const chunk of res.body as unknown as AsyncIterable<Uint8Array>) parser.feed(decoder.decode(chunk, { stream: true }))
    } catch {}
    deliver(null)
  })()
  const next = async (): Promise<SseEvent | null> => {
    if (queue.length > 0) return queue.shift() as SseEvent | null
    return await new Promise((resolve) => waiters.push(resolve))
  }
  return {
    status: res.status,
    headers: res.headers,
    next,
    all: async () => {
      const events: SseEvent[] = []
      for (let e = await next(); e !== null; e = await next()) events.push(e)
      return events
    },
    abort: () => { controller.abort() },
    comments: () => comments
  }
}

/** Reads events until one matches; the ones before it are returned too. */
export async function until (stream: SseResponse, match: (event: SseEvent) => boolean, what: string): Promise<SseEvent[]> {
  const seen: SseEvent[] = []
  for (;;) {
    const event = await stream.next()
    if (event === null) throw new Error(`the stream ended before ${what}; saw ${seen.map((e) => e.event).join(', ')}`)
    seen.push(event)
    if (match(event)) return seen
  }
}
