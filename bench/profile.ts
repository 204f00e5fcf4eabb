// npm run bench:profile [-- --level=warn] [-- --seconds=10] [-- --target=standalone|bare|both] [-- --top=25] [-- --entry=path/to/server.js]
//
// A CPU profile of the standalone server (`node --cpu-prof dist/server.js`, as
// the heartbeat benchmark starts it) under autocannon heartbeat load, and of
// its baseline, the bare Fastify server (bench/bare-server.mjs), with the same
// LOG_LEVEL. Only the samples taken while the measured load ran count (V8's
// profile clock is the monotonic clock process.hrtime reads): no start-up,
// no warm-up, no shutdown. Prints the top functions by self time, in
// microseconds per request and in percent of the busy time, then the same by
// package; keeps the .cpuprofile files (open them in Chrome DevTools).
//
// Self time of a native function (writev, the garbage collector) is time the
// server's thread spent in it, kernel work included: on a busy machine the
// socket writes take a larger share.

import { mkdtempSync, readdirSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fmt, loadHeartbeat, removeDir, sandbox, sleep, startBareProcess, startStandalone, type ProcessServer } from './lib.js'

interface ProfileNode { id: number, callFrame: { functionName: string, url: string, lineNumber: number }, children?: number[] }
interface CpuProfile { nodes: ProfileNode[], startTime: number, endTime: number, samples: number[], timeDeltas: number[] }

const arg = (name: string, fallback: string): string =>
  process.argv.find((a) => a.startsWith(`--${name}=`))?.slice(name.length + 3) ?? fallback

const level = arg('level', 'warn')
const seconds = Number(arg('seconds', '10'))
const target = arg('target', 'both')
const top = Number(arg('top', '25'))
const intervalUs = Number(arg('interval', '250'))
const connections = Number(arg('connections', '50'))
const entry = arg('entry', '') === '' ? undefined : arg('entry', '')

interface Entry { name: string, where: string, us: number }
interface Summary { requests: number, busyUs: number, idleUs: number, entries: Entry[], packages: Map<string, number>, file: string }

function where (url: string, line: number): string {
  if (url === '') return ''
  const path = url.replace(/^file:\/\//, '')
  const inModules = path.lastIndexOf('/node_modules/')
  const short = inModules >= 0 ? path.slice(inModules + '/node_modules/'.length) : path.startsWith('node:') ? path : path.replace(/^.*\/(dist|bench)\//, '$1/')
  return `${short}:${line + 1}`
}

function packageOf (url: string): string {
  if (url === '') return '(native: syscalls, GC, builtins)'
  if (url.startsWith('node:')) return 'node: (core)'
  const path = url.replace(/^file:\/\//, '')
  const inModules = path.lastIndexOf('/node_modules/')
  if (inModules < 0) return path.replace(/^.*\/(dist|bench)\//, '$1/')
  const rest = path.slice(inModules + '/node_modules/'.length).split('/')
  return rest[0].startsWith('@') ? `${rest[0]}/${rest[1]}` : rest[0]
}

/** Self time by function over the samples taken between two monotonic times (microseconds). */
function summarize (file: string, fromUs: number, toUs: number, requests: number): Summary {
  const profile = JSON.parse(readFileSync(file, 'utf8')) as CpuProfile
  const nodes = new Map(profile.nodes.map((n) => [n.id, n]))
  const self = new Map<string, Entry>()
  const packages = new Map<string, number>()
  let t = profile.startTime
  let busyUs = 0
  let idleUs = 0
  for (let i = 0; i < profile.samples.length; i++) {
    t += profile.timeDeltas[i] ?? 0
    // A sample's delta is the time since the previous one: that much time went to this sample's function.
    const dt = profile.timeDeltas[i] ?? 0
    if (t < fromUs || t > toUs) continue
    const frame = (nodes.get(profile.samples[i]) as ProfileNode).callFrame
    if (frame.functionName === '(idle)') {
      idleUs += dt
      continue
    }
    busyUs += dt
    const name = frame.functionName === '' ? '(anonymous)' : frame.functionName
    const at = where(frame.url, frame.lineNumber)
    const key = `${name} ${at}`
    const entry = self.get(key) ?? { name, where: at, us: 0 }
    entry.us += dt
    self.set(key, entry)
    const pkg = packageOf(frame.url)
    packages.set(pkg, (packages.get(pkg) ?? 0) + dt)
  }
  return { requests, busyUs, idleUs, entries: [...self.values()].sort((a, b) => b.us - a.us), packages, file }
}

function print (title: string, s: Summary): void {
  const perRequest = (us: number): string => fmt(us / s.requests, 2).padStart(7)
  const share = (us: number): string => `${fmt(100 * us / s.busyUs, 1)}%`.padStart(6)
  console.log(`\n## ${title}`)
  console.log(`${s.requests.toLocaleString('en-US')} requests; busy ${fmt(s.busyUs / 1000, 0)} ms (${fmt(s.busyUs / s.requests, 2)} us/request), idle ${fmt(s.idleUs / 1000, 0)} ms; ${s.file}`)
  console.log('\n| us/req | share | self time in |\n|---:|---:|---|')
  for (const e of s.entries.slice(0, top)) console.log(`| ${perRequest(e.us)} | ${share(e.us)} | ${e.name} ${e.where} |`)
  console.log('\n| us/req | share | package |\n|---:|---:|---|')
  for (const [pkg, us] of [...s.packages].sort((a, b) => b[1] - a[1]).slice(0, 15)) console.log(`| ${perRequest(us)} | ${share(us)} | ${pkg} |`)
}

async function profileOne (kind: 'standalone' | 'bare', dir: string, stateDir: string): Promise<Summary> {
  const profileDir = join(dir, kind)
  const nodeFlags = ['--cpu-prof', `--cpu-prof-dir=${profileDir}`, `--cpu-prof-interval=${intervalUs}`]
  const server: ProcessServer = kind === 'standalone'
    ? await startStandalone({ logLevel: level, sessions: 1, stateDir, nodeFlags, entry })
    : await startBareProcess({ logLevel: level, sessions: 1, nodeFlags })
  let from = 0
  let to = 0
  let requests = 0
  try {
    await loadHeartbeat(server, { connections, seconds: 3 }) // warm-up (JIT), not counted
    await sleep(500)
    from = Number(process.hrtime.bigint() / 1000n)
    const load = await loadHeartbeat(server, { connections, seconds })
    to = Number(process.hrtime.bigint() / 1000n)
    requests = load.total
    if (load.errors + load.non2xx > 0) throw new Error(`${load.errors} errors, ${load.non2xx} non-2xx answers`)
  } finally {
    await server.stop() // SIGTERM: the server closes and writes its profile
  }
  const files = readdirSync(profileDir).filter((f) => f.endsWith('.cpuprofile'))
  if (files.length !== 1) throw new Error(`expected one profile in ${profileDir}, found ${files.length}`)
  return summarize(join(profileDir, files[0]), from, to, requests)
}

const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-profile-'))
const box = sandbox('profile')
try {
  const kinds = target === 'both' ? ['standalone', 'bare'] as const : [target as 'standalone' | 'bare']
  for (const kind of kinds) {
    const summary = await profileOne(kind, dir, box.dir)
    print(`${kind === 'standalone' ? `Standalone server (node ${entry ?? 'dist/server.js'})` : 'Bare Fastify (bench/bare-server.mjs)'}, LOG_LEVEL=${level}, ${connections} connections, ${seconds} s`, summary)
  }
  console.log(`\nProfiles kept in ${dir}`)
} finally {
  removeDir(box.dir)
}
