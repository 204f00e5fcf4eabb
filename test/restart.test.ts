// Sessions outlive the server process: SIGTERM hibernates them into the store,
// SIGKILL leaves agents that the next start tears down before it serves, and
// either way every old session id answers with its conversation. Store faults
// (a damaged file, a full disk, a read-only directory, a second server) never
// take the service down or lose the rest.

import t, { type Test } from 'tap'
import { spawn, execFileSync } from 'node:child_process'
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { sandbox, waitFor, waitForGone, type Sandbox } from './helpers/index.js'
import { post, spawnServer, startServer, tempStateDir, type ServerProcess } from './helpers/server-process.js'
import { isProcessAlive } from '../lib/processes/terminate.js'
import { processStartTime, bootId } from '../lib/processes/records.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))
// Restarts on a busy 2-core machine: a start with an orphan sweep took 9 s at load 16.
const GENEROUS_MS = 90_000

function acpEnv (box: Sandbox, dir: string, faults = ''): Record<string, string> {
  return {
    STATE_DIR: dir,
    AGENT_PROTOCOL: 'acp',
    AGENT_COMMAND: `"${process.execPath}" "${ACP_SIMULATOR}"`,
    FAKE_AGENT_STATE_DIR: box.stateDir,
    FAKE_ACP_FAULTS: faults,
    AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR,FAKE_ACP_FAULTS'
  }
}

/**
 * A server on the ACP simulator (its agents ignore SIGTERM and leave a
 * grandchild) with a store, and two sessions asked `<word> 1` and `<word> 2`.
 */
async function serverWithTwoSessions (t: Test, word: string): Promise<{ box: Sandbox, dir: string, env: Record<string, string>, first: ServerProcess, ids: string[] }> {
  const box = sandbox(t)
  const dir = tempStateDir(t)
  const env = acpEnv(box, dir, 'ignore-sigterm,grandchild')
  const first = await startServer(t, { env })
  const ids: string[] = []
  for (const n of [1, 2]) {
    const id = (await post(`${first.url}/api/session/start`)).json.session_id as string
    t.equal((await post(`${first.url}/api/ask?session_id=${id}`, { question: `${word} ${n}` })).status, 200)
    ids.push(id)
  }
  return { box, dir, env, first, ids }
}

t.test('SIGTERM with a store hibernates every session; the next start brings every id back with its context', async (t) => {
  const { box, env, first, ids } = await serverWithTwoSessions(t, 'remember')
  const events = await fetch(`${first.url}/api/session/events?session_id=${ids[0]}`)
  const stuck = post(`${first.url}/api/ask?session_id=${ids[1]}`, { question: 'stuck [[fault:hang-on-prompt]]' })
  await waitFor(() => box.calls().filter((l) => l.includes('session/prompt')).length === 3, 'the stuck turn reached its agent', GENEROUS_MS)
  const oldAgents = box.pids().map((p) => p.pid)

  first.proc.kill('SIGTERM')
  const stuckAnswer = await stuck
  t.equal(stuckAnswer.status, 503, 'the ask in flight is answered 503')
  const exit = await Promise.race([first.exited, new Promise<never>((_resolve, reject) => setTimeout(() => reject(new Error(JSON.stringify(first.logs.slice(-15)))), 60_000))])
  t.equal(exit.code, 0)
  t.same(await waitForGone(oldAgents, GENEROUS_MS), [], 'no agent process (grandchildren included) outlives the server')
  const stream = await events.text()
  t.match(stream, /event: state\ndata: \{"state":"hibernated"\}/, 'the session stream says hibernated, then closes')
  t.notMatch(stream, /event: ended/)
  t.notOk(box.calls().some((l) => l.includes('session/close')), 'hibernation never sends session/close')
  t.equal(first.logs.filter((l) => l.msg === 'session hibernated' && l.why === 'shutdown').length, 2)

  const second = await startServer(t, { env })
  t.ok(second.logs.some((l) => l.msg === 'sessions restored from the store' && l.sessions === 2))
  for (const [i, id] of ids.entries()) {
    const beat = await post(`${second.url}/api/heartbeat?session_id=${id}`)
    t.equal(beat.status, 200, `old id ${i + 1} answers heartbeats`)
    const answer = await post(`${second.url}/api/ask?session_id=${id}`, { question: 'still me?' })
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, new RegExp(`previous question "remember ${i + 1}"`), 'the conversation is the same')
  }
  const history = await (await fetch(`${second.url}/api/session/history?session_id=${ids[0]}`)).json() as { turns: Array<{ question: string }> }
  t.same(history.turns.map((turn) => turn.question), ['remember 1', 'still me?'], 'the history outlived the restart')
  second.proc.kill('SIGTERM')
  await second.exited
  t.same(await waitForGone(box.pids().map((p) => p.pid), GENEROUS_MS), [], 'nothing left running')
})

