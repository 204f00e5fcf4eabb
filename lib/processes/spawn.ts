// Every agent process starts here: as the leader of its own process group (so
// the teardown ladder can reach all it starts), with exactly the environment
// given, as the agent user when there is one (AGENT_USER), recorded in the
// process-wide registry until its group is gone.

import { execa, type ResultPromise } from 'execa'
import type { AgentUser } from './agent-user.js'
import { identify, type GroupRecorder } from './records.js'
import { trackGroup, untrackGroup } from './terminate.js'

export interface SpawnGroupOptions {
  cwd: string
  /** The whole environment of the process; nothing is inherited. */
  env: Record<string, string | undefined>
  /** Written to stdin, which is then closed; omit to keep stdin open as a pipe. */
  input?: string
  /** Where the group is recorded while it lives (the durable record the orphan sweep reads). */
  recorder?: GroupRecorder
  /**
   * The OS user to run as: the configured AGENT_USER (resolved and checked at
   * start-up, see lib/processes/agent-user.ts), or undefined for the service's
   * own user. Required, so that no driver forgets it. Supplementary groups are dropped.
   */
  user: Pick<AgentUser, 'uid' | 'gid'> | undefined
}

export type GroupProcess = ResultPromise<{ detached: true, buffer: false, encoding: 'utf8', reject: false }>

/**
 * Spawns `bin` as a group leader. The caller owns the teardown: it must call
 * terminateProcessGroup(pid) and releaseGroup(pid) once done, and await the
 * returned process (it never rejects).
 */
export function spawnGroup (bin: string, args: readonly string[], options: SpawnGroupOptions): GroupProcess {
  const subprocess = execa(bin, args, {
    cwd: options.cwd,
    env: options.env,
    extendEnv: false,
    ...(options.user === undefined ? {} : { uid: options.user.uid, gid: options.user.gid }),
    // Its own group: signals to -pgid reach every descendant.
    detached: true,
    // execa's own cleanup signals only the leader; the service tears groups down itself.
    cleanup: false,
    ...(options.input === undefined ? { stdin: 'pipe' as const } : { input: options.input }),
    stdout: 'pipe',
    stderr: 'pipe',
    buffer: false,
    reject: false,
    encoding: 'utf8'
  }) as GroupProcess
  if (subprocess.pid !== undefined) {
    trackGroup(subprocess.pid)
    const identity = options.recorder === undefined ? null : identify(subprocess.pid)
    if (identity !== null) options.recorder?.added(identity)
  }
  return subprocess
}

/** Forgets a group whose teardown is done: nothing of it runs any more. */
export function releaseGroup (pid: number, recorder?: GroupRecorder): void {
  untrackGroup(pid)
  recorder?.removed(pid)
}
