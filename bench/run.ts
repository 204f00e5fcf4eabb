// npm run bench [-- --quick] [-- --only=heartbeat,memory]
// Environment: BENCH_QUICK=1 (same as --quick), BENCH_RESULTS_FILE (instead of
// bench/results.json); for profiling, BENCH_SERVER_FLAGS (extra node flags of the
// load-target server) and BENCH_TEARDOWN_N (one teardown size only).
//
// Runs every benchmark in a child process of its own (bench/child.ts: fresh
// heap, its own event loop, --expose-gc), prints one table and writes
// bench/results.json. Every figure is a ratio or a delta against a baseline
// measured in the same run. Missed targets are reported, never asserted: the
// exit code is non-zero only when a benchmark could not run or left an agent
// process behind.
//
// Quick mode (--quick or BENCH_QUICK=1) uses small N and short durations so CI
// can keep the benchmarks from rotting; its timings mean nothing.

import { fork, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs'
import { availableParallelism, cpus, loadavg, release, tmpdir, totalmem } from 'node:os'
import { join } from 'node:path'
import { BENCH_DIR, BENCHMARKS as ALL, killLeftovers, pidLogsUnder, QUICK, QUICK_BENCH_TIMEOUT_MS, readPidLog, removeDir, ROOT, type BenchResult, type TableRow } from './lib.js'

const onlyArg = process.argv.find((a) => a.startsWith('--only='))
const selected = onlyArg === undefined ? [...ALL] : onlyArg.slice('--only='.length).split(',').filter((n) => n !== '')
const TIMEOUT_MS = QUICK ? QUICK_BENCH_TIMEOUT_MS : 150_000
// The heartbeat starts eight servers (three of them start sessions through
// the simulator), then runs 168 rounds of 1.5 s.
// acp starts the real agents several times (gemini: 10-35 s each on a busy
// machine); sse-fanout runs four rounds of 1,000 streams; durability restores
// 10,000 stored sessions ten times and starts two standalone servers.
const TIMEOUT_MS_OF: Record<string, number> = QUICK ? {} : { heartbeat: 600_000, acp: 1_200_000, 'sse-fanout': 300_000, durability: 600_000 }

interface Failure { name: string, error: string }

function machine (): Record<string, string | number> {
  let model = cpus()[0]?.model ?? 'unknown'
  try {
    const line = readFileSync('/proc/cpuinfo', 'utf8').split('\n').find((l) => l.startsWith('model name'))
    if (line !== undefined) model = line.slice(line.indexOf(':') + 1).trim()
  } catch {}
  return {
    nproc: availableParallelism(),
    cpu: model,
    node: process.version,
    kernel: release(),
    memoryGiB: Math.round(totalmem() / 1024 ** 3 * 10) / 10,
    loadAverageAtStart: Math.round(loadavg()[0] * 100) / 100
  }
}

// Each benchmark runs in a process group of its own, with every server it
// starts: a timeout or an interrupt ends the whole group, so no server it
// started (the standalone ones have no IPC channel to notice) is left running.
let current: ChildProcess | null = null
let interrupted = false

function signalCurrent (signal: NodeJS.Signals): void {
  if (current?.pid === undefined) return
  try {
    process.kill(-current.pid, signal)
  } catch {}
}

for (const signal of ['SIGINT', 'SIGTERM'] as const) {
  process.once(signal, () => {
    interrupted = true
    signalCurrent('SIGTERM')
  })
}

async function runOne (name: string, root: string): Promise<BenchResult> {
  const child = fork(join(BENCH_DIR, 'child.ts'), [name], {
    cwd: ROOT,
    execArgv: ['--import', 'tsx', '--expose-gc'],
    env: { ...process.env, BENCH_QUICK: QUICK ? '1' : '0', BENCH_TMP_ROOT: root },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
    detached: true
  })
  current = child
  const timeoutMs = TIMEOUT_MS_OF[name] ?? TIMEOUT_MS
  return await new Promise<BenchResult>((resolve, reject) => {
    let result: BenchResult | undefined
    const timer = setTimeout(() => {
      signalCurrent('SIGKILL')
      reject(new Error(`timed out after ${timeoutMs / 1000} s`))
    }, timeoutMs)
    child.on('message', (msg) => {
      const m = msg as { type: string, result: BenchResult }
      if (m.type === 'result') result = m.result
    })
    child.once('exit', (code, signal) => {
      clearTimeout(timer)
      current = null
      if (result !== undefined && code === 0) resolve(result)
      else reject(new Error(`exited with ${signal ?? `code ${String(code)}`}${result === undefined ? ' without a result' : ''}`))
    })
  })
}

function table (rows: TableRow[]): string {
  const head = ['Benchmark', 'Measured', 'Baseline (same run)', 'Figure', 'Target', 'Met']
  const body = rows.map((r) => [r.benchmark, r.measured, r.baseline, r.figure, r.target, r.met === null ? '-' : r.met ? 'yes' : 'NO'])
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)))
  const line = (cells: string[]): string => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(' | ')} |`
  return [line(head), `|${widths.map((w) => '-'.repeat(w + 2)).join('|')}|`, ...body.map(line)].join('\n')
}

const unknown = selected.filter((n) => !(ALL as readonly string[]).includes(n))
if (unknown.length > 0) {
  console.error(`unknown benchmark(s): ${unknown.join(', ')}; known: ${ALL.join(', ')}`)
  process.exit(2)
}

const started = performance.now()
const info = machine()
const root = mkdtempSync(join(tmpdir(), 'agent-sessions-bench-'))
const results: Record<string, BenchResult> = {}
const failures: Failure[] = []
let leftover: number[] = []
try {
  for (const name of selected) {
    if (interrupted) break
    const t = performance.now()
    process.stderr.write(`bench: ${name}${QUICK ? ' (quick)' : ''} ... `)
    try {
      results[name] = await runOne(name, root)
      process.stderr.write(`${((performance.now() - t) / 1000).toFixed(1)} s\n`)
    } catch (err) {
      failures.push({ name, error: (err as Error).message })
      process.stderr.write(`FAILED: ${(err as Error).message}\n`)
    }
  }
} finally {
  // Every pid any benchmark's simulator logged must be gone; kill and report what is not.
  const pids = pidLogsUnder(root).flatMap((file) => readPidLog(file).map((p) => p.pid))
  leftover = killLeftovers(pids)
  removeDir(root)
}

const rows = Object.values(results).flatMap((r) => r.rows)
const seconds = (performance.now() - started) / 1000
console.log(`\n${table(rows)}\n`)
console.log(`${QUICK ? 'QUICK MODE (small N, short runs: the figures mean nothing). ' : ''}` +
  `Machine: ${info.nproc} x ${info.cpu}, node ${info.node}, load average ${info.loadAverageAtStart} at start. ${seconds.toFixed(0)} s.`)
if (interrupted) console.log('INTERRUPTED: the remaining benchmarks did not run')
for (const f of failures) console.log(`FAILED: ${f.name}: ${f.error}`)
if (leftover.length > 0) console.log(`LEFT BEHIND: ${leftover.length} agent process(es) were still running and have been killed: ${leftover.join(', ')}`)

const out = {
  quick: QUICK,
  date: new Date().toISOString(),
  durationSeconds: Math.round(seconds),
  machine: { ...info, loadAverageAtEnd: Math.round(loadavg()[0] * 100) / 100 },
  benchmarks: results,
  failures,
  leftoverProcesses: leftover.length
}
// BENCH_RESULTS_FILE: somewhere else than bench/results.json (the smoke test keeps a full run's file).
const file = process.env.BENCH_RESULTS_FILE ?? join(BENCH_DIR, 'results.json')
writeFileSync(file, JSON.stringify(out, null, 2) + '\n')
console.log(`Wrote ${file}`)
process.exitCode = interrupted ? 130 : failures.length > 0 || leftover.length > 0 ? 1 : 0
