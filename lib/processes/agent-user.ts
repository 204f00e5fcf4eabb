// The OS user agent processes run as (AGENT_USER): who it is, whether this
// process may start processes as that user and signal their groups, and
// whether that user can use the workspace.
//
// Why another user at all: an agent runs shell commands, and a process of the
// service's own user can read the service's /proc/<pid>/environ and memory,
// its token file, and signal it. For another uid the kernel's ptrace access
// check fails (different uid, no CAP_SYS_PTRACE), so none of those open.

import { execFileSync } from 'node:child_process'
import { readFileSync, realpathSync, statSync } from 'node:fs'
import { dirname } from 'node:path'

export interface AgentUser {
  uid: number
  gid: number
  /** From the user database; undefined for a uid it does not list. */
  name?: string
  /** The user's home directory from the user database (the agent's HOME). */
  home?: string
}

interface PasswdEntry { name: string, uid: number, gid: number, home: string }

const NUMERIC = /^(\d+)(?::(\d+))?$/
const USER_NAME = /^[A-Za-z_][A-Za-z0-9_.-]*\$?$/
const MAX_ID = 4_294_967_294

function passwdEntries (): PasswdEntry[] {
  let text = ''
  try {
    text = readFileSync('/etc/passwd', 'utf8')
  } catch {}
  const entries: PasswdEntry[] = []
  for (const line of text.split('\n')) {
    const fields = line.split(':')
    if (fields.length < 7 || line.startsWith('#')) continue
    entries.push({ name: fields[0], uid: Number(fields[2]), gid: Number(fields[3]), home: fields[5] })
  }
  return entries
}

