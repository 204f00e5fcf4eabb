// Runs one benchmark in its own process (fresh heap, its own event loop, and
// --expose-gc) and sends its result to bench/run.ts over IPC.

import type { BenchResult } from './lib.js'

const BENCHMARKS: Record<string, () => Promise<{ run: () => Promise<BenchResult> }>> = {
  heartbeat: async () => await import('./heartbeat.js'),
  ask: async () => await import('./ask.js'),
  teardown: async () => await import('./teardown.js'),
  reaper: async () => await import('./reaper.js'),
  memory: async () => await import('./memory.js'),
  precision: async () => await import('./precision.js'),
  acp: async () => await import('./acp.js'),
  'sse-fanout': async () => await import('./sse-fanout.js'),
  durability: async () => await import('./durability.js'),
  cluster: async () => await import('./cluster.js')
}

const name = process.argv[2] ?? ''
const load = BENCHMARKS[name]
try {
  if (load === undefined) throw new Error(`unknown benchmark "${name}"; known: ${Object.keys(BENCHMARKS).join(', ')}`)
  const result = await (await load()).run()
  if (process.send !== undefined) {
    await new Promise<void>((resolve, reject) => process.send?.({ type: 'result', result }, (err: Error | null) => err === null ? resolve() : reject(err)))
  } else {
    console.log(JSON.stringify(result, null, 2))
  }
  process.exitCode = 0
} catch (err) {
  console.error(`benchmark ${name} failed:`, err)
  process.exitCode = 1
}
// Whatever a benchmark left scheduled (an unref'd timer, a keep-alive socket) must not keep it alive.
process.disconnect?.()
setTimeout(() => process.exit(), 100).unref()
