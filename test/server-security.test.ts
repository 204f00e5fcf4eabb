// The standalone server is closed by default: it refuses to listen beyond
// loopback without API_TOKEN unless the operator opts out by name. Runs the
// built server (`npm test` builds dist/ before tap runs).
//
// Non-loopback cases use 192.0.2.1 (TEST-NET-1, never assigned to this
// machine): when the check lets the server through, listen() fails with
// EADDRNOTAVAIL, so nothing is ever bound beyond loopback by this test.

import t from 'tap'
import { spawn } from 'node:child_process'
import { join } from 'node:path'
import { isLoopbackHost, exposureError } from '../lib/config.js'
import { ROOT, SIMULATOR, sandbox } from './helpers/index.js'
import { cleanEnv } from './helpers/server-process.js'

const SERVER = join(ROOT, 'dist', 'server.js')
const UNROUTABLE = '192.0.2.1'

interface Run { code: number | null, signal: NodeJS.Signals | null, output: string, listening: boolean }


/** Runs the server; stops it with SIGTERM once it listens. */
function runServer (stateDir: string, env: Record<string, string>): Promise<Run> {
  return new Promise((resolve) => {
    const proc = spawn(process.execPath, [SERVER], {
      cwd: ROOT,
      env: cleanEnv({ PORT: '0', CURSOR_AGENT_BIN: SIMULATOR, FAKE_AGENT_STATE_DIR: stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR', LOG_LEVEL: 'info', ...env }),
      stdio: ['ignore', 'pipe', 'pipe']
    })
    let output = ''
    let listening = false
    const onData = (chunk: Buffer): void => {
      output += String(chunk)
      if (!listening && /Server listening at/.test(output)) {
        listening = true
        proc.kill('SIGTERM')
      }
    }
    proc.stdout.on('data', onData)
    proc.stderr.on('data', onData)
    // Only turns a hang into a failure: a loaded machine can take 5 s and more to start Node.
    const guard = setTimeout(() => proc.kill('SIGKILL'), 120_000)
    proc.once('close', (code, signal) => {
      clearTimeout(guard)
      resolve({ code, signal, output, listening })
    })
  })
}

t.test('isLoopbackHost', async (t) => {
  for (const host of ['127.0.0.1', '127.1.2.3', '::1', '[::1]', '0:0:0:0:0:0:0:1', '::ffff:127.0.0.1', 'localhost', 'LOCALHOST', 'localhost.', 'api.localhost']) {
    t.ok(isLoopbackHost(host), `${host} is loopback`)
  }
  for (const host of ['0.0.0.0', '::', '', '10.0.0.1', '192.168.1.10', '128.0.0.1', '::ffff:10.0.0.1', 'example.com', 'localhost.example.com', '127.0.0.1.nip.io', 'fe80::1']) {
    t.notOk(isLoopbackHost(host), `${JSON.stringify(host)} is not loopback`)
  }
  t.equal(exposureError({ host: '0.0.0.0', apiToken: 'x'.repeat(32), allowUnauthenticatedNonLoopback: false }), undefined)
  t.equal(exposureError({ host: '0.0.0.0', apiToken: undefined, allowUnauthenticatedNonLoopback: true }), undefined)
  t.match(exposureError({ host: '0.0.0.0', apiToken: '', allowUnauthenticatedNonLoopback: false })?.message, /API_TOKEN/)
})

t.test('the built server refuses a non-loopback HOST without API_TOKEN, naming API_TOKEN', async (t) => {
  const box = sandbox(t)
  for (const host of [UNROUTABLE, '0.0.0.0', '::']) {
    const run = await runServer(box.stateDir, { HOST: host })
    t.equal(run.code, 1, `HOST=${host}: exit code 1`)
    t.notOk(run.listening, `HOST=${host}: never listened`)
    t.match(run.output, /API_TOKEN/, `HOST=${host}: the message names API_TOKEN`)
    t.match(run.output, /ALLOW_UNAUTHENTICATED_NON_LOOPBACK=i-understand/, `HOST=${host}: and the opt-out`)
  }
  t.same(box.pids(), [], 'no agent process was started')
})

t.test('the opt-out takes one exact value; anything else is a configuration error', async (t) => {
  const box = sandbox(t)
  for (const value of ['true', '1', 'yes', 'I-UNDERSTAND ']) {
    const run = await runServer(box.stateDir, { HOST: UNROUTABLE, ALLOW_UNAUTHENTICATED_NON_LOOPBACK: value })
    t.equal(run.code, 1, `=${value}: refused`)
    t.match(run.output, /ALLOW_UNAUTHENTICATED_NON_LOOPBACK.*i-understand/, `=${value}: the message names the variable and its value`)
    t.notMatch(run.output, /could not listen/, `=${value}: it never tried to listen`)
  }
})

t.test('with API_TOKEN, or the opt-out, a non-loopback HOST passes the check', async (t) => {
  const box = sandbox(t)
  const envs: Array<Record<string, string>> = [{ API_TOKEN: 'a-long-random-token-0123456789' }, { ALLOW_UNAUTHENTICATED_NON_LOOPBACK: 'i-understand' }]
  for (const env of envs) {
    const run = await runServer(box.stateDir, { HOST: UNROUTABLE, ...env })
    // It got as far as listening, which fails only because 192.0.2.1 is not ours.
    t.match(run.output, /could not listen/, `${Object.keys(env)[0]}: tried to listen`)
    t.match(run.output, /EADDRNOTAVAIL/, `${Object.keys(env)[0]}: failed on the address, not the check`)
    t.notMatch(run.output, /Refusing/, `${Object.keys(env)[0]}: not refused`)
  }
})

t.test('loopback hosts start without a token', async (t) => {
  const box = sandbox(t)
  for (const host of ['127.0.0.1', 'localhost']) {
    const run = await runServer(box.stateDir, { HOST: host })
    t.ok(run.listening, `HOST=${host}: listening (${run.output.slice(0, 300)})`)
    t.equal(run.code, 0, `HOST=${host}: clean exit on SIGTERM`)
  }
})
