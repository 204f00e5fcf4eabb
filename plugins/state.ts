// What outlives the process, when STATE_DIR is set (the standalone server's
// default): the directory's lock (one server per directory), the record of
// live agent process groups, and the session store. Before the app serves,
// every agent group an earlier run left behind is torn down (the orphan
// sweep) and the stored sessions come back, hibernated.

import { join } from 'node:path'
import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { GroupRecordFile, reapOrphans, type GroupRecorder, type OrphanSweepReport } from '../lib/processes/records.js'
import { FileStore } from '../lib/sessions/file-store.js'
import type { SessionStore } from '../lib/sessions/store.js'
import { lockStateDir } from '../lib/state-dir.js'

export interface AgentSessionsState {
  /** undefined: STATE_DIR is off, nothing outlives the process. */
  dir?: string
  store?: SessionStore
  recorder?: GroupRecorder
  /** What the orphan sweep found at start-up. */
  orphans: OrphanSweepReport
}

declare module 'fastify' {
  interface FastifyInstance {
    agentSessionsState: AgentSessionsState
  }
}

async function statePlugin (fastify: FastifyInstance): Promise<void> {
  const config = fastify.agentSessionsConfig
  const state: AgentSessionsState = { orphans: { reaped: [], notOurs: 0, gone: 0 } }
  fastify.decorate('agentSessionsState', state)
  const dir = config.stateDir
  if (dir === undefined) return
  const log = fastify.log.child({ component: 'agent-sessions-state' })

  // Taken before anything else: a second server on this directory stops here.
  const release = await lockStateDir(dir, log)
  const records = new GroupRecordFile(join(dir, 'processes.json'), log)
  // Kept in the record until swept, so a crash during the sweep loses none of them.
  const leftBehind = records.load()
  for (const group of leftBehind) records.added(group)
  state.dir = dir
  state.recorder = records
  // With REDIS_URL the sessions live in Redis (plugins/cluster.ts); the directory keeps this instance's process record.
  if (config.redisUrl === undefined) state.store = new FileStore({ file: join(dir, 'sessions.json'), log })

  fastify.addHook('onReady', async () => {
    if (leftBehind.length > 0) {
      const started = performance.now()
      state.orphans = await reapOrphans(leftBehind, { signal: config.killSignal, graceMs: config.killGraceMs })
      for (const group of leftBehind) records.removed(group.pgid)
      await records.flush()
      const reaped = state.orphans.reaped
      log.warn({
        reaped: reaped.length,
        groups: reaped.map((r) => ({ pgid: r.pgid, stage: r.teardown.stage })),
        notOurs: state.orphans.notOurs,
        alreadyGone: state.orphans.gone,
        sweepMs: Math.round(performance.now() - started)
      }, reaped.length > 0 ? 'agent processes left by an earlier run torn down' : 'no agent process of an earlier run was left')
    }
    await fastify.agentSessions.restore()
  })

  fastify.addHook('onClose', async () => {
    // The sessions' own shutdown (reaper plugin) has hibernated and written them by now.
    await state.store?.close()
    await records.flush()
    await release()
  })
  log.info({ dir }, 'state directory in use')
}

export default fp(statePlugin, {
  name: 'agent-sessions-state',
  fastify: '5.x',
  dependencies: ['agent-sessions-config']
})
