// Server-Sent Events for the routes that stream: the API's event names and
// payloads, and a writer per response that respects backpressure and bounds
// what one slow consumer may hold in the server's memory.

import type { FastifyBaseLogger, FastifyReply } from 'fastify'
import type { TurnEvent } from '../lib/agents/types.js'
import type { NumberedEvent, StreamEvent } from '../lib/sessions/events.js'

/** The `error` event's code when a consumer fell too far behind (it never appears as an HTTP status). */
export const STREAM_TOO_SLOW = 'STREAM_TOO_SLOW'

// A stream cut for being too slow gets this long to flush its last event before its socket goes.
const CUT_FLUSH_MS = 2000

export interface SseMessage {
  id?: string
  event: string
  /** Already JSON: the plugin's serializer passes strings through, so each event is serialized once. */
  data: string
}

/** A turn event as the API streams it (snake_case, the names the README documents). */
export function turnMessage (event: TurnEvent): SseMessage {
  switch (event.type) {
    case 'chunk':
    case 'thought':
      return { event: event.type, data: JSON.stringify({ text: event.text }) }
    case 'tool_call':
      return { event: 'tool_call', data: JSON.stringify({ id: event.id, title: event.title, kind: event.kind, status: event.status }) }
    case 'plan':
      return { event: 'plan', data: JSON.stringify({ entries: event.entries }) }
    case 'usage':
      return { event: 'usage', data: JSON.stringify(event.usage) }
    case 'permission':
      return {
        event: 'permission',
        data: JSON.stringify({
          request_id: event.request.requestId,
          title: event.request.title,
          options: event.request.options.map((o) => ({ option_id: o.optionId, name: o.name, kind: o.kind }))
        })
      }
    case 'permission_decided':
      return { event: 'permission', data: JSON.stringify({ request_id: event.requestId, outcome: event.outcome, option_id: event.optionId }) }
  }
}

export function errorMessage (error: string, details: string): SseMessage {
  return { event: 'error', data: JSON.stringify({ error, details }) }
}

/** An event of a session's own stream, with its id when it has one (replayable with Last-Event-ID). */
export function sessionMessage (numbered: { id: number | null, event: StreamEvent }, sessionId: string): SseMessage {
  const event = numbered.event
  let message: SseMessage
  switch (event.type) {
    case 'state':
      message = { event: 'state', data: JSON.stringify({ state: event.state }) }
      break
    case 'expiring':
      message = { event: 'expiring', data: JSON.stringify({ expires_at: new Date(event.expiresAt).toISOString(), seconds_left: event.secondsLeft }) }
      break
    case 'ended':
      message = { event: 'ended', data: JSON.stringify({ reason: event.reason }) }
      break
    case 'turn':
      message = turnMessage(event.event)
      break
    case 'answer':
      message = { event: 'answer', data: JSON.stringify({ answer: event.answer, session_id: sessionId, stop_reason: event.stopReason }) }
      break
    case 'error':
      message = errorMessage(event.error, event.details)
      break
  }
  return numbered.id === null ? message : { id: String(numbered.id), ...message }
}

export function isNumbered (event: { id: number | null }): event is NumberedEvent {
  return event.id !== null
}

/**
 * Writes one response's events in order, waiting for the socket to drain. What
 * waits is bounded: past `maxBufferedBytes` the consumer is cut off with an
 * `error` event, so a stalled client can never grow the server's memory.
 */
export class EventWriter {
  readonly #reply: FastifyReply
  readonly #maxBufferedBytes: number
  readonly #log: FastifyBaseLogger
  readonly #queue: SseMessage[] = []
  #queuedBytes = 0
  #pumping: Promise<void> | null = null
  #done = false
  readonly #finished: Promise<void>
  #resolveFinished!: () => void
  /** Ends the pump's wait for the event being sent (the stream is done). */
  #wakePump: (() => void) | null = null

  constructor (reply: FastifyReply, options: { maxBufferedBytes: number, log: FastifyBaseLogger }) {
    this.#reply = reply
    this.#maxBufferedBytes = options.maxBufferedBytes
    this.#log = options.log
    this.#finished = new Promise((resolve) => { this.#resolveFinished = resolve })
    reply.raw.once('close', () => { this.#finish() })
  }

  /** Whether the consumer is still there. */
  get open (): boolean {
    return !this.#done
  }

  /** Resolves when the stream ended: by end(), a cut, or the client going away. */
  get finished (): Promise<void> {
    return this.#finished
  }

  push (message: SseMessage): void {
    if (this.#done) return
    const bytes = message.data.length + message.event.length + (message.id?.length ?? 0) + 16
    if (this.#queuedBytes + bytes > this.#maxBufferedBytes) {
      this.#cut()
      return
    }
    this.#queue.push(message)
    this.#queuedBytes += bytes
    this.#pumping ??= this.#pump()
  }

  /** Sends what is queued, then ends the response. */
  async end (): Promise<void> {
    if (this.#pumping !== null) await this.#pumping
    if (this.#done) return
    this.#reply.sse.close()
    this.#finish()
  }

  async #pump (): Promise<void> {
    try {
      while (this.#queue.length > 0 && !this.#done) {
        const message = this.#queue.shift() as SseMessage
        this.#queuedBytes -= message.data.length + message.event.length + (message.id?.length ?? 0) + 16
        // A consumer that went away never drains: #finish() wakes the wait. Not
        // Promise.race with #finished: every race would leave a reaction on that
        // long-pending promise, hundreds of bytes per event for the stream's life.
        await new Promise<void>((resolve, reject) => {
          this.#wakePump = resolve
          this.#reply.sse.send(message).then(resolve, reject)
        })
        this.#wakePump = null
      }
    } catch (err) {
      this.#log.debug({ err }, 'event stream write failed')
      this.#finish()
    } finally {
      this.#pumping = null
    }
  }

  #cut (): void {
    this.#log.warn({ queuedBytes: this.#queuedBytes, limit: this.#maxBufferedBytes }, 'event stream consumer too slow: stream closed')
    this.#queue.length = 0
    this.#queuedBytes = 0
    const raw = this.#reply.raw
    // One small last event past the backlog; then the socket goes, read or not.
    const last = errorMessage(STREAM_TOO_SLOW, `The client read the stream too slowly: more than ${this.#maxBufferedBytes} bytes waited (STREAM_BUFFER_BYTES)`)
    // The request's socket: the response may already have let go of it.
    const socket = this.#reply.request.raw.socket
    if (!raw.writableEnded && !raw.destroyed) raw.end(`event: ${last.event}\ndata: ${last.data}\n\n`)
    setTimeout(() => { socket.destroy() }, CUT_FLUSH_MS).unref()
    this.#finish()
  }

  #finish (): void {
    if (this.#done) return
    this.#done = true
    this.#resolveFinished()
    this.#wakePump?.()
  }
}
