// AGENT_USER: agent processes run as another OS user, so the agent (which runs
// shell commands) can read neither the token file nor the server's
// /proc/<pid>/environ or memory, nor signal it: for a different uid without
// CAP_SYS_PTRACE the kernel's ptrace access check refuses /proc/<pid>/environ
// and /proc/<pid>/mem, and kill() needs a matching uid or CAP_KILL. The
// service refuses to start when it cannot switch users and signal their
// groups, and the teardown ladder works across users.
//
// Most of this needs root (CI runs as root); the agent user is `nobody`, and
// a second unprivileged uid is a number no user database lists.

import t, { type Test } from 'tap'
import { spawn, execFileSync, type ChildProcess } from 'node:child_process'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { resolveAgentUser, switchUserProblem, workspaceAccessProblem } from '../lib/processes/agent-user.js'
import { isProcessAlive } from '../lib/processes/terminate.js'
import { ROOT, SIMULATOR, build, sandbox, waitFor, waitForGone, type Sandbox } from './helpers/index.js'

const SERVER = join(ROOT, 'dist', 'server.js')
const IS_ROOT = process.getuid?.() === 0
let NOBODY: { uid: number, gid: number } | undefined
try {
  const user = resolveAgentUser('nobody')
  NOBODY = { uid: user.uid, gid: user.gid }
} catch {}
const needsRoot = !IS_ROOT ? 'needs root (CI runs as root)' : NOBODY === undefined ? 'needs a `nobody` user' : false
// A uid no user database lists, for a process that is neither root nor the agent user.
const STRANGER_UID = 54321

/** A directory every user may use: what the agent user writes (the simulator's state, the probes) lives here. */
function sharedDir (t: Test, prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix))
  chmodSync(dir, 0o777)
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

function sharedSandbox (t: Test): Sandbox {
  const box = sandbox(t)
  chmodSync(box.stateDir, 0o777)
  return box
}

function uidOf (pid: number): number | undefined {
  try {
    return Number(/^Uid:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1])
  } catch {
    return undefined
  }
}

// The server's children must not inherit tap's loader hooks, nor a token from whoever runs the tests.
function cleanEnv (extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {}
  for (const [key, value] of Object.entries(process.env)) {
    if (key === 'NODE_OPTIONS' || key.startsWith('TAP') || key.startsWith('_TAPJS') || key.startsWith('API_TOKEN') || key === 'AGENT_USER') continue
    env[key] = value
  }
  return { ...env, ...extra }
}

interface Server { proc: ChildProcess, url: string, output: () => string, exited: Promise<{ code: number | null, signal: NodeJS.Signals | null }> }

async function startServer (t: Test, env: Record<string, string>): Promise<Server> {
  const proc = spawn(process.execPath, [SERVER], {
    cwd: ROOT,
    env: cleanEnv({ PORT: '0', HOST: '127.0.0.1', LOG_LEVEL: 'info', KILL_GRACE: '1s', ...env }),
    stdio: ['ignore', 'pipe', 'pipe']
  })
  t.after(() => { if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL') })
  let output = ''
  proc.stdout!.on('data', (chunk: Buffer) => { output += String(chunk) })
  proc.stderr!.on('data', (chunk: Buffer) => { output += String(chunk) })
  const exited = new Promise<{ code: number | null, signal: NodeJS.Signals | null }>((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })))
  const url = await Promise.race([
    waitFor(() => /Server listening at (http:\/\/127\.0\.0\.1:\d+)/.exec(output)?.[1], 30_000, 'the server to listen'),
    exited.then(() => { throw new Error(`the server exited: ${output}`) })
  ])
  return { proc, url, output: () => output, exited }
}

/** Runs the built server until it exits by itself (a refused start); SIGKILLed after 30 s. */
async function refusedStart (command: string[], env: Record<string, string>, uid?: number): Promise<{ code: number | null, output: string }> {
  const [bin, ...args] = command
  const proc = spawn(bin, args, { cwd: ROOT, env: cleanEnv({ PORT: '0', ...env }), stdio: ['ignore', 'pipe', 'pipe'], ...(uid === undefined ? {} : { uid, gid: uid }) })
  let output = ''
  proc.stdout.on('data', (chunk: Buffer) => { output += String(chunk) })
  proc.stderr.on('data', (chunk: Buffer) => { output += String(chunk) })
  const guard = setTimeout(() => proc.kill('SIGKILL'), 30_000)
  const code = await new Promise<number | null>((resolve) => proc.once('exit', resolve))
  clearTimeout(guard)
  return { code, output }
}

