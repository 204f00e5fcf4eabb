// Instances of a cluster in this process: each a Fastify app of its own,
// listening on a free port of 127.0.0.1, with its own state directory, all
// sharing one (real) Redis. The simulator's chats live in the sandbox's
// directory, which every instance shares (the "shared agent storage" case).

import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import Fastify, { type FastifyInstance } from 'fastify'
import { Redis } from 'ioredis'
import { genReqId } from '../../plugins/http.js'
import { AGENT_CALL_TIMEOUT_MS, ROOT, SIMULATOR, liftDecorators, type BuildOptions, type Sandbox } from './index.js'

interface TapLike { after: (fn: () => unknown) => void }

export interface Instance {
  app: FastifyInstance
  url: string
  stateDir: string
  /** Closes the app (as SIGTERM would: its sessions hibernate and are released); idempotent. */
  close: () => Promise<void>
}

export interface InstanceOptions extends BuildOptions {
  /** Whether the instance gets a state directory (the process record) of its own; default true. */
  withStateDir?: boolean
}

export async function startInstance (t: TapLike, box: Sandbox, redisUrl: string, options: InstanceOptions = {}): Promise<Instance> {
  const { logger = false, withStateDir = true, ...pluginOptions } = options
  const stateDir = mkdtempSync(join(tmpdir(), 'agent-sessions-instance-'))
  // As the standalone server does: a well-formed X-Request-ID from the client (or a forwarding instance) is kept.
  const app = Fastify({
    logger: logger as boolean,
    return503OnClosing: false,
    requestIdHeader: false,
    genReqId
  })
  await app.register(liftDecorators, {
    cursorAgentBin: SIMULATOR,
    workspaceDir: ROOT,
    killGrace: '1s',
    askTimeout: AGENT_CALL_TIMEOUT_MS,
    startTimeout: AGENT_CALL_TIMEOUT_MS,
    redisUrl,
    instanceTtl: '2s',
    ...(withStateDir ? { stateDir } : {}),
    ...pluginOptions,
    agentEnv: { FAKE_AGENT_STATE_DIR: box.stateDir, ...pluginOptions.agentEnv }
  })
  let closing: Promise<void> | null = null
  const close = async (): Promise<void> => {
    closing ??= app.close().then(() => {})
    await closing
  }
  t.after(async () => {
    await close()
    rmSync(stateDir, { recursive: true, force: true })
  })
  const url = await app.listen({ port: 0, host: '127.0.0.1' })
  return { app, url, stateDir, close }
}

/** A plain client of the same Redis, for looking at (or tampering with) the shared state; closed after the test. */
export function redisClient (t: TapLike, url: string): Redis {
  const client = new Redis(url, { lazyConnect: false, maxRetriesPerRequest: 1 })
  client.on('error', () => {})
  t.after(() => { client.disconnect() })
  return client
}

export interface JsonReply {
  status: number
  json: Record<string, any>
  headers: Headers
}

export async function call (method: string, url: string, body?: object, headers: Record<string, string> = {}): Promise<JsonReply> {
  const res = await fetch(url, {
    method,
    headers: { ...(body === undefined ? {} : { 'content-type': 'application/json' }), ...headers },
    ...(body === undefined ? {} : { body: JSON.stringify(body) })
  })
  const text = await res.text()
  let json: Record<string, any> = {}
  try { json = JSON.parse(text) } catch { json = { text } }
  return { status: res.status, json, headers: res.headers }
}

/** waitFor for a probe that has to ask over the network: polls until it holds. */
export async function until<T> (probe: () => Promise<T | undefined | null | false>, what: string, timeoutMs: number): Promise<T> {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const value = await probe()
    if (value !== undefined && value !== null && value !== false) return value
    if (Date.now() >= deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 50))
  }
}