/** A user only the name service knows (LDAP and the like): ask `id`. */
function idLookup (name: string): { uid: number, gid: number } | undefined {
  try {
    const uid = Number(execFileSync('id', ['-u', name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim())
    const gid = Number(execFileSync('id', ['-g', name], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim())
    return Number.isInteger(uid) && Number.isInteger(gid) ? { uid, gid } : undefined
  } catch {
    return undefined
  }
}

/**
 * `name`, `uid` or `uid:gid`. A uid the user database lists takes its primary
 * group, name and home from it; an unlisted uid without a gid gets gid = uid
 * (never gid 0, the group of root's files). Throws with the reason.
 */
export function resolveAgentUser (spec: string): AgentUser {
  const text = spec.trim()
  const numeric = NUMERIC.exec(text)
  let user: AgentUser
  if (numeric !== null) {
    const uid = Number(numeric[1])
    const entry = passwdEntries().find((e) => e.uid === uid)
    const gid = numeric[2] !== undefined ? Number(numeric[2]) : entry?.gid ?? uid
    if (uid > MAX_ID || gid > MAX_ID) throw new Error('ids go up to 4294967294')
    user = { uid, gid, name: entry?.name, home: entry?.home }
  } else {
    if (!USER_NAME.test(text)) throw new Error('not a user name')
    const entry = passwdEntries().find((e) => e.name === text)
    if (entry !== undefined) {
      user = { uid: entry.uid, gid: entry.gid, name: entry.name, home: entry.home }
    } else {
      const ids = idLookup(text)
      if (ids === undefined) throw new Error('no such user')
      user = { ...ids, name: text }
    }
  }
  if (user.uid === 0) throw new Error('root would give the agent everything')
  if (user.gid === 0) throw new Error('group 0 (root\'s group) would let the agent read what root\'s group may')
  if (typeof process.geteuid === 'function' && user.uid === process.geteuid()) {
    throw new Error('it is the service\'s own user, which would leave the agent able to read the service\'s environment and files')
  }
  return user
}

// Capability bits (linux/capability.h).
const CAP_KILL = 5n
const CAP_SETGID = 6n
const CAP_SETUID = 7n

function capabilities (status: string, field: string): bigint | undefined {
  const hex = new RegExp(`^${field}:\\s*([0-9a-f]+)$`, 'mi').exec(status)?.[1]
  return hex === undefined ? undefined : BigInt(`0x${hex}`)
}

/**
 * Why this process cannot run agents as `user` and tear their groups down, or
 * undefined when it can: starting a process as another user needs CAP_SETUID
 * and CAP_SETGID (supplementary groups are dropped too), signalling it needs
 * CAP_KILL. Root normally has all three, but a container may run root without them.
 */
export function switchUserProblem (user: AgentUser, statusText?: string): string | undefined {
  let status = statusText
  if (status === undefined) {
    try {
      status = readFileSync('/proc/self/status', 'utf8')
    } catch {
      // No /proc (not Linux): root is the only sign we have.
      return process.geteuid?.() === 0 ? undefined : 'the service is not root and its capabilities cannot be read (no /proc/self/status)'
    }
  }
  const effective = capabilities(status, 'CapEff') ?? 0n
  const missing: string[] = []
  if ((effective >> CAP_SETUID & 1n) === 0n) missing.push('CAP_SETUID')
  if ((effective >> CAP_SETGID & 1n) === 0n) missing.push('CAP_SETGID')
  if ((effective >> CAP_KILL & 1n) === 0n) missing.push('CAP_KILL')
  if (missing.length > 0) {
    // no_new_privs makes exec() ignore file capabilities: a non-root service
    // given them that way (the container image's node) starts without them.
    const noNewPrivs = /^NoNewPrivs:\s*1$/m.test(status)
    return `the service cannot run processes as ${user.name ?? `uid ${user.uid}`} and signal them: it lacks ${missing.join(', ')} ` +
      `(CapEff ${effective.toString(16).padStart(16, '0')} in /proc/self/status)` +
      (noNewPrivs
        ? '; no_new_privs is set (NoNewPrivs 1: Kubernetes\' allowPrivilegeEscalation: false, --security-opt no-new-privileges), ' +
          'which makes the kernel ignore file capabilities on the service\'s program'
        : '')
  }
  // A non-root process keeps its ambient capabilities across setuid() and
  // exec(): the agent would get CAP_SETUID with them and could become the service's user.
  const ambient = capabilities(status, 'CapAmb') ?? 0n
  if (ambient !== 0n && process.geteuid?.() !== 0) {
    return `the service has ambient capabilities (CapAmb ${ambient.toString(16).padStart(16, '0')}), which the agent would inherit`
  }
  return undefined
}

/**
 * Why the agent could take this service's capabilities for itself, or
 * undefined. A non-root process holds capabilities after exec() only through
 * ambient ones (refused by switchUserProblem) or through file capabilities on
 * the program it runs (setcap on node, as the container image does), and
 * whoever else executes that program gets them too: so `user` must not be
 * able to execute this process's own program. Read from the permission bits
 * (POSIX ACLs are not consulted); root's capabilities are its uid's, not its
 * program's, and the agent loses them when it becomes another user.
 */
export function capabilityLeakProblem (user: AgentUser, options: { execPath?: string, status?: string, euid?: number } = {}): string | undefined {
  const euid = options.euid ?? process.geteuid?.()
  if (euid === undefined || euid === 0) return undefined
  let status = options.status
  if (status === undefined) {
    try {
      status = readFileSync('/proc/self/status', 'utf8')
    } catch {
      return undefined
    }
  }
  const held = (capabilities(status, 'CapPrm') ?? 0n) | (capabilities(status, 'CapEff') ?? 0n)
  if (held === 0n) return undefined
  const program = options.execPath ?? process.execPath
  let real: string
  try {
    real = realpathSync(program)
  } catch {
    return undefined
  }
  if (pathProblem(user, real, 1, 'executable') !== undefined) return undefined
  return `${real} gives its capabilities (CapPrm ${held.toString(16).padStart(16, '0')}, file capabilities) to whoever runs it, and ` +
    `${user.name ?? `uid ${user.uid}`} can execute it (${permissionsFor(user, real).describe}): the agent would gain them. ` +
    'Make it unexecutable by that user (mode 0750 with the service\'s group, as the container image does) and give the agent a node of its own'
}

/** rwx bits `user` gets on a file: owner, else group (the primary one: supplementary groups are dropped), else other. */
function permissionsFor (user: AgentUser, path: string): { bits: number, describe: string } {
  const st = statSync(path)
  const mode = st.mode & 0o777
  const bits = st.uid === user.uid ? mode >> 6 : st.gid === user.gid ? (mode >> 3) & 7 : mode & 7
  return { bits, describe: `mode ${mode.toString(8).padStart(4, '0')}, owner ${st.uid}:${st.gid}` }
}

/**
 * Why `user` cannot enter and list `dir`, or undefined when it can. Read from
 * the permission bits of every directory on the way (POSIX ACLs are not
 * consulted): the agent starts in WORKSPACE_DIR, and the process is moved
 * there before it becomes the agent user, so a spawn would not notice.
 */
export function workspaceAccessProblem (user: AgentUser, dir: string): string | undefined {
  let real: string
  try {
    real = realpathSync(dir)
  } catch (err) {
    return `${dir} cannot be resolved (${(err as NodeJS.ErrnoException).code ?? String(err)})`
  }
  return pathProblem(user, real, 5, 'readable and searchable')
}

/** Why `user` lacks the permission bits `needs` (4 r, 2 w, 1 x: `what`) on the resolved path `real`, or cannot reach it; undefined when it has them. */
function pathProblem (user: AgentUser, real: string, needs: number, what: string): string | undefined {
  const chain: string[] = []
  for (let d = dirname(real); ; d = dirname(d)) {
    chain.unshift(d)
    if (dirname(d) === d) break
  }
  if (real !== dirname(real)) chain.push(real)
  for (const d of chain) {
    const { bits, describe } = permissionsFor(user, d)
    const wanted = d === real ? needs : 1
    if ((bits & wanted) !== wanted) {
      return d === real
        ? `${d} is not ${what} by it (${describe})`
        : `${d}, on the way to ${real}, cannot be entered by it (${describe})`
    }
  }
  return undefined
}
