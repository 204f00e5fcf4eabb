// `npm start` and `npm run demo` build first when dist/ is missing or older than the sources.
import { existsSync, readdirSync, statSync } from 'node:fs'
import { join } from 'node:path'
import { execFileSync } from 'node:child_process'

const root = new URL('..', import.meta.url).pathname
const sources = ['app.ts', 'server.ts', 'plugins', 'routes', 'lib']

function newestMtime (path) {
  const stat = statSync(path)
  if (!stat.isDirectory()) return stat.mtimeMs
  return Math.max(0, ...readdirSync(path).map((name) => newestMtime(join(path, name))))
}

const built = join(root, 'dist', 'server.js')
const missing = !existsSync(built)
const stale = missing ||
  newestMtime(built) < Math.max(...sources.map((s) => join(root, s)).filter(existsSync).map(newestMtime))
if (stale) {
  const tsc = join(root, 'node_modules', 'typescript', 'bin', 'tsc')
  if (!existsSync(tsc)) {
    console.error('dist/ is missing and TypeScript is not installed: run `npm ci` first')
    process.exit(1)
  }
  // On stderr: stdout is the server's log stream. The first build takes a while
  // and prints nothing itself, so say what is going on.
  const why = missing ? 'first run: dist/ does not exist yet' : 'the sources changed since the last build'
  console.error(`Building dist/ from the TypeScript sources (${why}); this takes about half a minute...`)
  const started = performance.now()
  execFileSync(process.execPath, [tsc, '-p', join(root, 'tsconfig.build.json')], { stdio: 'inherit' })
  console.error(`Built dist/ in ${((performance.now() - started) / 1000).toFixed(1)} s.`)
}
