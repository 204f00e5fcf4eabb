// Graceful-then-forced teardown of a whole process GROUP.
//
// cursor-agent forks worker-server children that outlive it and hold its pipes
// open, and the shell tools it runs are its descendants too, so signalling only
// the main pid leaves orphans. Every agent process is spawned as the leader of
// its own group (pgid = pid) and torn down here by signalling -pgid.

import { readdirSync, readFileSync } from 'node:fs'

export type TeardownStage = 'exited' | 'signalled' | 'killed'

export interface TeardownReport {
  /** exited: nothing was left to signal; signalled: the polite signal ended it; killed: SIGKILL was needed. */
  stage: TeardownStage
  /** Signal that ended the group (null when it had already exited). */
  signal: NodeJS.Signals | null
  durationMs: number
}

export interface TerminateOptions {
  /** Polite signal sent first (KILL_SIGNAL). */
  signal?: NodeJS.Signals
  /** How long to wait for the group to empty before SIGKILL (KILL_GRACE). */
  graceMs: number
}

// How long SIGKILL may take to empty a group before we give up waiting: only
// processes stuck in uninterruptible sleep survive it, and we must not hang.
const AFTER_KILL_WAIT_MS = 2000
const POLL_MS = 25

export async function terminateProcessGroup (pgid: number, options: TerminateOptions): Promise<TeardownReport> {
  const started = performance.now()
  const signal = options.signal ?? 'SIGTERM'
  const report = (stage: TeardownStage, sent: NodeJS.Signals | null): TeardownReport =>
    ({ stage, signal: sent, durationMs: Math.round(performance.now() - started) })

  if (!isGroupAlive(pgid)) return report('exited', null)
  if (!signalGroup(pgid, signal)) return report('exited', null)
  if (await waitForGroupExit(pgid, options.graceMs, false)) return report('signalled', signal)
  signalGroup(pgid, 'SIGKILL')
  await waitForGroupExit(pgid, AFTER_KILL_WAIT_MS, false)
  return report('killed', 'SIGKILL')
}

/**
 * Sends a signal to every process of the group; false when the group is
 * already gone. Signal 0 only asks whether the group exists: EPERM (its
 * processes belong to another user and this process may not signal them)
 * means it does. A real signal that EPERM kept from every member throws: the
 * group is not gone, and nothing was delivered.
 */
export function signalGroup (pgid: number, signal: NodeJS.Signals | 0): boolean {
  try {
    process.kill(-pgid, signal)
    return true
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ESRCH') return false
    if (code === 'EPERM' && signal === 0) return true
    if (code === 'EPERM') {
      throw Object.assign(new Error(`Not permitted to send ${signal} to process group ${pgid}: its processes run as another user, ` +
        'and signalling them needs root or CAP_KILL', { cause: err }), { code: 'EPERM' })
    }
    throw err
  }
}

/**
 * Whether any process of the group is still running. A zombie is not running:
 * when nothing reaps orphans (no init in a container, some sandboxes) they stay
 * in the group forever, and `kill(-pgid, 0)` alone would wait on them.
 */
export function isGroupAlive (pgid: number): boolean {
  if (!signalGroup(pgid, 0)) return false
  const live = liveGroupsFromProc()
  return live === null ? true : live.has(pgid)
}

/** Whether the process runs (a zombie does not); for tests and logs. */
export function isProcessAlive (pid: number): boolean {
  const stat = readProcStat(pid)
  if (stat !== undefined) return stat !== null && stat.state !== 'Z' && stat.state !== 'X'
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

// ---------------------------------------------------------------------------
// Every agent process group still running in this process, whichever app
// instance started it: the last resort before a forced exit must reach them
// all without going through Fastify.

const trackedGroups = new Set<number>()

export function trackGroup (pgid: number): void {
  trackedGroups.add(pgid)
}

export function untrackGroup (pgid: number): void {
  trackedGroups.delete(pgid)
}

/** SIGKILLs every tracked group at once, synchronously; returns how many were signalled. */
export function killTrackedGroupsNow (): number {
  let killed = 0
  for (const pgid of trackedGroups) {
    // One group this process may not signal must not spare the others.
    try {
      if (signalGroup(pgid, 'SIGKILL')) killed++
    } catch {}
  }
  return killed
}

// ---------------------------------------------------------------------------
// One shared poller for every group being waited on: tearing down 200 sessions
// at once costs one /proc scan per tick, not 200.

interface Waiter { pgid: number, timer: NodeJS.Timeout, resolve: (exited: boolean) => void }
const waiters = new Set<Waiter>()
let pollTimer: NodeJS.Timeout | null = null

export function waitForGroupExit (pgid: number, timeoutMs: number, checkNow = true): Promise<boolean> {
  if (checkNow && !isGroupAlive(pgid)) return Promise.resolve(true)
  return new Promise((resolve) => {
    // Each wait has its own deadline timer: the SIGKILL that follows a grace
    // period must not wait for the next poll tick.
    const waiter: Waiter = {
      pgid,
      resolve,
      timer: setTimeout(() => {
        if (waiters.delete(waiter)) resolve(false)
      }, timeoutMs)
    }
    waiters.add(waiter)
    pollTimer ??= setInterval(pollWaiters, POLL_MS)
  })
}

function pollWaiters (): void {
  let live: Set<number> | null | undefined
  for (const waiter of waiters) {
    let alive = signalGroup(waiter.pgid, 0)
    if (alive) {
      live ??= liveGroupsFromProc()
      alive = live === null || live.has(waiter.pgid)
    }
    if (!alive) {
      waiters.delete(waiter)
      clearTimeout(waiter.timer)
      waiter.resolve(true)
    }
  }
  if (waiters.size === 0 && pollTimer !== null) {
    clearInterval(pollTimer)
    pollTimer = null
  }
}

interface ProcStat { state: string, pgrp: number }

/** undefined: no /proc on this system; null: no such process. */
function readProcStat (pid: number): ProcStat | null | undefined {
  let text: string
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'latin1')
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code
    if (code === 'ENOENT' || code === 'ESRCH') return procAvailable() ? null : undefined
    return undefined
  }
  // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
  const fields = text.slice(text.lastIndexOf(')') + 2).split(' ')
  return { state: fields[0], pgrp: Number(fields[2]) }
}

let hasProc: boolean | undefined
function procAvailable (): boolean {
  if (hasProc === undefined) {
    try {
      readFileSync('/proc/self/stat')
      hasProc = true
    } catch {
      hasProc = false
    }
  }
  return hasProc
}

// Tearing down many sessions at once checks many groups in the same instant:
// one /proc scan serves them all instead of one scan per group.
const SCAN_REUSE_MS = 10
let lastScan: { at: number, groups: Set<number> } | null = null

/** The pgids that have at least one non-zombie member, or null without /proc. */
export function liveGroupsFromProc (): Set<number> | null {
  if (!procAvailable()) return null
  const now = performance.now()
  if (lastScan !== null && now - lastScan.at < SCAN_REUSE_MS) return lastScan.groups
  const groups = new Set<number>()
  for (const name of readdirSync('/proc')) {
    const pid = Number(name)
    if (!Number.isInteger(pid)) continue
    const stat = readProcStat(pid)
    if (stat != null && stat.state !== 'Z' && stat.state !== 'X') groups.add(stat.pgrp)
  }
  lastScan = { at: performance.now(), groups }
  return groups
}
