// What a client that is not asking can follow: the session's own event
// stream (any number of subscribers, replay with Last-Event-ID), the
// conversation so far, and its answers to the agent's permission requests.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { errors, SessionQuery, validatorCompiler } from './schemas.js'
import { EventWriter, sessionMessage } from './stream.js'

const sessionStreamRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const { streamBufferBytes } = fastify.agentSessionsConfig

  fastify.get('/api/session/events', {
    // Always a stream: a GET of this route has no other representation.
    sse: 'manual',
    schema: {
      operationId: 'sessionEvents',
      summary: 'Follow a session: its state, the events of its turns, expiry warnings and its end',
      description: 'Server-Sent Events. First `state` (and any permission request waiting), then, as they happen: `state` ' +
        '(idle, busy, hibernated, closing), the events of any turn in flight (chunk, thought, tool_call, plan, usage, permission, ' +
        'answer, error), `expiring` (EXPIRY_WARNING before the reaper would end it; a heartbeat postpones it) and `ended`, ' +
        'after which the stream closes. Events carry ids: reconnect with Last-Event-ID to get what was missed. ' +
        'An open stream is not activity.',
      tags: ['sessions'],
      querystring: SessionQuery,
      headers: Type.Object({
        'last-event-id': Type.Optional(Type.String({ pattern: '^\\d{1,15}$', description: 'The id of the last event received' }))
      }),
      response: {
        200: {
          description: 'The session\'s event stream',
          content: { 'text/event-stream': { schema: Type.String({ description: 'event: state|chunk|...|expiring|ended, id, data: JSON' }) } }
        },
        ...errors(400, 401, 404)
      }
    }
  }, async (request, reply) => {
    const sessionId = request.query.session_id
    const lastEventId = request.headers['last-event-id'] === undefined ? undefined : Number(request.headers['last-event-id'])
    const writer = new EventWriter(reply, { maxBufferedBytes: streamBufferBytes, log: request.log })
    let ended = false
    // Throws 404 before anything is sent when the session is unknown or gone.
    const unsubscribe = manager.subscribe(sessionId, (numbered) => {
      // null: nothing more will come (the session ended, or the server stops and the session hibernates).
      if (numbered === null) {
        void writer.end()
        return
      }
      writer.push(sessionMessage(numbered, sessionId))
      if (numbered.event.type === 'ended') ended = true
    }, lastEventId)
    request.log.debug({ sessionId, lastEventId }, 'session stream opened')
    reply.sse.sendHeaders()
    await writer.finished
    unsubscribe()
    request.log.debug({ sessionId, ended }, 'session stream closed')
    if (writer.open) await writer.end()
    return reply
  })

  fastify.get('/api/session/history', {
    schema: {
      operationId: 'sessionHistory',
      summary: 'The conversation so far: questions, answers, stop reasons and times',
      description: 'For a client that lost a stream: every answered, cancelled or failed turn, oldest first (the newest turns, up to a limit).',
      tags: ['sessions'],
      querystring: SessionQuery,
      response: {
        200: Type.Object({
          session_id: Type.String(),
          turns: Type.Array(Type.Object({
            question: Type.String(),
            answer: Type.String({ description: 'What the agent said; what arrived before a cancel; empty when the turn failed' }),
            stop_reason: Type.Union([Type.String(), Type.Null()], { description: 'end_turn, cancelled, ...; null when the turn failed' }),
            error: Type.Union([Type.String(), Type.Null()], { description: 'The error code of a failed turn' }),
            started_at: Type.String({ format: 'date-time' }),
            ended_at: Type.String({ format: 'date-time' })
          }))
        }, { description: 'The session\'s turns' }),
        ...errors(400, 401, 404)
      }
    }
  }, async (request) => {
    const sessionId = request.query.session_id
    return {
      session_id: sessionId,
      turns: manager.history(sessionId).map((turn) => ({
        question: turn.question,
        answer: turn.answer,
        stop_reason: turn.stopReason,
        error: turn.error,
        started_at: new Date(turn.startedAt).toISOString(),
        ended_at: new Date(turn.endedAt).toISOString()
      }))
    }
  })

  fastify.post('/api/permission', {
    validatorCompiler,
    schema: {
      operationId: 'answerPermission',
      summary: 'Answer the agent\'s permission request (PERMISSION_POLICY=ask)',
      description: 'The request arrived as a `permission` event on the ask\'s stream and the session\'s stream. Without an answer ' +
        'within PERMISSION_TIMEOUT it is rejected.',
      tags: ['sessions'],
      querystring: SessionQuery,
      body: Type.Object({
        request_id: Type.String({ minLength: 1, maxLength: 128 }),
        option_id: Type.String({ minLength: 1, maxLength: 256, description: 'One of the option_ids the permission event offered' })
      }, { additionalProperties: false }),
      response: {
        200: Type.Object({
          session_id: Type.String(),
          request_id: Type.String(),
          option_id: Type.String()
        }, { description: 'The answer reached the agent' }),
        ...errors(400, 401, 404, 409)
      }
    }
  }, async (request) => {
    const sessionId = request.query.session_id
    const { request_id: requestId, option_id: optionId } = request.body
    manager.answerPermission(sessionId, requestId, optionId)
    request.log.info({ sessionId, requestId, optionId }, 'permission answered by the client')
    return { session_id: sessionId, request_id: requestId, option_id: optionId }
  })
}

export default sessionStreamRoutes