t.test('SIGKILL leaves agents running; the next start tears them down before it serves, and leaves a stranger alone', async (t) => {
  const { box, dir, env, first, ids } = await serverWithTwoSessions(t, 'note')
  // One grandchild per live agent (the start-up probe's is gone already).
  await waitFor(() => box.pids().filter((p) => p.role === 'grandchild' && isProcessAlive(p.pid)).length === 2, 'two live grandchildren', GENEROUS_MS)
  first.proc.kill('SIGKILL')
  await first.exited
  // The agents may leave by themselves once their stdin closes with the server; their grandchildren stay.
  const oldRun = box.pids().map((p) => p.pid)
  const orphans = box.pids().filter((p) => p.role === 'grandchild' && isProcessAlive(p.pid))
  t.equal(orphans.length, 2, 'a SIGKILLed server leaves its agents\' grandchildren running')

  // A record whose pid now belongs to an unrelated process: it must survive the sweep.
  const stranger = spawn('sleep', ['120'], { detached: true, stdio: 'ignore' })
  t.after(() => { try { process.kill(stranger.pid!, 'SIGKILL') } catch {} })
  const recordFile = join(dir, 'processes.json')
  const record = JSON.parse(readFileSync(recordFile, 'utf8')) as { version: number, groups: Array<Record<string, unknown>> }
  record.groups.push({ pgid: stranger.pid, startTime: (processStartTime(stranger.pid!) ?? 0) + 1, bootId: bootId() })
  writeFileSync(recordFile, JSON.stringify(record))

  const startedAt = Date.now()
  const second = spawnServer(t, { ...env, KILL_GRACE: '1s' })
  await waitFor(() => second.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('Server listening')), 'the restart to listen', GENEROUS_MS)
  const listenedAt = Date.now()
  const alive = oldRun.filter(isProcessAlive)
  t.same(alive, [], `every agent of the old run was gone before the server served (${listenedAt - startedAt} ms after its start, KILL_GRACE 1 s)`)
  const sweep = second.logs.find((l) => l.msg === 'agent processes left by an earlier run torn down')
  t.match(sweep, { reaped: 2, notOurs: 1 })
  t.ok(isProcessAlive(stranger.pid!), 'the unrelated process is alive')
  const url = /http:\/\/127\.0\.0\.1:\d+/.exec(second.logs.find((l) => typeof l.msg === 'string' && l.msg.startsWith('Server listening'))!.msg as string)![0]
  const metrics = await (await fetch(`${url}/metrics`)).text()
  t.match(metrics, /agent_orphans_reaped_total 2/)

  for (const [i, id] of ids.entries()) {
    const answer = await post(`${url}/api/ask?session_id=${id}`, { question: 'back?' })
    t.equal(answer.status, 200, JSON.stringify(answer.json))
    t.match(answer.json.answer, new RegExp(`previous question "note ${i + 1}"`), 'the conversation survived the crash')
  }
  second.proc.kill('SIGTERM')
  await second.exited
})

