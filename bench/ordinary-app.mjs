// A stand-in for "any Fastify app of the service's size" that runs no code of
// this project: Fastify's own plugins (CORS, rate limit, OpenAPI), an
// onRequest and an onSend hook, and as many JSON routes as the app declares
// (bench/heartbeat.ts counts them), each with params, body and response schemas. bench/bare-server.mjs registers
// it beside the bare route (BARE_BESIDE=ordinary-app) to show what an app like
// this costs a request it never touches, the same way it does with the app.

import Fastify from 'fastify'
import cors from '@fastify/cors'
import rateLimit from '@fastify/rate-limit'
import swagger from '@fastify/swagger'

/** An idle Fastify instance with the ordinary app: `routes` routes, each called `callsPerRoute` times through inject. */
export async function startOrdinaryApp (routes, callsPerRoute) {
  const app = Fastify({ logger: false })
  await app.register(swagger, { openapi: { info: { title: 'ordinary app', version: '1.0.0' } } })
  await app.register(cors, { origin: true })
  await app.register(rateLimit, { max: 1_000_000, timeWindow: 60_000 })
  app.addHook('onRequest', async (request) => { request.startedAt = process.hrtime.bigint() })
  app.addHook('onSend', async (request, reply) => { reply.header('x-elapsed', String(process.hrtime.bigint() - request.startedAt)) })
  for (let i = 0; i < routes; i++) {
    app.post(`/items${i}/:id`, {
      schema: {
        params: { type: 'object', properties: { id: { type: 'string' } }, required: ['id'] },
        body: { type: 'object', properties: { [`field${i}`]: { type: 'string' }, count: { type: 'integer' } } },
        response: { 200: { type: 'object', properties: { id: { type: 'string' }, [`value${i}`]: { type: 'number' }, keys: { type: 'array', items: { type: 'string' } } } } }
      }
    }, async (request) => ({ id: request.params.id, [`value${i}`]: i, keys: Object.keys(request.body ?? {}) }))
  }
  await app.ready()
  for (let call = 0; call < callsPerRoute; call++) {
    for (let i = 0; i < routes; i++) {
      const res = await app.inject({ method: 'POST', url: `/items${i}/id${call}`, payload: { [`field${i}`]: 'value', count: call } })
      if (res.statusCode !== 200) throw new Error(`the ordinary app answered ${res.statusCode}: ${res.body}`)
    }
  }
  return app
}
