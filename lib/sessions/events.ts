// Per-session event streams: what any number of subscribers of one session
// see (its state, the events of its turns, expiry warnings, its end), each
// event with an id, and a bounded buffer so a client that reconnects with
// Last-Event-ID gets what it missed. A session nobody ever subscribed to
// costs nothing here.

import type { TurnEvent } from '../agents/types.js'
import type { SessionEndReason } from '../errors.js'

export type SessionState = 'idle' | 'busy' | 'hibernated' | 'closing'

/** Everything a stream can carry, as the API names it. */
export type StreamEvent =
  | { type: 'state', state: SessionState }
  | { type: 'expiring', expiresAt: number, secondsLeft: number }
  | { type: 'ended', reason: SessionEndReason }
  | { type: 'turn', event: TurnEvent }
  | { type: 'answer', answer: string, stopReason: string }
  | { type: 'error', error: string, details: string }

export interface NumberedEvent {
  id: number
  event: StreamEvent
}

export type Subscriber = (event: NumberedEvent) => void

export interface EventBufferLimits {
  /** Events kept for replay per session. */
  maxEvents: number
}

interface Channel {
  nextId: number
  buffer: NumberedEvent[]
  subscribers: Set<Subscriber>
}

export class SessionEvents {
  readonly #channels = new Map<string, Channel>()
  readonly #limits: EventBufferLimits

  constructor (limits: EventBufferLimits = { maxEvents: 512 }) {
    this.#limits = limits
  }

  /**
   * Adds a subscriber; returns the buffered events after `lastEventId` (all of
   * them when it is unknown or older than the buffer) and how to unsubscribe.
   */
  subscribe (sessionId: string, subscriber: Subscriber, lastEventId?: number): { missed: NumberedEvent[], unsubscribe: () => void } {
    let channel = this.#channels.get(sessionId)
    if (channel === undefined) {
      channel = { nextId: 1, buffer: [], subscribers: new Set() }
      this.#channels.set(sessionId, channel)
    }
    channel.subscribers.add(subscriber)
    const missed = lastEventId === undefined ? [] : channel.buffer.filter((e) => e.id > lastEventId)
    const current = channel
    return { missed, unsubscribe: () => { current.subscribers.delete(subscriber) } }
  }

  hasSubscribers (sessionId: string): boolean {
    return (this.#channels.get(sessionId)?.subscribers.size ?? 0) > 0
  }

  /** Publishes to the session's subscribers, if it ever had any (otherwise nothing is kept). */
  publish (sessionId: string, event: StreamEvent): void {
    const channel = this.#channels.get(sessionId)
    if (channel === undefined) return
    const numbered = { id: channel.nextId++, event }
    channel.buffer.push(numbered)
    if (channel.buffer.length > this.#limits.maxEvents) channel.buffer.shift()
    for (const subscriber of [...channel.subscribers]) subscriber(numbered)
  }

  /** Forgets the session: after its `ended` event, nothing more can be sent. */
  close (sessionId: string): void {
    this.#channels.delete(sessionId)
  }
}
