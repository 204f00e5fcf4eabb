// A real redis-server for the cluster tests: Debian's package (CI installs
// it), on a free port of 127.0.0.1, persistence off, in a temp directory,
// killed after the test. It can be stopped and started again on the same port
// (a Redis outage).

import { spawn, spawnSync, type ChildProcess } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { freePort, waitFor } from './index.js'

export const REDIS_SERVER = process.env.REDIS_SERVER_BIN ?? 'redis-server'

/** Why the cluster tests cannot run here, or null when redis-server is installed. */
export function redisMissing (): string | null {
  const probe = spawnSync(REDIS_SERVER, ['--version'], { encoding: 'utf8' })
  if (probe.error !== undefined || probe.status !== 0) {
    return `redis-server is not installed (${REDIS_SERVER}: ${probe.error?.message ?? `exit ${String(probe.status)}`}); ` +
      'install it (Debian: apt-get install redis-server) to run the cluster tests'
  }
  return null
}

export interface RedisServer {
  port: number
  url: string
  /** Stops it (SIGKILL: nothing is saved, as persistence is off) and waits until it has exited. */
  stop: () => Promise<void>
  /** Starts it again on the same port (empty: persistence is off) and waits until it accepts connections. */
  start: () => Promise<void>
  running: () => boolean
}

interface TapLike { after: (fn: () => unknown) => void }

/** Starts redis-server on `port` (default: a free one). */
export async function startRedis (t: TapLike, port?: number): Promise<RedisServer> {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-redis-'))
  port ??= await freePort()
  let proc: ChildProcess | null = null
  let exited: Promise<void> = Promise.resolve()

  const start = async (): Promise<void> => {
    const child = spawn(REDIS_SERVER, [
      '--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
      '--dir', dir, '--protected-mode', 'yes', '--daemonize', 'no', '--loglevel', 'notice'
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    proc = child
    let output = ''
    child.stdout!.on('data', (chunk: Buffer) => { output += String(chunk) })
    child.stderr!.on('data', (chunk: Buffer) => { output += String(chunk) })
    exited = new Promise((resolve) => child.once('exit', () => resolve()))
    await waitFor(() => output.includes('Ready to accept connections') || child.exitCode !== null || child.signalCode !== null,
      'redis-server to accept connections', 60_000)
    if (!output.includes('Ready to accept connections')) throw new Error(`redis-server did not start: ${output}`)
  }

  const stop = async (): Promise<void> => {
    const child = proc
    if (child === null || child.exitCode !== null || child.signalCode !== null) return
    child.kill('SIGKILL')
    await exited
  }

  t.after(async () => {
    await stop()
    rmSync(dir, { recursive: true, force: true })
  })
  await start()
  return {
    port,
    url: `redis://127.0.0.1:${port}`,
    stop,
    start,
    running: () => proc !== null && proc.exitCode === null && proc.signalCode === null
  }
}
