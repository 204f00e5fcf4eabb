#!/usr/bin/env node
// Standalone entry: read the environment, build Fastify with a logger, register
// the app, close gracefully on SIGINT/SIGTERM, listen.

import { setFlagsFromString } from 'node:v8'
import Fastify from 'fastify'
import closeWithGrace from 'close-with-grace'
import envSchema from 'env-schema'
import pino from 'pino'
import agentSessions from './app.js'
import { clientErrorHandler, genReqId, receiveTimeoutOptions, sendError, toAgentSessionError, trustProxyOption } from './plugins/http.js'
import { killTrackedGroupsNow } from './lib/processes/terminate.js'
import { defaultStateDir, StateDirError } from './lib/state-dir.js'
import { ConfigError, describeEnvError, envJsonSchema, exposureError, resolveConfig, type AgentSessionsConfig } from './lib/config.js'

// V8 pretenures an allocation site whose objects mostly survive a young-generation
// collection. Under steady request load, one collection that lands while the
// session store writes (once a second) can tip the request path's sites over:
// every request's objects then go straight to the old generation, young
// collections take 10-15x longer and throughput drops by a third for as long
// as the load lasts (bench/heartbeat.ts, issue 15). Short-lived request objects
// gain nothing from pretenuring, so the standalone server turns it off.
setFlagsFromString('--no-allocation-site-pretenuring')

function loadConfig (): AgentSessionsConfig {
  try {
    let env: Record<string, unknown>
    try {
      env = envSchema({ schema: structuredClone(envJsonSchema), dotenv: false })
    } catch (err) {
      throw describeEnvError(err, process.env)
    }
    const config = resolveConfig(env)
    // Closed by default: no unauthenticated API beyond this machine unless the operator says so.
    const exposed = exposureError(config)
    if (exposed !== undefined) throw exposed
    return config
  } catch (err) {
    if (!(err instanceof ConfigError)) throw err
    console.error(err.message)
    process.exit(1)
  }
}

const config = loadConfig()

const fastify = Fastify({
  logger: {
    level: config.logLevel,
    // Synchronous writes to stdout: once its reader is gone, the first write
    // fails with EPIPE and logging stops. pino's default (asynchronous)
    // destination flushes synchronously on exit and retries EPIPE forever,
    // which hung shutdown and swallowed every later signal.
    stream: pino.destination({ dest: 1, sync: true })
  },
  bodyLimit: config.bodyLimit,
  // The client address (request.ip: logs, START_RATE_LIMIT, MAX_SESSIONS_PER_CLIENT) comes from
  // X-Forwarded-For only when the connection comes from a proxy TRUST_PROXY names.
  trustProxy: trustProxyOption(config.trustProxy),
  // RECEIVE_TIMEOUT: a client that trickles its headers or body is cut off with 408.
  ...receiveTimeoutOptions(config.receiveTimeoutMs),
  // What Node's HTTP parser refuses (431, 408, malformed HTTP) in the API's error shape.
  clientErrorHandler,
  // Reuse a well-formed X-Request-ID from the client (tracing across proxies), else make one.
  requestIdHeader: false,
  genReqId,
  // The app answers requests that arrive while closing itself, with its JSON error shape.
  return503OnClosing: false,
  // Errors the router raises before any plugin runs (a malformed URL such as
  // `/%`) get the API's JSON error shape too.
  frameworkErrors: (error, request, reply) => {
    void reply.header('X-Request-ID', request.id)
    sendError(request, reply, toAgentSessionError(error))
  }
})

// The standalone server keeps its sessions across restarts unless told not to (STATE_DIR=off).
const stateDir = process.env.STATE_DIR === undefined || process.env.STATE_DIR.trim() === '' ? defaultStateDir(config.port) : undefined
try {
  await fastify.register(agentSessions, stateDir === undefined ? {} : { stateDir })
  await fastify.ready()
} catch (err) {
  if (!(err instanceof StateDirError)) throw err
  fastify.log.error({ err }, err.message)
  console.error(err.message)
  process.exit(1)
}

closeWithGrace({
  // Long enough for every session's teardown ladder (which runs in parallel).
  delay: config.killGraceMs + 5000,
  logger: false,
  onSecondSignal (signal) {
    const killed = killTrackedGroupsNow()
    fastify.log.error({ signal, killedGroups: killed }, 'second signal: agent processes killed, exiting now')
  },
  onTimeout (delay) {
    const killed = killTrackedGroupsNow()
    fastify.log.error({ delayMs: delay, killedGroups: killed }, 'graceful close timed out: agent processes killed, exiting')
  }
}, async ({ signal, err }) => {
  if (err !== undefined) fastify.log.error({ err }, 'fatal error, closing')
  else fastify.log.info({ signal }, 'closing')
  await fastify.close()
  fastify.log.info('closed')
})

try {
  await fastify.listen({ port: config.port, host: config.host })
} catch (err) {
  fastify.log.error({ err }, 'could not listen')
  await fastify.close()
  process.exit(1)
}