t.test('the cursor driver\'s sessions survive a restart too', async (t) => {
  const box = sandbox(t)
  const dir = tempStateDir(t)
  const env = { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR' }
  const first = await startServer(t, { env })
  const id = (await post(`${first.url}/api/session/start`)).json.session_id as string
  t.equal((await post(`${first.url}/api/ask?session_id=${id}`, { question: 'one' })).status, 200)
  first.proc.kill('SIGTERM')
  t.equal((await first.exited).code, 0)
  const second = await startServer(t, { env })
  const answer = await post(`${second.url}/api/ask?session_id=${id}`, { question: 'two' })
  t.equal(answer.status, 200, JSON.stringify(answer.json))
  t.match(answer.json.answer, /^Answer 2:/, 'the same chat goes on')
  second.proc.kill('SIGTERM')
  await second.exited
})

t.test('ended ids keep their reason across a restart', async (t) => {
  const box = sandbox(t)
  const dir = tempStateDir(t)
  const env = { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR' }
  const first = await startServer(t, { env })
  const id = (await post(`${first.url}/api/session/start`)).json.session_id as string
  t.equal((await post(`${first.url}/api/session/end?session_id=${id}`)).status, 200)
  first.proc.kill('SIGTERM')
  await first.exited
  const second = await startServer(t, { env })
  const gone = await post(`${second.url}/api/heartbeat?session_id=${id}`)
  t.equal(gone.status, 404)
  t.equal(gone.json.reason, 'ended')
  second.proc.kill('SIGTERM')
  await second.exited
})

t.test('a second server on the same STATE_DIR refuses to start, saying why', async (t) => {
  const box = sandbox(t)
  const dir = tempStateDir(t)
  const env = { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir }
  const first = await startServer(t, { env })
  const second = spawnServer(t, env)
  const exit = await second.exited
  t.equal(exit.code, 1)
  t.match(second.logs.map((l) => l.stderr ?? '').join(''), new RegExp(`Another server \\(pid ${first.proc.pid}\\) is using STATE_DIR`))
  first.proc.kill('SIGTERM')
  await first.exited
})

t.test('a damaged or newer state file is moved aside with a warning; the server starts; the process record is kept', async (t) => {
  for (const [what, text] of [['corrupt', '{"version":2,"sessions":[{"id":'], ['truncated', ''], ['newer', JSON.stringify({ version: 99, sessions: [], ended: [] })]] as const) {
    const box = sandbox(t)
    const dir = tempStateDir(t)
    writeFileSync(join(dir, 'sessions.json'), text)
    const server = await startServer(t, { env: { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir } })
    const warning = server.logs.find((l) => l.msg === 'session store unreadable: moved aside, starting with no stored sessions')
    t.ok(warning, `${what}: a warning says so`)
    t.ok(readdirSync(dir).some((name) => name.startsWith('sessions.json.unreadable-')), `${what}: the damaged file is kept aside`)
    const start = await post(`${server.url}/api/session/start`)
    t.equal(start.status, 200, `${what}: the server serves`)
    server.proc.kill('SIGTERM')
    await server.exited
  }
})

t.test('a state file of the previous format is migrated, not moved aside', async (t) => {
  const box = sandbox(t)
  const dir = tempStateDir(t)
  const now = Date.now()
  const chat = '7f5e2c1a-0b9d-4c3e-8a6f-2d4b1e9c0a77'
  writeFileSync(join(dir, 'sessions.json'), JSON.stringify({
    version: 1,
    savedAt: now,
    sessions: [{ id: 'old-session', ref: { protocol: 'cursor', chatId: chat }, workspaceDir: '/', createdAt: now, lastActivity: now, lastTurnEndedAt: now, idleTimeoutMs: 600_000 }],
    ended: [{ id: 'old-ended', reason: 'expired', idleMs: 1000, endedAt: now }]
  }))
  const server = await startServer(t, { env: { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir } })
  t.notOk(readdirSync(dir).some((name) => name.includes('unreadable')), 'nothing moved aside')
  t.equal((await post(`${server.url}/api/heartbeat?session_id=old-session`)).status, 200, 'the old session is back')
  const history = await (await fetch(`${server.url}/api/session/history?session_id=old-session`)).json() as { turns: unknown[] }
  t.same(history.turns, [], 'with an empty history (format 1 had none)')
  t.equal((await post(`${server.url}/api/heartbeat?session_id=old-ended`)).json.reason, 'expired')
  server.proc.kill('SIGTERM')
  await server.exited
  t.equal(JSON.parse(readFileSync(join(dir, 'sessions.json'), 'utf8')).version, 2, 'written back in the current format')
})

function mountTmpfs (t: { after: (fn: () => unknown) => void }, options: string): string | null {
  const dir = mkdtempSync(join(tmpdir(), 'agent-sessions-mount-'))
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', dir], { stdio: 'ignore' })
  } catch {
    rmSync(dir, { recursive: true, force: true })
    return null
  }
  t.after(() => {
    try { execFileSync('umount', ['-l', dir], { stdio: 'ignore' }) } catch {}
    rmSync(dir, { recursive: true, force: true })
  })
  return dir
}

const CAN_MOUNT = canMount()
const NEEDS_MOUNT = CAN_MOUNT ? false : 'mounting a tmpfs needs root (CI runs as root)'

function canMount (): boolean {
  const probe = mountTmpfs({ after: () => {} }, 'size=16k')
  if (probe === null) return false
  try { execFileSync('umount', [probe], { stdio: 'ignore' }) } catch {}
  rmSync(probe, { recursive: true, force: true })
  return true
}

t.test('a read-only STATE_DIR stops the start with a clear message', { skip: NEEDS_MOUNT }, async (t) => {
  const box = sandbox(t)
  const dir = mountTmpfs(t, 'ro,size=64k') as string
  const server = spawnServer(t, { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir })
  t.equal((await server.exited).code, 1)
  t.match(server.logs.map((l) => l.stderr ?? '').join(''), /STATE_DIR .* cannot be used: .*read-only.*STATE_DIR=off/i)
})

t.test('a full disk never stops the service: health says degraded, and it recovers when space returns', { skip: NEEDS_MOUNT }, async (t) => {
  const box = sandbox(t)
  const dir = mountTmpfs(t, 'size=256k') as string
  const server = await startServer(t, { env: { STATE_DIR: dir, FAKE_AGENT_STATE_DIR: box.stateDir, AGENT_ENV_PASS: 'FAKE_AGENT_STATE_DIR' } })
  const filler = join(dir, 'filler')
  // Fill what is left (dd stops with "No space left on device").
  try { execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=4k'], { stdio: 'ignore' }) } catch {}
  const id = (await post(`${server.url}/api/session/start`)).json.session_id as string
  t.ok(id, 'a session starts though the store cannot write')
  const healthWhen = async (ok: boolean): Promise<Record<string, any>> => {
    const deadline = Date.now() + GENEROUS_MS
    for (;;) {
      const health = await (await fetch(`${server.url}/api/health`)).json() as Record<string, any>
      if (health.store.ok === ok || Date.now() > deadline) return health
      await new Promise((resolve) => setTimeout(resolve, 100))
    }
  }
  const degraded = await healthWhen(false)
  t.equal(degraded.store.ok, false, 'the failed write shows')
  t.equal(degraded.status, 'degraded')
  t.match(degraded.store.last_error, /ENOSPC|no space/i)
  t.equal((await post(`${server.url}/api/ask?session_id=${id}`, { question: 'still serving?' })).status, 200, 'asks work on')

  rmSync(filler)
  const recovered = await healthWhen(true)
  t.equal(recovered.store.ok, true, 'the store writes again')
  t.equal(recovered.status, 'ok')
  server.proc.kill('SIGTERM')
  await server.exited
  const stored = JSON.parse(readFileSync(join(dir, 'sessions.json'), 'utf8')) as { sessions: Array<{ id: string }> }
  t.ok(stored.sessions.some((s) => s.id === id), 'the session written once space returned')
})
