// scripts/ensure-built.mjs, which `npm start` and `npm run demo` run first: a
// first build takes a while and tsc prints nothing meanwhile, so the script
// says what it is doing; with dist/ up to date it says nothing. It runs on a
// tiny project of the same layout, so the repository's own dist/ (which other
// test files run) is never rebuilt under them.

import t from 'tap'
import { execFile } from 'node:child_process'
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { ROOT } from './helpers/index.js'

const run = promisify(execFile)
// Only turns a hang into a failure: loading TypeScript can take a minute on a loaded machine.
const DEADLINE_MS = 300_000

t.test('the first build says what it is doing; an up-to-date dist/ says nothing', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'ensure-built-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  mkdirSync(join(dir, 'scripts'))
  copyFileSync(join(ROOT, 'scripts', 'ensure-built.mjs'), join(dir, 'scripts', 'ensure-built.mjs'))
  symlinkSync(join(ROOT, 'node_modules'), join(dir, 'node_modules'))
  writeFileSync(join(dir, 'package.json'), JSON.stringify({ type: 'module' }))
  writeFileSync(join(dir, 'tsconfig.build.json'), JSON.stringify({
    compilerOptions: { outDir: 'dist', module: 'nodenext', moduleResolution: 'nodenext', target: 'es2022', types: [] },
    files: ['app.ts', 'server.ts']
  }))
  writeFileSync(join(dir, 'app.ts'), 'export const answer: number = 42\n')
  writeFileSync(join(dir, 'server.ts'), "import { answer } from './app.js'\nconsole.log(answer)\n")
  const ensureBuilt = async (): Promise<{ stdout: string, stderr: string }> =>
    await run(process.execPath, [join(dir, 'scripts', 'ensure-built.mjs')], { cwd: dir, timeout: DEADLINE_MS })

  const first = await ensureBuilt()
  t.match(first.stderr, /^Building dist\/ from the TypeScript sources \(first run: dist\/ does not exist yet\); this takes about half a minute\.\.\.\n/,
    'says what it does before tsc starts')
  t.match(first.stderr, /\nBuilt dist\/ in \d+\.\d s\.\n$/, 'and when it is done')
  t.equal(first.stdout, '', 'stdout stays the server\'s log stream')
  t.ok(existsSync(join(dir, 'dist', 'server.js')), 'dist/ was built')

  const upToDate = await ensureBuilt()
  t.equal(upToDate.stderr, '', 'nothing to say when dist/ is up to date')

  const later = new Date(Date.now() + 60_000)
  utimesSync(join(dir, 'app.ts'), later, later)
  const changed = await ensureBuilt()
  t.match(changed.stderr, /^Building dist\/ from the TypeScript sources \(the sources changed since the last build\)/, 'a rebuild says why')
})
