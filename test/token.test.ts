// The bearer token: from API_TOKEN or from a file (API_TOKEN_FILE, the Docker
// and Kubernetes secrets convention), never both, and never silently off: a
// token that is set but blank, or an apiToken option that is present but empty
// or undefined, stops start-up instead of leaving the API open.

import t from 'tap'
import { spawn } from 'node:child_process'
import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { build, ROOT, sandbox } from './helpers/index.js'
import { cleanEnv } from './helpers/server-process.js'

const SERVER = join(ROOT, 'dist', 'server.js')


const TOKEN = 'file-token-0123456789abcdef'

function secretsDir (t: { after: (fn: () => unknown) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-secret-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

// This file's process must not carry a token in from whoever runs the tests.
delete process.env.API_TOKEN
delete process.env.API_TOKEN_FILE

t.test('API_TOKEN_FILE: the token is read from the file, one trailing newline ignored', async (t) => {
  const dir = secretsDir(t)
  const box = sandbox(t)
  for (const [name, content] of [['plain', TOKEN], ['newline', `${TOKEN}\n`], ['crlf', `${TOKEN}\r\n`]] as const) {
    const file = join(dir, name)
    writeFileSync(file, content, { mode: 0o600 })
    const app = await build(t, box, { apiTokenFile: file })
    t.equal(app.agentSessionsConfig.apiToken, TOKEN, `${name}: the token`)
    t.equal((await app.inject({ method: 'POST', url: '/api/session/start' })).statusCode, 401, `${name}: needed`)
    const ok = await app.inject({ method: 'POST', url: '/api/session/start', headers: { authorization: `Bearer ${TOKEN}` } })
    t.equal(ok.statusCode, 200, `${name}: accepted`)
  }

  // From the environment too, as a container sets it.
  const file = join(dir, 'env')
  writeFileSync(file, `${TOKEN}\n`, { mode: 0o600 })
  process.env.API_TOKEN_FILE = file
  t.after(() => { delete process.env.API_TOKEN_FILE })
  const app = await build(t, box)
  t.equal(app.agentSessionsConfig.apiToken, TOKEN, 'API_TOKEN_FILE from the environment')
  t.equal(app.agentSessionsConfig.apiTokenFile, file)
})

t.test('an unreadable, missing or empty token file is a configuration error naming API_TOKEN_FILE', async (t) => {
  const dir = secretsDir(t)
  const box = sandbox(t)
  const empty = join(dir, 'empty')
  writeFileSync(empty, '')
  const blank = join(dir, 'blank')
  writeFileSync(blank, '  \n\n')
  const spaced = join(dir, 'spaced')
  writeFileSync(spaced, 'two words\n')
  const cases: Array<[string, RegExp]> = [
    [join(dir, 'missing'), /API_TOKEN_FILE \(option apiTokenFile\) must be a readable file holding the token \(ENOENT\)/],
    [dir, /API_TOKEN_FILE \(option apiTokenFile\) must be a readable file holding the token \(EISDIR\)/],
    [empty, /API_TOKEN_FILE \(option apiTokenFile\) must be a file holding the token \(it is empty\)/],
    [blank, /API_TOKEN_FILE \(option apiTokenFile\) must be a file holding the token \(it is empty\)/],
    [spaced, /API_TOKEN_FILE \(option apiTokenFile\) must be a token without whitespace/]
  ]
  if (process.getuid?.() !== 0) {
    // Root reads any file: a mode of 000 stops only other users.
    const locked = join(dir, 'locked')
    writeFileSync(locked, TOKEN)
    chmodSync(locked, 0o000)
    cases.push([locked, /API_TOKEN_FILE .* readable file holding the token \(EACCES\)/])
  }
  for (const [file, message] of cases) {
    await t.rejects(build(t, box, { apiTokenFile: file }), { message }, file)
  }
})

t.test('API_TOKEN and API_TOKEN_FILE together are a configuration error', async (t) => {
  const dir = secretsDir(t)
  const file = join(dir, 'token')
  writeFileSync(file, TOKEN)
  const box = sandbox(t)
  const both = /API_TOKEN \(option apiToken\) and API_TOKEN_FILE \(option apiTokenFile\) are both set/
  await t.rejects(build(t, box, { apiToken: 'another-token', apiTokenFile: file }), { message: both }, 'two options')
  process.env.API_TOKEN = 'from-the-environment'
  t.after(() => { delete process.env.API_TOKEN })
  await t.rejects(build(t, box, { apiTokenFile: file }), { message: both }, 'an option and a variable')
})

t.test('a blank API_TOKEN, or an apiToken option present but empty or undefined, never turns authentication off', async (t) => {
  const box = sandbox(t)
  for (const value of [undefined, '', '   ', '\t\n']) {
    await t.rejects(build(t, box, { apiToken: value }),
      { message: /API_TOKEN \(option apiToken\) must be a non-empty string when given \(leave the option out for none\)/ }, JSON.stringify(value))
  }
  // `apiToken: process.env.X` with X unset: the README's own embedding line.
  await t.rejects(build(t, box, { apiToken: process.env.AGENT_SESSIONS_TEST_UNSET_TOKEN }), { message: /option apiToken/ })
  for (const value of [undefined, '']) {
    await t.rejects(build(t, box, { apiTokenFile: value }), { message: /API_TOKEN_FILE \(option apiTokenFile\) must be a non-empty string/ }, `apiTokenFile ${JSON.stringify(value)}`)
  }
  await t.rejects(build(t, box, { apiToken: 'two words' }), { message: /API_TOKEN \(option apiToken\) must be a token without whitespace, got "<hidden>"/ })

  for (const value of ['', '   ', '\t']) {
    process.env.API_TOKEN = value
    await t.rejects(build(t, box), { message: /API_TOKEN \(option apiToken\) must be non-empty when set \(unset it for none\)/ }, `API_TOKEN=${JSON.stringify(value)}`)
  }
  delete process.env.API_TOKEN
  const open = await build(t, box)
  t.equal(open.agentSessionsConfig.apiToken, undefined, 'unset (not blank) means no token')
})

t.test('the built server: a blank API_TOKEN stops it instead of leaving the API open', async (t) => {
  for (const value of ['', '   ']) {
    const proc = spawn(process.execPath, [SERVER], { cwd: ROOT, env: cleanEnv({ PORT: '0', API_TOKEN: value }), stdio: ['ignore', 'pipe', 'pipe'] })
    let output = ''
    proc.stdout.on('data', (chunk: Buffer) => { output += String(chunk) })
    proc.stderr.on('data', (chunk: Buffer) => { output += String(chunk) })
    t.equal(await new Promise((resolve) => proc.once('exit', resolve)), 1, `API_TOKEN=${JSON.stringify(value)}`)
    t.match(output, /API_TOKEN \(option apiToken\) must be non-empty when set \(unset it for none\)/)
    t.notMatch(output, /Server listening/)
  }
})
