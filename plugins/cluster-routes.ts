// Any instance answers any session: a request for a session this instance
// does not run is forwarded to the instance that does (@fastify/reply-from:
// method, path, query, body, auth and request id as they came; JSON or an SSE
// stream back as it comes, so the client cannot tell), or, when that instance
// is gone or released the session, the session is claimed and served here.
// A start lands here while this instance has room, else on one that has.
//
// Registered after @fastify/sse and before the routes: it wraps the handlers
// of the session routes (those taking ?session_id) and of the start, outside
// the SSE wrapper, so a forwarded request never opens a stream here.

import replyFrom from '@fastify/reply-from'
import fp from 'fastify-plugin'
import type { FastifyInstance, FastifyReply, FastifyRequest, RouteHandlerMethod } from 'fastify'
import { AgentSessionError, sessionNotFound } from '../lib/errors.js'
import { stateUnavailable } from '../lib/cluster/redis-store.js'
import { SessionQuery } from '../routes/schemas.js'

/** Marks a request one instance forwards to another: the cluster's secret (a client's own value is never trusted). */
export const FORWARDED_HEADER = 'x-agent-sessions-forwarded'
/** The client's address as the first instance saw it (per-client limits count the client, not the forwarding instance). */
export const CLIENT_HEADER = 'x-agent-sessions-client'
/** On a 503 from an instance that stops: it refused the request before running it, so another instance may. */
const CLOSING_HEADER = 'x-agent-sessions-closing'

const forwardedClient = new WeakMap<FastifyRequest, string>()
const handled = new WeakSet<FastifyRequest>()

/** The client a request comes from: its address here, or as the instance that forwarded it saw it. */
export function clientAddress (request: FastifyRequest): string {
  return forwardedClient.get(request) ?? request.ip
}

interface Target { owner: string, url: string }
type Outcome = 'sent' | 'unreachable' | 'closing'

// Failures before the request reached the other instance: safe to serve it elsewhere.
const NOT_CONNECTED = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'UND_ERR_CONNECT_TIMEOUT'])
// The connection broke after the request went out: a read may be sent again, a question or a start may not.
const CONNECTION_LOST = new Set(['ECONNRESET', 'UND_ERR_SOCKET', 'EPIPE', 'UND_ERR_CLOSED'])

