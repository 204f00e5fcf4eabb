// AGENT_USER, what the agent can reach: as root, a server with a 0600 token
// file and a secret in its environment, and an agent that probes what it can
// read before it answers, once as the server's own user and once as nobody.

import t, { type Test } from 'tap'
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { resolveAgentUser } from '../lib/processes/agent-user.js'
import { agentUserCannotRun, NOBODY, SERVER, sharedDir, sharedSandbox, simulatorForAgentUser, startServer } from './helpers/agent-user.js'

// A cursor-agent that first probes what it can reach, then is the simulator.
// Every probe notes how it went: "readable", or the shell's error message.
function probingAgent (t: Test, tokenFile: string, probes: string): string {
  const dir = mkdtempSync(join(tmpdir(), 'agent-bin-'))
  chmodSync(dir, 0o755)
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  const bin = join(dir, 'cursor-agent')
  writeFileSync(bin, `#!/bin/sh
out="${probes}/probe.$$"
try () { if err=$("$@" 2>&1 >/dev/null); then echo readable; else echo "denied: $err"; fi; }
{
  echo "uid=$(id -u)"
  echo "env_user=$HOME:$USER:$LOGNAME"
  echo "capeff=$(awk '/^CapEff/ {print $2}' /proc/self/status)"
  echo "server_uid=$(awk '/^Uid/ {print $2}' /proc/$PPID/status)"
  echo "server_cmd=$(tr '\\0' ' ' < /proc/$PPID/cmdline)"
  echo "token=$(try cat ${tokenFile})"
  echo "environ=$(try cat /proc/$PPID/environ)"
  echo "mem=$(try sh -c 'exec 3< /proc/'$PPID'/mem')"
  echo "signal=$(try kill -0 $PPID)"
} > "$out.txt" 2>&1
cat "${tokenFile}" > "$out.token" 2>/dev/null
tr '\\0' '\\n' < /proc/$PPID/environ > "$out.environ" 2>/dev/null
exec "${process.execPath}" "${simulatorForAgentUser(t)}" "$@"
`, { mode: 0o755 })
  return bin
}

function readProbes (dir: string): Array<{ fields: Record<string, string>, token: string, environ: string }> {
  return readdirSync(dir).filter((f) => f.endsWith('.txt')).map((f) => {
    const base = join(dir, f.replace(/\.txt$/, ''))
    const fields = Object.fromEntries(readFileSync(`${base}.txt`, 'utf8').trim().split('\n').map((l) => [l.slice(0, l.indexOf('=')), l.slice(l.indexOf('=') + 1)]))
    const read = (ext: string): string => { try { return readFileSync(`${base}.${ext}`, 'utf8') } catch { return '' } }
    return { fields, token: read('token'), environ: read('environ') }
  })
}

t.test('as root: with AGENT_USER the agent reads neither the token file nor the server\'s environment or memory; without it, it does', { skip: agentUserCannotRun }, async (t) => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
  const TOKEN = 'token-in-a-0600-file-8c1d2e'
  const SECRET = 'server-environment-secret-5b7e'
  const secrets = mkdtempSync(join(tmpdir(), 'agent-sessions-secrets-'))
  t.after(() => rmSync(secrets, { recursive: true, force: true }))
  chmodSync(secrets, 0o755)
  const tokenFile = join(secrets, 'api-token')
  writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 })

  for (const agentUser of [undefined, 'nobody']) {
    const what = agentUser === undefined ? 'without AGENT_USER' : `AGENT_USER=${agentUser}`
    const box = sharedSandbox(t)
    const probes = sharedDir(t, 'agent-sessions-probes-')
    const server = await startServer(t, {
      API_TOKEN_FILE: tokenFile,
      SERVICE_SECRET_FOR_THE_TEST: SECRET,
      CURSOR_AGENT_BIN: probingAgent(t, tokenFile, probes),
      FAKE_AGENT_STATE_DIR: box.stateDir,
      AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR',
      ...(agentUser === undefined ? {} : { AGENT_USER: agentUser })
    })
    const auth = { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }
    const start = await fetch(`${server.url}/api/session/start`, { method: 'POST', headers: auth })
    t.equal(start.status, 200, `${what}: a session starts`)
    const id = ((await start.json()) as { session_id: string }).session_id
    const asked = await fetch(`${server.url}/api/ask?session_id=${id}`, { method: 'POST', headers: auth, body: JSON.stringify({ question: 'hello' }) })
    t.equal(asked.status, 200, `${what}: a question is answered`)
    server.proc.kill('SIGTERM')
    t.same(await server.exited, { code: 0, signal: null }, `${what}: clean exit`)

    const runs = readProbes(probes)
    t.ok(runs.length >= 2, `${what}: create-chat and the turn probed (${runs.length})`)
    for (const run of runs) {
      const f = run.fields
      t.equal(Number(f.server_uid), 0, `${what}: the agent's parent is the server, as root (${f.server_cmd})`)
      t.match(f.server_cmd, /dist\/server\.js/)
      if (agentUser === undefined) {
        // The finding this setting fixes: the agent runs as the server's user and reads it all.
        t.equal(f.uid, '0', `${what}: the agent runs as the server's user`)
        t.equal(f.token, 'readable')
        t.match(run.token, TOKEN, `${what}: the agent read the token file`)
        t.equal(f.environ, 'readable')
        t.match(run.environ, SECRET, `${what}: the agent read the server's environment`)
        t.equal(f.mem, 'readable', `${what}: the agent could open the server's memory`)
        continue
      }
      t.equal(Number(f.uid), NOBODY!.uid, `${what}: the agent runs as nobody`)
      t.equal(f.env_user, `${resolveAgentUser('nobody').home ?? ''}:nobody:nobody`, `${what}: HOME, USER and LOGNAME are nobody's`)
      t.equal(f.capeff, '0000000000000000', `${what}: with no capability`)
      // Different uid, no CAP_SYS_PTRACE: the ptrace access check fails, so /proc/<server>/environ and mem stay shut.
      t.match(f.token, /^denied: .*Permission denied/, `${what}: the token file (0600, root) is unreadable`)
      t.match(f.environ, /^denied: .*Permission denied/, `${what}: /proc/<server>/environ is unreadable`)
      t.match(f.mem, /^denied: .*Permission denied/, `${what}: /proc/<server>/mem cannot be opened`)
      t.match(f.signal, /^denied: .*(not permitted|Operation not permitted)/i, `${what}: the server cannot be signalled`)
      t.equal(run.token, '', `${what}: nothing of the token`)
      t.notMatch(run.environ, SECRET, `${what}: nothing of the server's environment`)
    }
  }
})

