// What must survive a restart of the service, behind one interface: the
// sessions (enough to resume each conversation in a new agent process) and
// the ended ids with their reasons. The store knows no processes (their record
// lives in lib/processes). Implementations: file-store.ts (one instance, a
// local state directory) and, for clusters, a shared one.

import type { ConversationRef, StopReason } from '../agents/types.js'
import type { SessionEndReason } from '../errors.js'

/** One turn of a conversation (what GET /api/session/history shows). Times are epoch milliseconds. */
export interface StoredTurn {
  question: string
  answer: string
  stopReason: StopReason | null
  error: string | null
  startedAt: number
  endedAt: number
}

export interface StoredSession {
  id: string
  /** What the agent driver needs to continue the conversation (chat id, ACP session id). */
  ref: ConversationRef
  workspaceDir: string
  createdAt: number
  lastActivity: number
  lastTurnEndedAt: number
  idleTimeoutMs: number
  /** The conversation so far (newest turns, up to the manager's limit). */
  history: StoredTurn[]
  /** The client (address) whose MAX_SESSIONS_PER_CLIENT budget it counts against. */
  client?: string
}

export interface StoredEnded {
  id: string
  reason: SessionEndReason
  idleMs: number
  endedAt: number
}

export interface StoreSnapshot {
  sessions: StoredSession[]
  ended: StoredEnded[]
}

/** Where a store reads the current state from when it writes (the manager's own maps: nothing is kept twice). */
export interface StoreSource {
  sessions: () => Iterable<StoredSession>
  ended: () => Iterable<StoredEnded>
}

export interface StoreHealth {
  kind: 'file' | 'redis'
  ok: boolean
  /** The last write or read failure, while it lasts. */
  lastError: string | null
}

export interface SessionStore {
  /** What an earlier run left (sessions come back hibernated). Damaged state is moved aside, never fatal. */
  load: () => Promise<StoreSnapshot>
  attach: (source: StoreSource) => void
  /**
   * A session was created, or changed what resuming it needs: written now, not
   * batched. Resolves once written (or once writing failed: the service goes on
   * without waiting for a disk that may not recover).
   */
  saved: (session: StoredSession) => Promise<void>
  /** Only its activity times changed (a heartbeat): written with the next batch. */
  touched: (session: StoredSession) => void
  /** The session ended: it leaves the store and its id is remembered with the reason. */
  ended: (record: StoredEnded) => void
  /** Resolves once everything changed so far is written. */
  flush: () => Promise<void>
  close: () => Promise<void>
  health: () => StoreHealth
}
