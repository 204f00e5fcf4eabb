// Starts the idle sweep when the app is ready; on close stops it first, then
// ends every session in parallel so no agent process outlives the server.

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { Sweeper } from '../lib/sessions/sweeper.js'
import type { EndReport } from '../lib/sessions/manager.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessionsReaper: Sweeper
  }
}

async function reaperPlugin (fastify: FastifyInstance): Promise<void> {
  const manager = fastify.agentSessions
  const config = fastify.agentSessionsConfig
  const log = fastify.log.child({ component: 'agent-sessions-reaper' })
  const sweeper = new Sweeper({ intervalMs: config.cleanupIntervalMs, sweep: () => manager.sweep(), log })
  fastify.decorate('agentSessionsReaper', sweeper)

  fastify.addHook('onReady', async () => {
    sweeper.start()
    log.info({ intervalMs: config.cleanupIntervalMs, sessionTimeoutMs: config.sessionTimeoutMs }, 'reaper started')
  })

  let draining: Promise<EndReport[]> | null = null
  const drain = async (): Promise<EndReport[]> => {
    await sweeper.stop()
    return await manager.shutdown()
  }
  // preClose runs before the HTTP server waits for in-flight requests: cancel
  // the turns now so their requests are answered (503) instead of holding close().
  fastify.addHook('preClose', async () => {
    draining ??= drain()
  })
  fastify.addHook('onClose', async () => {
    draining ??= drain()
    const ended = await draining
    log.info({ sessionsEnded: ended.length }, 'reaper stopped')
  })
}

export default fp(reaperPlugin, {
  name: 'agent-sessions-reaper',
  fastify: '5.x',
  dependencies: ['agent-sessions-manager']
})
