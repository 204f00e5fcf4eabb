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
import { execFileSync } from 'node:child_process'
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { capabilityLeakProblem, resolveAgentUser, switchUserProblem, workspaceAccessProblem } from '../lib/processes/agent-user.js'
import { SIMULATOR, build } from './helpers/index.js'
import { checkoutOutOfReach, needsRoot, NOBODY, refusedStart, SERVER, sharedSandbox, STRANGER_UID } from './helpers/agent-user.js'

// (What the agent can reach, and teardown across users: test/agent-user-isolation.test.ts, test/agent-user-teardown.test.ts.)

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
  t.notMatch(switchUserProblem(user, status('0000000000000000')), /no_new_privs/)
  t.match(switchUserProblem(user, `${status('0000000000000000')}NoNewPrivs:\t1\n`),
    /lacks CAP_SETUID, CAP_SETGID, CAP_KILL .*; no_new_privs is set \(NoNewPrivs 1: Kubernetes' allowPrivilegeEscalation: false, --security-opt no-new-privileges\), which makes the kernel ignore file capabilities/,
    'no_new_privs named: it is why file capabilities did not apply')
  if (process.getuid?.() !== 0) {
    t.match(switchUserProblem(user, status('00000000000000e0', '00000000000000e0')), /ambient capabilities/, 'a non-root service with ambient capabilities')
  }
})

t.test('a non-root service holding capabilities through its program\'s file capabilities: the agent user must not be able to execute that program', async (t) => {
  const base = mkdtempSync(join(tmpdir(), 'agent-sessions-caps-'))
  t.after(() => rmSync(base, { recursive: true, force: true }))
  chmodSync(base, 0o755)
  const program = join(base, 'node')
  writeFileSync(program, '')
  const agent = { uid: STRANGER_UID, gid: STRANGER_UID, name: 'agent' }
  const status = (prm: string, eff = prm): string => `Name:\tnode\nCapPrm:\t${prm}\nCapEff:\t${eff}\nCapAmb:\t0000000000000000\n`
  const service = { execPath: program, euid: 1000, status: status('00000000000000e0') }
  chmodSync(program, 0o755)
  t.match(capabilityLeakProblem(agent, service),
    new RegExp(`^${program} gives its capabilities \\(CapPrm 00000000000000e0, file capabilities\\) to whoever runs it, and agent can execute it \\(mode 0755, owner \\d+:\\d+\\)`))
  t.equal(capabilityLeakProblem(agent, { ...service, status: status('0000000000000000') }), undefined, 'no capabilities: nothing to gain')
  t.equal(capabilityLeakProblem(agent, { ...service, euid: 0 }), undefined, 'root: its capabilities are its uid\'s, lost on becoming the agent user')
  chmodSync(program, 0o750)
  t.equal(capabilityLeakProblem(agent, service), undefined, 'mode 0750, not the agent\'s group: it cannot execute it')
  t.match(capabilityLeakProblem({ ...agent, gid: statSync(program).gid }, service), /can execute it \(mode 0750/, 'unless it is the program\'s group')
  chmodSync(program, 0o755)
  chmodSync(base, 0o700)
  t.equal(capabilityLeakProblem(agent, service), undefined, 'nor through a directory it cannot enter')
  chmodSync(base, 0o755)
  const link = join(base, 'node-link')
  symlinkSync(program, link)
  t.match(capabilityLeakProblem(agent, { ...service, execPath: link }), new RegExp(`^${program} gives`), 'the program behind a symlink')
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
  // Not root: no capabilities at all. The server runs from this checkout, so nobody must reach it
  // (a checkout under a directory only root enters, as `mktemp -d` makes, cannot run as nobody).
  const unreachable = checkoutOutOfReach(NOBODY!.uid, NOBODY!.gid)
  if (unreachable !== undefined) {
    t.comment(`the checkout is out of nobody's reach (${unreachable}): the not-root case was not run`)
  } else {
    const asNobody = await refusedStart([process.execPath, SERVER], env, NOBODY!.uid)
    t.equal(asNobody.code, 1, asNobody.output)
    t.match(asNobody.output, /AGENT_USER=\d+ \(option agentUser\): the service cannot run processes as uid \d+ and signal them: it lacks CAP_SETUID, CAP_SETGID, CAP_KILL/)
    t.match(asNobody.output, /Run the service as root, or grant it the SETUID, SETGID and KILL capabilities, or unset AGENT_USER/)
    t.notMatch(asNobody.output, /Server listening/)
  }

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
  const strangerCannotReach = checkoutOutOfReach(STRANGER_UID, STRANGER_UID)
  if (strangerCannotReach !== undefined) return t.comment(`the checkout is out of reach of uid ${STRANGER_UID} (${strangerCannotReach}): the ambient case was not run`)
  const ambient = await refusedStart(['setpriv', '--reuid', String(STRANGER_UID), '--regid', String(STRANGER_UID), '--clear-groups',
    '--inh-caps', '+setuid,+setgid,+kill', '--ambient-caps', '+setuid,+setgid,+kill', process.execPath, SERVER], env)
  t.equal(ambient.code, 1, ambient.output)
  t.match(ambient.output, /ambient capabilities \(CapAmb 00000000000000e0\), which the agent would inherit/)
})

