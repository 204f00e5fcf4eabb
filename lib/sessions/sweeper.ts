// The periodic sweep. The timer is re-armed only after a sweep completes, so
// sweeps never overlap however long a teardown takes, and it is unref'd so it
// never keeps the process alive on its own.

import type { Logger } from '../logger.js'
import { silentLogger } from '../logger.js'
import type { SweepReport } from './manager.js'

export interface SweeperOptions {
  intervalMs: number
  sweep: () => Promise<SweepReport>
  log?: Logger
  now?: () => number
}

export interface SweeperStats {
  intervalMs: number
  running: boolean
  sweeps: number
  reaped: number
  lastSweepAt: number | null
  lastSweepMs: number | null
}

export class Sweeper {
  readonly #options: SweeperOptions
  readonly #log: Logger
  readonly #now: () => number
  #timer: NodeJS.Timeout | null = null
  #inFlight: Promise<void> | null = null
  #sweeps = 0
  #reaped = 0
  #lastSweepAt: number | null = null
  #lastSweepMs: number | null = null

  constructor (options: SweeperOptions) {
    this.#options = options
    this.#log = options.log ?? silentLogger
    this.#now = options.now ?? Date.now
  }

  start (): void {
    if (this.#timer !== null) return
    this.#timer = setTimeout(() => { void this.#tick() }, this.#options.intervalMs)
    this.#timer.unref()
  }

  /** Stops the timer and waits for a sweep in progress to finish. */
  async stop (): Promise<void> {
    if (this.#timer !== null) {
      clearTimeout(this.#timer)
      this.#timer = null
    }
    await this.#inFlight
  }

  /** Runs one sweep now (unless one is already running, which it then awaits). */
  runOnce (): Promise<void> {
    this.#inFlight ??= this.#sweep().finally(() => { this.#inFlight = null })
    return this.#inFlight
  }

  stats (): SweeperStats {
    return {
      intervalMs: this.#options.intervalMs,
      running: this.#timer !== null,
      sweeps: this.#sweeps,
      reaped: this.#reaped,
      lastSweepAt: this.#lastSweepAt,
      lastSweepMs: this.#lastSweepMs
    }
  }

  async #tick (): Promise<void> {
    await this.runOnce()
    // stop() may have run during the sweep: then the timer is gone for good.
    this.#timer?.refresh()
  }

  async #sweep (): Promise<void> {
    try {
      const report = await this.#options.sweep()
      this.#sweeps++
      this.#reaped += report.reaped.length
      this.#lastSweepAt = this.#now()
      this.#lastSweepMs = report.durationMs
      this.#log.debug({
        checked: report.checked,
        reaped: report.reaped.length,
        failed: report.failed,
        sweepMs: Math.round(report.durationMs * 100) / 100
      }, 'reaper sweep done')
    } catch (err) {
      // A sweep that throws must not stop the reaper: the next one may succeed.
      this.#log.error({ err }, 'reaper sweep failed')
    }
  }
}
