// The teardown ladder against real process groups.

import t from 'tap'
import { spawn } from 'node:child_process'
import { isGroupAlive, isProcessAlive, terminateProcessGroup } from '../lib/processes/terminate.js'
import { waitFor, waitForGone } from './helpers/index.js'

// A group leader that starts a grandchild and prints both pids; optionally both ignore SIGTERM.
function startGroup (t: { after: (fn: () => unknown) => void }, ignoreTerm: boolean): Promise<{ leader: number, grandchild: number }> {
  const trap = ignoreTerm ? "process.on('SIGTERM', () => {});" : ''
  const child = `${trap} setInterval(() => {}, 1000)`
  const leader = `${trap}
    const c = require('node:child_process').spawn(process.execPath, ['-e', ${JSON.stringify(child)}], { stdio: 'ignore' });
    console.log(process.pid + ' ' + c.pid); setInterval(() => {}, 1000)`
  const proc = spawn(process.execPath, ['-e', leader], { detached: true, stdio: ['ignore', 'pipe', 'inherit'] })
  t.after(() => { try { process.kill(-proc.pid!, 'SIGKILL') } catch {} })
  return new Promise((resolve) => {
    proc.stdout.once('data', (data: Buffer) => {
      const [leaderPid, grandchild] = String(data).trim().split(' ').map(Number)
      resolve({ leader: leaderPid, grandchild })
    })
  })
}

t.test('a group that is already gone reports exited', async (t) => {
  const proc = spawn(process.execPath, ['-e', ''], { detached: true, stdio: 'ignore' })
  await new Promise((resolve) => proc.once('exit', resolve))
  const report = await terminateProcessGroup(proc.pid!, { graceMs: 1000 })
  t.equal(report.stage, 'exited')
  t.equal(report.signal, null)
})

t.test('the polite signal ends a well-behaved group, grandchild included', async (t) => {
  const { leader, grandchild } = await startGroup(t, false)
  const report = await terminateProcessGroup(leader, { graceMs: 3000 })
  t.equal(report.stage, 'signalled')
  t.equal(report.signal, 'SIGTERM')
  t.same(await waitForGone([leader, grandchild]), [])
})

t.test('a group that ignores SIGTERM is SIGKILLed after the grace period', async (t) => {
  const { leader, grandchild } = await startGroup(t, true)
  const report = await terminateProcessGroup(leader, { graceMs: 500 })
  t.equal(report.stage, 'killed')
  t.equal(report.signal, 'SIGKILL')
  t.ok(report.durationMs >= 450, `took ${report.durationMs} ms: SIGKILL waited for the grace period`)
  t.notOk(isGroupAlive(leader), 'the group is gone when the ladder returns')
  t.same(await waitForGone([leader, grandchild]), [])
})

t.test('orphans left after the leader exits are found and torn down', async (t) => {
  const { leader, grandchild } = await startGroup(t, false)
  process.kill(leader, 'SIGKILL')
  await waitFor(() => !isProcessAlive(leader), 'leader exit')
  t.ok(isProcessAlive(grandchild), 'the grandchild survives its parent')
  t.ok(isGroupAlive(leader), 'the group is still alive through the grandchild')
  const report = await terminateProcessGroup(leader, { graceMs: 2000 })
  t.equal(report.stage, 'signalled')
  t.same(await waitForGone([grandchild]), [])
})

t.test('many groups torn down in parallel take about one grace period', async (t) => {
  const n = 10
  const graceMs = 1000
  const groups = await Promise.all(Array.from({ length: n }, () => startGroup(t, true)))
  const started = Date.now()
  const reports = await Promise.all(groups.map((g) => terminateProcessGroup(g.leader, { graceMs })))
  const elapsed = Date.now() - started
  t.ok(reports.every((r) => r.stage === 'killed'))
  // One after the other they would take n graces (10 s); in parallel about one.
  // The bound leaves a loaded machine 5 s for signalling and reaping 20 processes.
  t.ok(elapsed < 6 * graceMs, `${n} stuck groups in ${elapsed} ms (one grace is ${graceMs} ms, ${n} would be ${n * graceMs} ms)`)
  t.same(await waitForGone(groups.flatMap((g) => [g.leader, g.grandchild])), [])
})
