// Memory held by agent process groups, read from /proc: what an idle live
// agent costs, and what reaping or hibernating it frees.

import { readdirSync, readFileSync } from 'node:fs'

/** Resident memory (bytes) of every process in these groups; 0 without /proc. */
export function groupsRssBytes (pgids: readonly number[]): number {
  if (pgids.length === 0) return 0
  const wanted = new Set(pgids)
  let total = 0
  let names: string[]
  try {
    names = readdirSync('/proc')
  } catch {
    return 0
  }
  for (const name of names) {
    const pid = Number(name)
    if (!Number.isInteger(pid)) continue
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, 'latin1')
      // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
      const pgrp = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[2])
      if (!wanted.has(pgrp)) continue
      const rss = /^VmRSS:\s+(\d+) kB$/m.exec(readFileSync(`/proc/${pid}/status`, 'latin1'))
      if (rss !== null) total += Number(rss[1]) * 1024
    } catch {
      // Gone between the listing and the read.
    }
  }
  return total
}
