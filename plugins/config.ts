// Environment + plugin options -> one validated config object, decorated under
// a namespaced key so a host app's own `config` (or its own @fastify/env)
// cannot collide with ours.

import fp from 'fastify-plugin'
import fastifyEnv from '@fastify/env'
import type { FastifyInstance } from 'fastify'
import { describeEnvError, envJsonSchema, optionsAsEnv, resolveConfig, type AgentSessionsConfig, type AgentSessionsSettings } from '../lib/config.js'

declare module 'fastify' {
  interface FastifyInstance {
    agentSessionsConfig: AgentSessionsConfig
    /** The raw validated environment strings (what @fastify/env produced). */
    agentSessionsEnv: Record<string, string | undefined>
  }
}

async function configPlugin (fastify: FastifyInstance, options: AgentSessionsSettings): Promise<void> {
  // Options are merged over process.env, so what the embedding app sets in code wins.
  const data = optionsAsEnv(options)
  try {
    await fastify.register(fastifyEnv, {
      confKey: 'agentSessionsEnv',
      schema: structuredClone(envJsonSchema),
      data,
      dotenv: false
    })
  } catch (err) {
    throw describeEnvError(err, { ...process.env, ...data })
  }
  fastify.decorate('agentSessionsConfig', resolveConfig(fastify.agentSessionsEnv))
}

export default fp(configPlugin, { name: 'agent-sessions-config', fastify: '5.x' })
