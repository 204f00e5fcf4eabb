// STATE_DIR: where one server keeps what must outlive it (the session store
// and the record of its agent process groups), owned by one server at a time.

import { accessSync, constants, mkdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs'
import { homedir } from 'node:os'
import { join } from 'node:path'
import lockfile from 'proper-lockfile'
import type { Logger } from './logger.js'
import { bootId, processStartTime } from './processes/records.js'

export class StateDirError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'StateDirError'
  }
}

/**
 * The standalone server's default: a per-user state directory, one
 * subdirectory per instance (keyed by port) so several servers on one machine
 * never collide. Undefined for port 0: a random port has no identity a restart could find again.
 */
export function defaultStateDir (port: number, env: NodeJS.ProcessEnv = process.env): string | undefined {
  if (port === 0) return undefined
  const base = env.XDG_STATE_HOME !== undefined && env.XDG_STATE_HOME !== '' ? env.XDG_STATE_HOME : join(homedir(), '.local', 'state')
  return join(base, 'fastify-agent-sessions', `port-${port}`)
}

interface Owner { pid: number, startTime: number | null, bootId: string | null }

// A lock whose owner is not written yet is a server in the middle of starting.
const STARTING_GRACE_MS = 5000

/**
 * Creates the directory (private to this user), checks it is writable and
 * takes its lock. A second server on the same directory gets a clear error; a
 * lock left by a server that died (SIGKILL, OOM) is taken over at once.
 * Resolves with the function that releases the lock.
 */
export async function lockStateDir (dir: string, log: Logger): Promise<() => Promise<void>> {
  try {
    mkdirSync(dir, { recursive: true, mode: 0o700 })
    accessSync(dir, constants.W_OK)
  } catch (err) {
    throw new StateDirError(`STATE_DIR ${dir} cannot be used: ${(err as Error).message}. Give the service's user a writable directory, or set STATE_DIR=off to keep no sessions across restarts`)
  }
  const lockPath = join(dir, 'server.lock')
  const ownerPath = join(dir, 'server.lock.owner')
  const take = async (): Promise<() => Promise<void>> => await lockfile.lock(dir, {
    lockfilePath: lockPath,
    realpath: false,
    stale: 10_000,
    update: 2_000,
    // Someone removed or took over our lock: say so loudly; the process keeps serving.
    onCompromised: (err) => { log.error({ err, dir }, 'STATE_DIR lock lost: another server may be using this directory') }
  })
  let release: () => Promise<void>
  try {
    release = await take()
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ELOCKED') throw new StateDirError(`STATE_DIR ${dir}: ${(err as Error).message}`)
    const owner = readOwner(ownerPath)
    if (owner === null ? lockAgeMs(lockPath) < STARTING_GRACE_MS : isAlive(owner)) {
      throw new StateDirError(`Another server${owner === null ? '' : ` (pid ${owner.pid})`} is using STATE_DIR ${dir}: ` +
        'give each server its own STATE_DIR (the default has one per port), or stop the other one')
    }
    log.warn({ dir, owner }, 'STATE_DIR lock left by a server that is gone: taking it over')
    // The dead owner's name goes first: a server starting meanwhile then sees a fresh, ownerless lock and waits its turn.
    rmSync(ownerPath, { force: true })
    rmSync(lockPath, { recursive: true, force: true })
    release = await take()
  }
  const me: Owner = { pid: process.pid, startTime: processStartTime(process.pid), bootId: bootId() }
  writeFileSync(ownerPath, JSON.stringify(me), { mode: 0o600 })
  return async () => {
    rmSync(ownerPath, { force: true })
    await release()
  }
}

function readOwner (path: string): Owner | null {
  try {
    const owner = JSON.parse(readFileSync(path, 'utf8')) as Owner
    return Number.isInteger(owner.pid) ? owner : null
  } catch {
    return null
  }
}

function lockAgeMs (path: string): number {
  try {
    return Date.now() - statSync(path).mtimeMs
  } catch {
    return Infinity
  }
}

/** The owner still runs: same boot, same pid, same start time (a reused pid is someone else). */
function isAlive (owner: Owner): boolean {
  if (owner.bootId !== bootId()) return false
  const start = processStartTime(owner.pid)
  return start !== null && (owner.startTime === null || start === owner.startTime)
}
