// Prometheus metrics for one app instance, driven by the SessionManager's
// events. The registry belongs to this instance (not prom-client's global
// one), so two apps in one process, or in one test file, never collide.

import fp from 'fastify-plugin'
import type { FastifyInstance } from 'fastify'
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client'
import type { ProcessReport } from '../lib/agents/types.js'
import { groupsRssBytes } from '../lib/processes/usage.js'
import type { SessionEndReason } from '../lib/errors.js'
import type { EndReport, TurnOutcome } from '../lib/sessions/manager.js'
import type { TeardownStage } from '../lib/processes/terminate.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** This app's Prometheus registry (what GET /metrics serves). */
    agentSessionsMetrics: Registry
  }
}

/** Label values of agent_teardowns_total: what ended an agent process group. */
export type TeardownStageLabel = 'exited' | 'sigterm' | 'sigkill'

// 'sigterm' stands for the polite KILL_SIGNAL, whichever signal that is.
const STAGE_LABEL: Record<TeardownStage, TeardownStageLabel> = { exited: 'exited', signalled: 'sigterm', killed: 'sigkill' }
const END_REASONS: readonly SessionEndReason[] = ['expired', 'ended', 'shutdown', 'agent_exited', 'resume_failed', 'instance_lost']
const TURN_OUTCOMES: readonly TurnOutcome[] = ['answered', 'failed', 'timeout', 'cancelled']

// Agent turns take from about a second to ASK_TIMEOUT (60 s by default, often raised).
const TURN_BUCKETS = [0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600]

async function metricsPlugin (fastify: FastifyInstance): Promise<void> {
  const manager = fastify.agentSessions
  const register = new Registry()
  // Adds process_* and nodejs_* series. prom-client cannot undo this (its event
  // loop and GC observers stay), which costs nothing beyond one per app instance.
  collectDefaultMetrics({ register })

  // Read from the manager at scrape time, so they are never stale.
  new Gauge({
    name: 'agent_sessions_active',
    help: 'Sessions that exist now (idle or busy)',
    registers: [register],
    collect () { this.set(manager.counts().active) }
  })
  new Gauge({
    name: 'agent_sessions_busy',
    help: 'Sessions with a turn in flight now',
    registers: [register],
    collect () { this.set(manager.counts().busy) }
  })
  new Gauge({
    name: 'agent_live_processes',
    help: 'Live agent process groups now (ACP: one per session with a running agent; cursor: turns in flight)',
    registers: [register],
    collect () { this.set(manager.driver.livePids().length) }
  })
  new Gauge({
    name: 'agent_live_processes_rss_bytes',
    help: 'Resident memory of every process in the live agent process groups',
    registers: [register],
    collect () { this.set(groupsRssBytes(manager.driver.livePids())) }
  })
  new Gauge({
    name: 'agent_sessions_hibernated',
    help: 'Sessions whose agent is stopped until their next ask (they still count toward MAX_SESSIONS)',
    registers: [register],
    collect () { this.set(manager.agentCounts().hibernated) }
  })
  const hibernations = new Counter({
    name: 'agent_hibernations_total',
    help: 'Live agents stopped with their conversation kept, by why: idle (AGENT_IDLE_TIMEOUT), capacity (MAX_LIVE_AGENTS), shutdown (a restart with a store)',
    labelNames: ['why'] as const,
    registers: [register]
  })
  const resumes = new Counter({
    name: 'agent_resumes_total',
    help: 'Agents brought back with their conversation (hibernated or died), by outcome: ok, failed',
    labelNames: ['outcome'] as const,
    registers: [register]
  })
  const resumeDuration = new Histogram({
    name: 'agent_resume_duration_seconds',
    help: 'Time to bring an agent back with its conversation (spawn, initialize, session/load)',
    buckets: [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [register]
  })
  const orphans = new Counter({
    name: 'agent_orphans_reaped_total',
    help: 'Agent process groups an earlier run of the service left running, torn down at start-up',
    registers: [register]
  })
  new Gauge({
    name: 'agent_store_ok',
    help: '1 while the session store writes (and reads) without errors, 0 while it fails; absent without a store',
    registers: [register],
    collect () {
      const store = fastify.agentSessionsState.store
      if (store !== undefined) this.set(store.health().ok ? 1 : 0)
    }
  })
  const agentExits = new Counter({
    name: 'agent_exits_total',
    help: 'Live agents that died without being asked to, by when: during_turn or between_turns',
    labelNames: ['when'] as const,
    registers: [register]
  })
  const started = new Counter({
    name: 'agent_sessions_started_total',
    help: 'Sessions started (create-chat succeeded)',
    registers: [register]
  })
  const ended = new Counter({
    name: 'agent_sessions_ended_total',
    help: 'Sessions ended, by reason: ended (by the client), expired (reaped when idle), shutdown',
    labelNames: ['reason'] as const,
    registers: [register]
  })
  const turns = new Counter({
    name: 'agent_turns_total',
    help: 'Agent turns (questions) finished, by outcome: answered, failed, timeout, cancelled',
    labelNames: ['outcome'] as const,
    registers: [register]
  })
  const turnDuration = new Histogram({
    name: 'agent_turn_duration_seconds',
    help: 'Time from question to answer (or failure) of an agent turn',
    buckets: TURN_BUCKETS,
    registers: [register]
  })
  const teardowns = new Counter({
    name: 'agent_teardowns_total',
    help: 'Agent process groups torn down, by what ended them: exited (by themselves), sigterm (the polite KILL_SIGNAL), sigkill',
    labelNames: ['stage'] as const,
    registers: [register]
  })

  // Every label value from zero, so a dashboard's rate() has a series before the first event.
  for (const reason of END_REASONS) ended.labels(reason).inc(0)
  for (const outcome of TURN_OUTCOMES) turns.labels(outcome).inc(0)
  for (const stage of Object.values(STAGE_LABEL)) teardowns.labels(stage).inc(0)
  for (const when of ['during_turn', 'between_turns']) agentExits.labels(when).inc(0)
  for (const why of ['idle', 'capacity', 'shutdown']) hibernations.labels(why).inc(0)
  for (const outcome of ['ok', 'failed']) resumes.labels(outcome).inc(0)

  // No listener is removed on close: the manager and the registry belong to
  // this instance and go together, and sessions ended by the shutdown drain
  // (after our own onClose would run) still count.
  manager.on('session-started', () => { started.inc() })
  manager.on('session-ended', (report: EndReport) => { ended.labels(report.reason).inc() })
  manager.on('turn-finished', ({ outcome, durationMs }) => {
    turns.labels(outcome).inc()
    turnDuration.observe(durationMs / 1000)
  })
  manager.on('session-hibernated', ({ why }) => { hibernations.labels(why).inc() })
  manager.on('session-resumed', ({ ok, durationMs }) => {
    resumes.labels(ok ? 'ok' : 'failed').inc()
    if (ok) resumeDuration.observe(durationMs / 1000)
  })
  // After the state plugin's onReady: the orphan sweep has run.
  fastify.addHook('onReady', async () => { orphans.inc(fastify.agentSessionsState.orphans.reaped.length) })
  manager.on('agent-exited', ({ duringTurn }) => { agentExits.labels(duringTurn ? 'during_turn' : 'between_turns').inc() })
  manager.on('process-finished', (report: ProcessReport) => { teardowns.labels(STAGE_LABEL[report.teardown.stage]).inc() })

  fastify.decorate('agentSessionsMetrics', register)
}

export default fp(metricsPlugin, {
  name: 'agent-sessions-metrics',
  fastify: '5.x',
  dependencies: ['agent-sessions-manager', 'agent-sessions-state']
})
