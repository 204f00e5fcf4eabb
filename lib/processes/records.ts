// The record of live agent process groups, kept on disk so that a service
// killed with SIGKILL (or by the OOM killer) can tear down, at its next start,
// the agents it left running. A group is identified by its leader's pid, the
// leader's start time (/proc/PID/stat) and the boot id, so a pid the kernel
// has since given to an unrelated process is never taken for ours.

import { readFileSync, renameSync } from 'node:fs'
import writeFileAtomic from 'write-file-atomic'
import type { Logger } from '../logger.js'
import { liveGroupsFromProc, terminateProcessGroup, type TeardownReport } from './terminate.js'

export interface GroupIdentity {
  pgid: number
  /** The leader's start time in clock ticks since boot (field 22 of /proc/PID/stat). */
  startTime: number
  bootId: string
}

/** What spawnGroup tells about every group it starts and every one that is gone. */
export interface GroupRecorder {
  added: (group: GroupIdentity) => void
  removed: (pgid: number) => void
}

const FORMAT_VERSION = 1

let cachedBootId: string | null | undefined
export function bootId (): string | null {
  if (cachedBootId === undefined) {
    try {
      cachedBootId = readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim()
    } catch {
      cachedBootId = null
    }
  }
  return cachedBootId
}

/** The start time of a running process, or null when it is gone (or /proc is missing). */
export function processStartTime (pid: number): number | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses; starttime is field 22.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ')
    return Number(fields[19])
  } catch {
    return null
  }
}

/** The identity of a group leader we just spawned, or null when it already exited (or no /proc). */
export function identify (pid: number): GroupIdentity | null {
  const startTime = processStartTime(pid)
  const boot = bootId()
  return startTime === null || boot === null ? null : { pgid: pid, startTime, bootId: boot }
}

export type OrphanVerdict = 'ours' | 'gone' | 'not-ours'

/**
 * Whether a recorded group still runs and is ours. The leader alive with the
 * recorded start time: ours. The leader gone but members left in its group:
 * ours too (the kernel never hands out a pid that is still a group's id).
 * Another boot, or the pid now a different process: not ours.
 */
export function classifyRecord (record: GroupIdentity, liveGroups: Set<number> | null): OrphanVerdict {
  if (record.bootId !== bootId()) return 'not-ours'
  const leaderStart = processStartTime(record.pgid)
  if (leaderStart !== null) return leaderStart === record.startTime ? 'ours' : 'not-ours'
  return liveGroups?.has(record.pgid) === true ? 'ours' : 'gone'
}

export interface OrphanSweepReport {
  /** Groups of an earlier run torn down now. */
  reaped: Array<{ pgid: number, teardown: TeardownReport }>
  /** Records whose pid now belongs to someone else: left alone. */
  notOurs: number
  /** Records of groups already gone. */
  gone: number
}

/** Tears down, through the ladder and in parallel, every recorded group that is still ours. */
export async function reapOrphans (records: readonly GroupIdentity[], options: { signal: NodeJS.Signals, graceMs: number }): Promise<OrphanSweepReport> {
  const live = liveGroupsFromProc()
  const report: OrphanSweepReport = { reaped: [], notOurs: 0, gone: 0 }
  const ending: Array<Promise<void>> = []
  for (const record of records) {
    const verdict = classifyRecord(record, live)
    if (verdict === 'not-ours') report.notOurs++
    else if (verdict === 'gone') report.gone++
    else {
      ending.push(terminateProcessGroup(record.pgid, { signal: options.signal, graceMs: options.graceMs })
        .then((teardown) => { report.reaped.push({ pgid: record.pgid, teardown }) }))
    }
  }
  await Promise.all(ending)
  return report
}

/**
 * The groups of this service now running, in a file of their own (so a
 * damaged session store never loses them). Every change is written at once,
 * atomically: a record that is not on disk cannot be swept after a crash.
 */
export class GroupRecordFile implements GroupRecorder {
  readonly #file: string
  readonly #log: Logger
  readonly #groups = new Map<number, GroupIdentity>()
  #writing: Promise<void> | null = null
  #dirty = false

  constructor (file: string, log: Logger) {
    this.#file = file
    this.#log = log
  }

  /** The groups an earlier run recorded (a damaged file is moved aside, and counts as none). */
  load (): GroupIdentity[] {
    let text: string
    try {
      text = readFileSync(this.#file, 'utf8')
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return []
      throw err
    }
    try {
      const parsed = JSON.parse(text) as { version?: unknown, groups?: unknown }
      if (parsed.version !== FORMAT_VERSION || !Array.isArray(parsed.groups)) throw new Error(`unknown format version ${String(parsed.version)}`)
      return (parsed.groups as GroupIdentity[]).filter((g) =>
        Number.isInteger(g.pgid) && g.pgid > 1 && Number.isFinite(g.startTime) && typeof g.bootId === 'string')
    } catch (err) {
      const aside = `${this.#file}.unreadable-${Date.now()}`
      renameSync(this.#file, aside)
      this.#log.warn({ err, file: this.#file, movedTo: aside }, 'process record unreadable: moved aside')
      return []
    }
  }

  added (group: GroupIdentity): void {
    this.#groups.set(group.pgid, group)
    this.#save()
  }

  removed (pgid: number): void {
    if (this.#groups.delete(pgid)) this.#save()
  }

  /** Resolves once what was recorded so far is on disk. */
  async flush (): Promise<void> {
    while (this.#writing !== null) await this.#writing
  }

  #save (): void {
    this.#dirty = true
    if (this.#writing !== null) return
    // One write at a time; changes made meanwhile go out in the next one.
    const writing = this.#write()
    this.#writing = writing
    void writing.finally(() => { if (this.#writing === writing) this.#writing = null })
  }

  async #write (): Promise<void> {
    while (this.#dirty) {
      this.#dirty = false
      const text = JSON.stringify({ version: FORMAT_VERSION, groups: [...this.#groups.values()] })
      try {
        await writeFileAtomic(this.#file, text, { mode: 0o600 })
      } catch (err) {
        this.#log.error({ err, file: this.#file }, 'writing the process record failed')
      }
    }
  }
}
