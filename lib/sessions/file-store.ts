// The embedded store: one JSON file in STATE_DIR, replaced atomically (write
// to a temporary file, fsync, rename), so a crash leaves the old state or the
// new one, never half of either. Writes are batched: activity times go out at
// most once a second, creations and ends at once.

import { readFileSync, renameSync } from 'node:fs'
import writeFileAtomic from 'write-file-atomic'
import type { Logger } from '../logger.js'
import type { SessionStore, StoreHealth, StoreSnapshot, StoreSource, StoredEnded, StoredSession } from './store.js'

/**
 * The format this version writes. Older ones are migrated on load; newer ones are moved aside.
 * 1: sessions and ended ids. 2: each session also keeps its conversation history.
 */
export const STATE_FORMAT_VERSION = 2

/** Each step lifts a state file one format version. */
const MIGRATIONS: Record<number, (state: Record<string, unknown>) => Record<string, unknown>> = {
  1: (state) => ({
    ...state,
    version: 2,
    sessions: Array.isArray(state.sessions) ? state.sessions.map((s: Record<string, unknown>) => ({ ...s, history: [] })) : state.sessions
  })
}

export interface FileStoreOptions {
  file: string
  log: Logger
  /** Longest a change of activity times waits before it is written. */
  batchMs?: number
}

const DEFAULT_BATCH_MS = 1000

export class FileStore implements SessionStore {
  readonly #file: string
  readonly #log: Logger
  readonly #batchMs: number
  #source: StoreSource | null = null
  #dirty = false
  #timer: NodeJS.Timeout | null = null
  #writing: Promise<void> | null = null
  #lastError: string | null = null
  // Changes asked to be written, and how many of them the last finished attempt covered.
  #requested = 0
  #attempted = 0
  #waiting: Array<{ wanted: number, resolve: () => void }> = []
  #closing = false
  #closed = false

  constructor (options: FileStoreOptions) {
    this.#file = options.file
    this.#log = options.log
    this.#batchMs = options.batchMs ?? DEFAULT_BATCH_MS
  }