t.test('AGENT_USER resolves a name, a uid or uid:gid; root, the service\'s own user and unknown names are refused', async (t) => {
  const passwd = readFileSync('/etc/passwd', 'utf8')
  const line = passwd.split('\n').find((l) => l.startsWith('nobody:'))
  if (line === undefined) {
    t.comment('no nobody user in /etc/passwd: skipped')
    return
  }
  const [, , uid, gid, , home] = line.split(':')
  t.same(resolveAgentUser('nobody'), { uid: Number(uid), gid: Number(gid), name: 'nobody', home })
  t.same(resolveAgentUser(uid), { uid: Number(uid), gid: Number(gid), name: 'nobody', home }, 'a listed uid takes its group, name and home')
  t.same(resolveAgentUser(`${uid}:4321`), { uid: Number(uid), gid: 4321, name: 'nobody', home }, 'uid:gid')
  t.same(resolveAgentUser(String(STRANGER_UID)), { uid: STRANGER_UID, gid: STRANGER_UID, name: undefined, home: undefined }, 'an unlisted uid: gid = uid')
  t.throws(() => resolveAgentUser('root'), /root would give the agent everything/)
  t.throws(() => resolveAgentUser('0'), /root/)
  t.throws(() => resolveAgentUser(`${STRANGER_UID}:0`), /group 0/)
  t.throws(() => resolveAgentUser(String(process.getuid!())), /the service's own user|root/)
  t.throws(() => resolveAgentUser('no-such-user-for-agent-sessions'), /no such user/)
  t.throws(() => resolveAgentUser('bad name!'), /not a user name/)
})

t.test('switching users needs CAP_SETUID, CAP_SETGID and CAP_KILL (read from CapEff), and no ambient capabilities', async (t) => {
  const user = { uid: STRANGER_UID, gid: STRANGER_UID }
  const status = (eff: string, amb = '0000000000000000'): string => `Name:\tnode\nCapInh:\t0000000000000000\nCapEff:\t${eff}\nCapAmb:\t${amb}\n`
  t.equal(switchUserProblem(user, status('000001ffffffffff')), undefined, 'every capability')
  t.equal(switchUserProblem(user, status('00000000000000e0')), undefined, 'exactly SETUID, SETGID and KILL')
  t.match(switchUserProblem(user, status('0000000000000000')), /lacks CAP_SETUID, CAP_SETGID, CAP_KILL \(CapEff 0000000000000000/)
  t.match(switchUserProblem(user, status('00000000000000c0')), /lacks CAP_KILL\b/)
  t.match(switchUserProblem(user, status('00000000000000a0')), /lacks CAP_SETGID\b/)
  if (process.getuid?.() !== 0) {
    t.match(switchUserProblem(user, status('00000000000000e0', '00000000000000e0')), /ambient capabilities/, 'a non-root service with ambient capabilities')
  }
})

t.test('WORKSPACE_DIR must be enterable and listable by the agent user', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'agent-sessions-ws-'))
  t.after(() => rmSync(base, { recursive: true, force: true }))
  chmodSync(base, 0o755)
  const open = join(base, 'open')
  const closed = join(base, 'closed')
  const inner = join(closed, 'inner')
  mkdirSync(open, { mode: 0o755 })
  mkdirSync(inner, { recursive: true, mode: 0o755 })
  chmodSync(closed, 0o700)
  const other = { uid: STRANGER_UID, gid: STRANGER_UID }
  t.equal(workspaceAccessProblem(other, open), undefined)
  t.match(workspaceAccessProblem(other, closed), /closed is not readable and searchable by it \(mode 0700, owner \d+:\d+\)/)
  t.match(workspaceAccessProblem(other, inner), /closed, on the way to .*inner, cannot be entered by it \(mode 0700/)
  const owner = { uid: process.getuid!(), gid: process.getgid!() }
  t.equal(workspaceAccessProblem(owner, closed), undefined, 'its owner can')
})

