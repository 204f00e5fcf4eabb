// The benchmarks in quick mode, end to end, so they cannot rot: every benchmark
// runs and reports numeric figures, and no agent process is left behind. Quick
// mode's timings mean nothing on a shared CI machine: none is asserted.

import t from 'tap'
import { spawn } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { ROOT } from './helpers/index.js'
import { BENCHMARKS, QUICK_BENCH_TIMEOUT_MS } from '../bench/lib.js'
import { redisMissing } from './helpers/redis.js'
import { cleanEnv } from './helpers/server-process.js'

// bench/run.ts gives up on a benchmark after QUICK_BENCH_TIMEOUT_MS and reports
// it: past all of them (and a margin for run.ts itself) it hangs. Quick mode
// takes about 25 s on a quiet machine and minutes on a loaded one.
const RUN_BOUND_MS = BENCHMARKS.length * QUICK_BENCH_TIMEOUT_MS + 120_000
// Longer than the runner's default for a test file: the killer below decides.
t.setTimeout(RUN_BOUND_MS + 60_000)

t.test('npm run bench -- --quick runs every benchmark and writes its figures', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'bench-smoke-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const resultsFile = join(dir, 'results.json')

  const proc = spawn(process.execPath, ['--import', 'tsx', join(ROOT, 'bench', 'run.ts'), '--quick'], {
    cwd: ROOT,
    env: cleanEnv({ BENCH_QUICK: '1', BENCH_RESULTS_FILE: resultsFile }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  let output = ''
  proc.stdout.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  proc.stderr.setEncoding('utf8').on('data', (chunk: string) => { output += chunk })
  const killer = setTimeout(() => proc.kill('SIGTERM'), RUN_BOUND_MS)
  const code = await new Promise<number | null>((resolve) => proc.once('close', (c) => resolve(c)))
  clearTimeout(killer)
  for (const line of output.split('\n').filter((l) => l.startsWith('bench: '))) t.comment(line)
  t.equal(code, 0, 'bench exits 0 (no benchmark failed, no process left)', { output })

  const results = JSON.parse(readFileSync(resultsFile, 'utf8'))
  t.equal(results.quick, true)
  t.same(results.failures, [])
  t.equal(results.leftoverProcesses, 0, 'no agent process left behind')
  t.type(results.machine.nproc, 'number')
  t.type(results.machine.node, 'string')
  for (const name of BENCHMARKS) {
    const bench = results.benchmarks[name]
    t.ok(bench, `${name} is in results.json`)
    if (bench === undefined) continue
    t.type(bench.met, 'boolean', `${name}: met is reported`)
    t.ok(bench.rows.length > 0, `${name}: has table rows`)
    const figures = Object.entries(bench.figures as Record<string, unknown>)
    // Without redis-server the cluster benchmark says why in its row and measures nothing.
    if (name === 'cluster' && redisMissing() !== null) continue
    t.ok(figures.length > 0, `${name}: has figures`)
    const notNumbers = figures.filter(([, v]) => typeof v !== 'number' || !Number.isFinite(v)).map(([k]) => k)
    t.same(notNumbers, [], `${name}: every figure is a finite number`)
  }
  t.match(output, /\| Benchmark\s+\|/, 'prints the table')
})