  async load (): Promise<StoreSnapshot> {
    let text: string
    try {
      text = readFileSync(this.#file, 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return { sessions: [], ended: [] }
      throw err
    }
    try {
      return parseState(text)
    } catch (err) {
      // Never a reason not to start: keep the damaged file for a person to look at, and begin empty.
      const aside = `${this.#file}.unreadable-${Date.now()}`
      renameSync(this.#file, aside)
      this.#log.warn({ err, file: this.#file, movedTo: aside }, 'session store unreadable: moved aside, starting with no stored sessions')
      return { sessions: [], ended: [] }
    }
  }

  attach (source: StoreSource): void {
    this.#source = source
  }

  async saved (): Promise<void> {
    const wanted = ++this.#requested
    this.#dirty = true
    this.#writeSoon()
    if (this.#attempted >= wanted) return
    await new Promise<void>((resolve) => { this.#waiting.push({ wanted, resolve }) })
  }

  touched (): void {
    this.#dirty = true
    this.#schedule()
  }

  ended (): void {
    void this.saved()
  }

  /** Writes what is pending now: the write in flight, then one more for what came meanwhile. */
  async flush (): Promise<void> {
    this.#unschedule()
    if (this.#writing !== null) await this.#writing
    this.#unschedule()
    if (this.#dirty) this.#writeSoon()
    while (this.#writing !== null) await this.#writing
  }

  async close (): Promise<void> {
    this.#closing = true
    await this.flush()
    this.#closed = true
  }

  health (): StoreHealth {
    return { kind: 'file', ok: this.#lastError === null, lastError: this.#lastError }
  }

  /** Activity goes out with the next batch, at most once per batchMs. */
  #schedule (): void {
    if (this.#timer !== null || this.#closed) return
    this.#timer = setTimeout(() => {
      this.#timer = null
      this.#writeSoon()
    }, this.#batchMs)
    this.#timer.unref()
  }

  #unschedule (): void {
    if (this.#timer === null) return
    clearTimeout(this.#timer)
    this.#timer = null
  }

  #writeSoon (): void {
    if (this.#closed || this.#writing !== null) return
    // One write at a time; what changes meanwhile goes out in the next one.
    const writing = this.#write()
    this.#writing = writing
    // Cleared only after it was set: a write with nothing to do completes at once.
    void writing.finally(() => { if (this.#writing === writing) this.#writing = null })
  }

  #settleWaiting (covers: number): void {
    this.#attempted = Math.max(this.#attempted, covers)
    const done = this.#waiting.filter((w) => w.wanted <= covers)
    this.#waiting = this.#waiting.filter((w) => w.wanted > covers)
    for (const waiter of done) waiter.resolve()
  }

  async #write (): Promise<void> {
    while (this.#dirty && this.#source !== null) {
      this.#dirty = false
      const covers = this.#requested
      const text = JSON.stringify({
        version: STATE_FORMAT_VERSION,
        savedAt: Date.now(),
        sessions: [...this.#source.sessions()],
        ended: [...this.#source.ended()]
      })
      try {
        await writeFileAtomic(this.#file, text, { mode: 0o600 })
        if (this.#lastError !== null) this.#log.info({ file: this.#file }, 'session store writes again')
        this.#lastError = null
        this.#settleWaiting(covers)
        // Activity that came during the write waits for its batch (under steady heartbeats the
        // file would be rewritten back to back otherwise); a creation or an end goes out at once.
        if (this.#dirty && this.#requested === covers && !this.#closing) {
          this.#schedule()
          return
        }
      } catch (err) {
        this.#settleWaiting(covers)
        // A full or read-only disk must not take the service down: keep serving, retry a little later.
        if (this.#lastError === null || this.#closing) this.#log.error({ err, file: this.#file }, 'writing the session store failed')
        this.#lastError = (err as Error).message
        this.#dirty = true
        // Closing does not wait for space that may never come.
        if (this.#closing) return
        await new Promise((resolve) => setTimeout(resolve, this.#batchMs).unref())
      }
    }
  }
}

/** Reads a state file of this version or an older one; throws for anything else. */
export function parseState (text: string): StoreSnapshot {
  let parsed = JSON.parse(text) as Record<string, unknown>
  if (typeof parsed !== 'object' || parsed === null) throw new Error('not a JSON object')
  while (typeof parsed.version === 'number' && parsed.version < STATE_FORMAT_VERSION && MIGRATIONS[parsed.version] !== undefined) {
    parsed = MIGRATIONS[parsed.version](parsed)
  }
  const version = parsed.version
  if (version !== STATE_FORMAT_VERSION) {
    throw new Error(typeof version === 'number' && version > STATE_FORMAT_VERSION
      ? `written by a newer version (format ${version}; this one reads up to ${STATE_FORMAT_VERSION})`
      : `unknown format version ${JSON.stringify(version)}`)
  }
  if (!Array.isArray(parsed.sessions) || !Array.isArray(parsed.ended)) throw new Error('sessions or ended missing')
  return {
    sessions: (parsed.sessions as StoredSession[]).filter(isStoredSession)
      .map((session) => ({ ...session, history: Array.isArray(session.history) ? session.history : [] })),
    ended: (parsed.ended as StoredEnded[]).filter((e) => typeof e?.id === 'string' && typeof e.reason === 'string' && Number.isFinite(e.endedAt))
  }
}

function isStoredSession (s: StoredSession): boolean {
  return typeof s?.id === 'string' && typeof s.ref === 'object' && s.ref !== null &&
    (s.ref.protocol === 'cursor' || s.ref.protocol === 'acp') &&
    Number.isFinite(s.lastActivity) && Number.isFinite(s.idleTimeoutMs)
}