t.test('as root: a WORKSPACE_DIR the agent user cannot enter stops start-up, naming both settings', { skip: needsRoot }, async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-private-'))
  t.after(() => rmSync(dir, { recursive: true, force: true }))
  chmodSync(dir, 0o700)
  await t.rejects(build(t, sharedSandbox(t), { agentUser: 'nobody', workspaceDir: dir }),
    { message: /WORKSPACE_DIR \(option workspaceDir\) must be a directory AGENT_USER nobody \(uid \d+, gid \d+\) can enter and list: .* is not readable and searchable by it \(mode 0700/ })
  await t.rejects(build(t, sharedSandbox(t), { agentUser: 'no-such-user-for-agent-sessions' }),
    { message: /AGENT_USER \(option agentUser\) must be a user name or uid\[:gid\] of another user than the service's \(no such user\), got "no-such-user-for-agent-sessions"/ })
})

t.test('as root: the server refuses AGENT_USER when it cannot switch users and signal them', { skip: needsRoot }, async (t) => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
  const env = { AGENT_USER: String(STRANGER_UID + 1), CURSOR_AGENT_BIN: SIMULATOR, WORKSPACE_DIR: tmpdir() }
  // Not root: no capabilities at all.
  const asNobody = await refusedStart([process.execPath, SERVER], env, NOBODY!.uid)
  t.equal(asNobody.code, 1, asNobody.output)
  t.match(asNobody.output, /AGENT_USER=\d+ \(option agentUser\): the service cannot run processes as uid \d+ and signal them: it lacks CAP_SETUID, CAP_SETGID, CAP_KILL/)
  t.match(asNobody.output, /Run the service as root, or grant it the SETUID, SETGID and KILL capabilities, or unset AGENT_USER/)
  t.notMatch(asNobody.output, /Server listening/)

  let setpriv = true
  try { execFileSync('setpriv', ['--help'], { stdio: 'ignore' }) } catch { setpriv = false }
  if (!setpriv) return t.comment('setpriv is missing: the root-without-capabilities cases were not run')
  // Root, but a container that dropped the capabilities.
  const dropped = await refusedStart(['setpriv', '--bounding-set', '-setuid,-setgid,-kill', process.execPath, SERVER], env)
  t.equal(dropped.code, 1, dropped.output)
  t.match(dropped.output, /it lacks CAP_SETUID, CAP_SETGID, CAP_KILL/, 'root without the capabilities is refused')
  const noKill = await refusedStart(['setpriv', '--bounding-set', '-kill', process.execPath, SERVER], env)
  t.match(noKill.output, /it lacks CAP_KILL \(/, 'root that may switch users but not signal them is refused')
  // Not root, with the capabilities as ambient ones: the agent would inherit them.
  const ambient = await refusedStart(['setpriv', '--reuid', String(STRANGER_UID), '--regid', String(STRANGER_UID), '--clear-groups',
    '--inh-caps', '+setuid,+setgid,+kill', '--ambient-caps', '+setuid,+setgid,+kill', process.execPath, SERVER], env)
  t.equal(ambient.code, 1, ambient.output)
  t.match(ambient.output, /ambient capabilities \(CapAmb 00000000000000e0\), which the agent would inherit/)
})

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
exec "${process.execPath}" "${SIMULATOR}" "$@"
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

t.test('as root: with AGENT_USER the agent reads neither the token file nor the server\'s environment or memory; without it, it does', { skip: needsRoot }, async (t) => {
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

t.test('as root: an AGENT_USER agent that ignores SIGTERM is still torn down, with its grandchild', { skip: needsRoot }, async (t) => {
  const box = sharedSandbox(t)
  const app = await build(t, box, { agentUser: 'nobody', killGrace: '1s' })
  t.equal(app.agentSessionsConfig.agentUser?.uid, NOBODY!.uid)
  const start = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(start.statusCode, 200, start.body)
  const id = start.json().session_id as string
  const pending = app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' } })
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 30_000, 'the stuck turn and its grandchild')
  const turn = box.pids().filter((p) => p.role === 'main' || p.role === 'grandchild').slice(-2)
  for (const { pid, role } of turn) t.equal(uidOf(pid), NOBODY!.uid, `the ${role} runs as nobody`)
  const ended = new Promise<{ stage: string }>((resolve) => app.agentSessions.once('session-ended', resolve))
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })).statusCode, 200)
  t.equal((await pending).statusCode, 404, 'the in-flight ask is answered')
  t.equal((await ended).stage, 'killed', 'SIGTERM was ignored, SIGKILL ended it')
  t.same(await waitForGone(box.pids().map((p) => p.pid), 5000), [], 'no agent process left')
})