async function clusterRoutesPlugin (fastify: FastifyInstance): Promise<void> {
  const cluster = fastify.agentSessionsCluster
  if (cluster === null) return
  const config = fastify.agentSessionsConfig
  const manager = fastify.agentSessions
  const { store, membership, instanceId: me } = cluster
  const log = fastify.log.child({ component: 'agent-sessions-cluster' })
  const ttlMs = config.instanceTtlMs
  const pollMs = Math.max(50, Math.min(250, Math.floor(ttlMs / 20)))

  await fastify.register(replyFrom, {
    undici: {
      // The owner answers within its own limits (start, ask, stream heartbeats); these only catch a peer that hangs.
      headersTimeout: config.startTimeoutMs + config.askTimeoutMs + 60_000,
      bodyTimeout: config.streamHeartbeatMs * 4 + 30_000,
      keepAliveTimeout: 30_000
    },
    // Never sent twice by the proxy itself (a 503 from a stopping owner is handled below).
    retryMethods: [],
    disableRequestLogging: true
  })

  /** Makes this instance the session's owner and runs it here; a Target when another instance won the claim. */
  async function adopt (sessionId: string): Promise<Target | null> {
    const claim = await store.claim(sessionId)
    if (claim.outcome === 'claimed') {
      manager.adopt(claim.stored)
      log.info({ sessionId, from: claim.from === '' ? '(released)' : claim.from }, 'session claimed')
      return null
    }
    const again = await store.lookup(sessionId)
    if (again.kind === 'ended') throw sessionNotFound(sessionId, again)
    if (again.kind === 'owned' && again.owner !== me) return { owner: again.owner, url: again.url }
    return null
  }

  /** Where a request for this session is answered: here (null, claiming it when its owner is gone) or at its owner. */
  async function locate (sessionId: string, forwarded: boolean): Promise<Target | null> {
    if (manager.has(sessionId) || manager.closed || manager.endedReason(sessionId) !== undefined) return null
    const found = await store.lookup(sessionId)
    switch (found.kind) {
      case 'unknown':
        // Redis came back empty a moment ago (or just now: another secret): its owner may not have written it again yet.
        if (!membership.secretCurrent(found.secret) || membership.recovering) throw stateUnavailable()
        return null
      case 'ended':
        throw sessionNotFound(sessionId, found)
      case 'owned':
        if (found.owner === me) return await adopt(sessionId)
        if (!forwarded) return { owner: found.owner, url: found.url }
        // Forwarded here, yet another live instance has it now: never forward twice (no loops).
        throw moved()
      case 'orphan': {
        // Its owner's liveness key is gone. Right after Redis lost its data a live owner may have
        // written its session again before advertising itself: never take a session from it then.
        if (found.owner !== '' && (!membership.secretCurrent(found.secret) || membership.recovering)) throw stateUnavailable()
        const target = await adopt(sessionId)
        if (target !== null && forwarded) throw moved()
        return target
      }
    }
  }

  /** Where a start is answered: here while there is room, else on the live instance with the most room. */
  async function admit (forwarded: boolean): Promise<Target | null> {
    if (forwarded || manager.closed) return null
    if (!cluster!.available()) throw stateUnavailable()
    const room = manager.capacity()
    if (room.sessions > 0 && room.liveAgents > 0) return null
    let instances
    try {
      instances = (await membership.refreshView()).instances
    } catch {
      return null
    }
    const candidates = instances.filter((i) => i.id !== me && !i.draining && i.url !== '' && i.freeSessions > 0 && i.freeLiveAgents > 0)
    if (candidates.length === 0) return null
    const best = Math.max(...candidates.map((i) => i.freeLiveAgents))
    const top = candidates.filter((i) => i.freeLiveAgents === best)
    const chosen = top[Math.floor(Math.random() * top.length)]
    // Counted at once, so a burst of starts here spreads instead of piling onto one instance until its next advertisement.
    chosen.freeSessions--
    chosen.freeLiveAgents--
    return { owner: chosen.id, url: chosen.url }
  }

  // A start answers within START_TIMEOUT (plus a hop when forwarded); a place held longer belongs to an instance that died mid-start.
  const clientPlaceTtlMs = config.startTimeoutMs + 30_000

  /**
   * MAX_SESSIONS_PER_CLIENT across the cluster: a place in the client's budget,
   * taken atomically in Redis before the start runs anywhere and given back
   * (by the returned function) once it has answered, when its session counts
   * itself. Each instance also counts the client's sessions it runs.
   */
  async function reserveClientPlace (client: string): Promise<() => Promise<void>> {
    const token = await store.reserveClientPlace(client, config.maxSessionsPerClient, clientPlaceTtlMs)
    if (token === null) {
      throw new AgentSessionError('CLIENT_SESSION_LIMIT_REACHED',
        `This client already holds its maximum of ${config.maxSessionsPerClient} sessions (MAX_SESSIONS_PER_CLIENT) across the cluster: ` +
        'end one or try again later', { retryAfterSeconds: 30 })
    }
    return async () => { await store.releaseClientPlace(client, token) }
  }

  function forward (request: FastifyRequest, reply: FastifyReply, target: Target, repeatable: boolean): Promise<Outcome> {
    return new Promise<Outcome>((resolve) => {
      log.debug({ reqId: request.id, to: target.owner, url: request.url }, 'request forwarded')
      void reply.from(`${target.url}${request.url}`, {
        rewriteRequestHeaders: (_request, headers) => ({
          ...headers,
          [FORWARDED_HEADER]: membership.secret ?? '-',
          [CLIENT_HEADER]: clientAddress(request),
          'x-request-id': String(request.id)
        }),
        onResponse: (_request, res, response) => {
          // reply-from's types describe a ServerResponse; it passes undici's { statusCode, headers, stream }.
          const upstream = response as unknown as { statusCode: number, headers: Record<string, unknown>, stream: NodeJS.ReadableStream & { destroy: () => void } }
          if (upstream.statusCode === 503 && upstream.headers[CLOSING_HEADER] !== undefined) {
            // The owner is stopping and refused before running anything: its sessions are about to be released.
            upstream.stream.destroy()
            for (const name of Object.keys(upstream.headers)) res.removeHeader(name)
            void res.code(200).header('X-Request-ID', request.id)
            resolve('closing')
            return
          }
          void res.send(upstream.stream)
          resolve('sent')
        },
        onError: (res, { error }) => {
          const code = String((error as { cause?: { code?: string } }).cause?.code ?? (error as { code?: string }).code ?? '')
          if (NOT_CONNECTED.has(code) || (repeatable && CONNECTION_LOST.has(code))) {
            resolve('unreachable')
            return
          }
          log.warn({ err: error, to: target.owner, code }, 'forwarded request failed')
          void res.send(new AgentSessionError('INSTANCE_UNREACHABLE',
            'The instance running this session went away while answering: send the request again', { retryAfterSeconds: Math.ceil(ttlMs / 1000) }))
          resolve('sent')
        }
      })
    })
  }

  /** Waits (polling Redis) until `owner` no longer holds the session: it died (liveness expired) or released it. */
  async function ownerGone (sessionId: string, owner: string, withinMs: number): Promise<boolean> {
    const deadline = performance.now() + withinMs
    for (;;) {
      const found = await store.lookup(sessionId)
      if (found.kind !== 'owned' || found.owner !== owner) return true
      if (performance.now() >= deadline) return false
      await new Promise((resolve) => setTimeout(resolve, pollMs))
    }
  }

  fastify.addHook('onRoute', (route) => {
    const isStart = route.schema?.operationId === 'startSession'
    if (!isStart && route.schema?.querystring !== SessionQuery) return
    const inner = route.handler as RouteHandlerMethod
    // A question or a start that may have reached a dying instance is not run again elsewhere (the agent acts on it).
    const repeatable = !isStart && route.schema?.operationId !== 'ask'
    const isEnd = route.schema?.operationId === 'endSession'
    route.handler = async function clustered (this: FastifyInstance, request: FastifyRequest, reply: FastifyReply) {
      handled.add(request)
      const hop = request.headers[FORWARDED_HEADER]
      // Any mark stops a second forward (no loops); only the cluster's secret vouches for what the mark carries.
      const forwarded = hop !== undefined
      const vouched = forwarded && membership.secret !== null && hop === membership.secret
      if (vouched) {
        const client = request.headers[CLIENT_HEADER]
        if (typeof client === 'string' && client !== '') forwardedClient.set(request, client)
      }
      const sessionId = (request.query as { session_id?: string }).session_id ?? ''
      let releaseClientPlace: (() => Promise<void>) | null = null
      // A start forwarded by an instance holds the place that instance took; one with a forged mark takes its own.
      if (isStart && !vouched && !manager.closed) {
        if (!cluster!.available()) throw stateUnavailable()
        releaseClientPlace = await reserveClientPlace(clientAddress(request))
      }
      try {
        for (let attempt = 0; ; attempt++) {
          const target = isStart ? await admit(forwarded || attempt > 0) : await locate(sessionId, forwarded)
          if (target === null) break
          const outcome = await forward(request, reply, target, repeatable)
          if (outcome === 'sent') return reply
          if (isStart) break
          // The owner is gone (its liveness key expires within INSTANCE_TTL) or stopping (it releases its sessions once hibernated).
          const withinMs = outcome === 'closing' ? config.killGraceMs + ttlMs + 10_000 : ttlMs + 1000
          log.info({ sessionId, owner: target.owner, outcome }, 'owner of the session cannot answer: taking it over once it lets go')
          if (!(await ownerGone(sessionId, target.owner, withinMs)) || attempt >= 2) {
            throw new AgentSessionError('INSTANCE_UNREACHABLE', 'The instance running this session cannot be reached: try again shortly',
              { retryAfterSeconds: Math.ceil(ttlMs / 1000) })
          }
        }
        const answer = await inner.call(this, request, reply)
        // An end is in Redis before it answers (while Redis answers): the client's next start, on any instance, finds its place free.
        if (isEnd) await store.flush()
        return answer
      } finally {
        // Before a local start's answer leaves: the client's next start finds its new session counted once, not twice.
        await releaseClientPlace?.()
      }
    }
  })

  fastify.addHook('onSend', async (request, reply) => {
    // A stopping instance's refusal (before any handler ran) tells the forwarding instance to take the session over.
    if (manager.closed && reply.statusCode === 503 && request.headers[FORWARDED_HEADER] !== undefined && !handled.has(request)) {
      void reply.header(CLOSING_HEADER, '1')
    }
  })
}

function moved (): AgentSessionError {
  return new AgentSessionError('INSTANCE_UNREACHABLE', 'The session is moving to another instance: send the request again', { retryAfterSeconds: 1 })
}

export default fp(clusterRoutesPlugin, {
  name: 'agent-sessions-cluster-routes',
  fastify: '5.x',
  dependencies: ['agent-sessions-cluster', 'agent-sessions-manager']
})
