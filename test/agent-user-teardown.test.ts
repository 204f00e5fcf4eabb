// AGENT_USER and the teardown ladder: as root, agents running as nobody are
// torn down when they ignore SIGTERM, on a second signal, and a process that
// may not signal another user's group neither crashes nor calls it gone.

import t from 'tap'
import { spawn, execFileSync } from 'node:child_process'
import { existsSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { isProcessAlive } from '../lib/processes/terminate.js'
import { ROOT, build, waitFor, waitForGone } from './helpers/index.js'
import { agentUserCannotRun, checkoutOutOfReach, cleanEnv, NOBODY, SERVER, sharedDir, sharedSandbox, simulatorForAgentUser, startServer, STRANGER_UID, uidOf } from './helpers/agent-user.js'

t.test('as root: an AGENT_USER agent that ignores SIGTERM is still torn down, with its grandchild', { skip: agentUserCannotRun }, async (t) => {
  const box = sharedSandbox(t)
  const app = await build(t, box, { agentUser: 'nobody', killGrace: '1s', workspaceDir: sharedDir(t, 'agent-sessions-workspace-'), cursorAgentBin: simulatorForAgentUser(t) })
  t.equal(app.agentSessionsConfig.agentUser?.uid, NOBODY!.uid)
  const start = await app.inject({ method: 'POST', url: '/api/session/start' })
  t.equal(start.statusCode, 200, start.body)
  const id = start.json().session_id as string
  const pending = app.inject({ method: 'POST', url: `/api/ask?session_id=${id}`, payload: { question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' } })
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'the stuck turn and its grandchild', 30_000)
  const turn = box.pids().filter((p) => p.role === 'main' || p.role === 'grandchild').slice(-2)
  for (const { pid, role } of turn) t.equal(uidOf(pid), NOBODY!.uid, `the ${role} runs as nobody`)
  const ended = new Promise<{ stage: string }>((resolve) => app.agentSessions.once('session-ended', resolve))
  t.equal((await app.inject({ method: 'POST', url: `/api/session/end?session_id=${id}` })).statusCode, 200)
  t.equal((await pending).statusCode, 404, 'the in-flight ask is answered')
  t.equal((await ended).stage, 'killed', 'SIGTERM was ignored, SIGKILL ended it')
  t.same(await waitForGone(box.pids().map((p) => p.pid), 5000), [], 'no agent process left')
})

t.test('as root: a second signal kills AGENT_USER agents at once', { skip: agentUserCannotRun }, async (t) => {
  if (!existsSync(SERVER)) throw new Error('dist/server.js is missing: run `npm run build` (npm test does)')
  const box = sharedSandbox(t)
  const server = await startServer(t, {
    AGENT_USER: 'nobody', KILL_GRACE: '60s', CURSOR_AGENT_BIN: simulatorForAgentUser(t), FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR'
  })
  const start = await fetch(`${server.url}/api/session/start`, { method: 'POST' })
  const id = ((await start.json()) as { session_id: string }).session_id
  void fetch(`${server.url}/api/ask?session_id=${id}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ question: 'stuck [[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]]' }) }).catch(() => {})
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'a stuck turn', 30_000)
  server.proc.kill('SIGTERM')
  await waitFor(() => /"msg":"closing"/.test(server.output()), 'the first signal to be handled', 30_000)
  server.proc.kill('SIGINT')
  t.same(await server.exited, { code: 1, signal: null }, 'the forced exit')
  t.match(server.output(), /second signal: agent processes killed/)
  t.same(await waitForGone(box.pids().map((p) => p.pid), 5000), [], 'every agent group was SIGKILLed across users')
})

t.test('as root: from a process that may not signal another user\'s group, the group counts as alive and signalling it fails loudly', { skip: agentUserCannotRun }, async (t) => {
  // A group of the agent user's, and a process of a third uid without capabilities looking at it.
  const group = spawn('sleep', ['600'], { uid: NOBODY!.uid, gid: NOBODY!.gid, detached: true, stdio: 'ignore' })
  t.after(() => { try { process.kill(-group.pid!, 'SIGKILL') } catch {} })
  await waitFor(() => isProcessAlive(group.pid!), 'the group', 10_000)
  const script = `
    const m = await import(${JSON.stringify(join(ROOT, 'lib', 'processes', 'terminate.ts'))})
    const out = { alive: m.isGroupAlive(${group.pid}), exists: m.signalGroup(${group.pid}, 0), gone: m.isGroupAlive(2147483646) }
    try { m.signalGroup(${group.pid}, 'SIGTERM'); out.term = 'sent' } catch (err) { out.term = err.code + ': ' + err.message }
    m.trackGroup(${group.pid}); out.killedNow = m.killTrackedGroupsNow()
    try { await m.terminateProcessGroup(${group.pid}, { graceMs: 100 }); out.ladder = 'done' } catch (err) { out.ladder = err.code }
    console.log(JSON.stringify(out))`
  const unreachable = checkoutOutOfReach(STRANGER_UID, STRANGER_UID)
  if (unreachable !== undefined) return t.comment(`the checkout is out of reach of uid ${STRANGER_UID} (${unreachable}): not run`)
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