t.test('as root: a second signal kills AGENT_USER agents at once', { skip: needsRoot }, async (t) => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
  const box = sharedSandbox(t)
  const server = await startServer(t, {
    AGENT_USER: 'nobody', KILL_GRACE: '60s', CURSOR_AGENT_BIN: SIMULATOR, FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  })
  const start = await fetch(`${server.url}/api/session/start`, { method: 'POST' })
  const id = ((await start.json()) as { session_id: string }).session_id
  void fetch(`${server.url}/api/ask?session_id=${id}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' }) }).catch(() => {})
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 30_000, 'a stuck turn')
  server.proc.kill('SIGTERM')
  await waitFor(() => /"msg":"closing"/.test(server.output()), 30_000, 'the first signal to be handled')
  server.proc.kill('SIGINT')
  t.same(await server.exited, { code: 1, signal: null }, 'the forced exit')
  t.match(server.output(), /second signal: agent processes killed/)
  t.same(await waitForGone(box.pids().map((p) => p.pid), 5000), [], 'every agent group was SIGKILLed across users')
})

t.test('as root: from a process that may not signal another user\'s group, the group counts as alive and signalling it fails loudly', { skip: needsRoot }, async (t) => {
  // A group of the agent user's, and a process of a third uid without capabilities looking at it.
  const group = spawn('sleep', ['600'], { uid: NOBODY!.uid, gid: NOBODY!.gid, detached: true, stdio: 'ignore' })
  t.after(() => { try { process.kill(-group.pid!, 'SIGKILL') } catch {} })
  await waitFor(() => isProcessAlive(group.pid!), 10_000, 'the group')
  const script = `
    const m = await import(${JSON.stringify(join(ROOT, 'lib', 'processes', 'terminate.ts'))})
    const out = { alive: m.isGroupAlive(${group.pid}), exists: m.signalGroup(${group.pid}, 0), gone: m.isGroupAlive(2147483646) }
    try { m.signalGroup(${group.pid}, 'SIGTERM'); out.term = 'sent' } catch (err) { out.term = err.code + ': ' + err.message }
    m.trackGroup(${group.pid}); out.killedNow = m.killTrackedGroupsNow()
    try { await m.terminateProcessGroup(${group.pid}, { graceMs: 100 }); out.ladder = 'done' } catch (err) { out.ladder = err.code }
    console.log(JSON.stringify(out))`
  const tsx = join(ROOT, 'node_modules', 'tsx', 'dist', 'esm', 'index.mjs')
  const out = execFileSync(process.execPath, ['--import', tsx, '--input-type=module', '-e', script],
    { cwd: ROOT, env: cleanEnv({ HOME: tmpdir() }), uid: STRANGER_UID, gid: STRANGER_UID, encoding: 'utf8', timeout: 60_000 })
  const result = JSON.parse(out.trim().split('\n').pop()!)
  t.equal(result.alive, true, 'kill(-pgid, 0) answers EPERM: the group exists, so it is alive')
  t.equal(result.exists, true)
  t.equal(result.gone, false, 'a group that does not exist is not alive (ESRCH)')
  t.match(result.term, /^EPERM: Not permitted to send SIGTERM to process group \d+: its processes run as another user/, 'a real signal that was not delivered throws')
  t.equal(result.killedNow, 0, 'the last-resort kill goes on past a group it may not signal')
  t.equal(result.ladder, 'EPERM', 'the ladder reports it instead of calling the group gone')
  t.ok(isProcessAlive(group.pid!), 'the group was indeed not touched')
})
