// One question, one agent turn (as JSON, or streamed as Server-Sent Events), and its cancel.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { AgentSessionError } from '../lib/errors.js'
import { toAgentSessionError } from '../plugins/http.js'
import { errors, SessionQuery, validatorCompiler } from './schemas.js'
import { errorMessage, EventWriter, turnMessage } from './stream.js'

const askRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const { maxQuestionBytes, streamBufferBytes } = fastify.agentSessionsConfig

  const AskReply = Type.Object({
    answer: Type.String({ description: 'The agent\'s answer; what arrived before the cancel when the turn was cancelled' }),
    session_id: Type.String(),
    stop_reason: Type.String({ description: 'Why the turn ended: end_turn, cancelled, max_tokens, max_turn_requests or refusal' })
  })

  fastify.post('/api/ask', {
    // With `Accept: text/event-stream` the turn streams; without it the reply is the JSON the Janus client knows.
    sse: 'dual',
    validatorCompiler,
    schema: {
      operationId: 'ask',
      summary: 'Ask the session\'s agent a question about the workspace',
      description: 'With `Accept: text/event-stream` the answer streams as Server-Sent Events: chunk, thought, tool_call, plan, ' +
        'usage and permission events as they happen, then `answer` (the JSON reply\'s fields) or `error`. A request refused before ' +
        'its turn starts is a JSON error either way. A dropped stream does not cancel the turn (POST /api/cancel does).',
      tags: ['sessions'],
      querystring: SessionQuery,
      body: Type.Object({
        question: Type.String({ minLength: 1, description: `The question; at most MAX_QUESTION_BYTES (${maxQuestionBytes}) bytes of UTF-8` })
      }),
      response: {
        200: {
          description: 'The agent\'s answer, as JSON or as an event stream',
          content: {
            'application/json': { schema: AskReply },
            'text/event-stream': { schema: Type.String({ description: 'event: chunk|thought|tool_call|plan|usage|permission|answer|error, data: JSON' }) }
          }
        },
        ...errors(400, 401, 404, 409, 413, 429, 502, 503, 504)
      }
    }
  }, async (request, reply) => {
    const { question } = request.body
    if (question.trim() === '') {
      throw new AgentSessionError('INVALID_REQUEST', 'question must not be blank')
    }
    const size = Buffer.byteLength(question)
    if (size > maxQuestionBytes) {
      throw new AgentSessionError('PAYLOAD_TOO_LARGE', `question is ${size} bytes; the limit is ${maxQuestionBytes} (MAX_QUESTION_BYTES)`)
    }
    const sessionId = request.query.session_id
    const streaming = reply.sse !== undefined
    const writer = streaming ? new EventWriter(reply, { maxBufferedBytes: streamBufferBytes, log: request.log }) : null
    let accepted = false
    const onAccepted = (): void => {
      accepted = true
      request.log.info({ sessionId, questionBytes: size, streaming }, 'question received')
      request.log.debug({ sessionId, question }, 'question text')
      // From here on the stream has started: failures arrive as an `error` event.
      reply.sse?.sendHeaders()
    }
    try {
      const { answer, durationMs, stopReason } = await manager.ask(sessionId, question, {
        onAccepted,
        onEvent: writer === null ? undefined : (event) => { writer.push(turnMessage(event)) }
      })
      request.log.info({ sessionId, answerBytes: Buffer.byteLength(answer), turnMs: durationMs, stopReason }, 'question answered')
      request.log.debug({ sessionId, answer }, 'answer text')
      const body = { answer, session_id: sessionId, stop_reason: stopReason }
      if (writer === null) return body
      writer.push({ event: 'answer', data: JSON.stringify(body) })
    } catch (err) {
      if (writer === null || !accepted) throw err
      const apiError = toAgentSessionError(err)
      if (apiError.statusCode >= 500 && apiError.code === 'INTERNAL_SERVER_ERROR') request.log.error({ err }, 'streamed turn failed')
      else request.log.info({ code: apiError.code, details: apiError.message }, 'streamed turn failed')
      writer.push(errorMessage(apiError.code, apiError.message))
    }
    await writer.end()
    return reply
  })

  fastify.post('/api/cancel', {
    schema: {
      operationId: 'cancelTurn',
      summary: 'Cancel the question the session is answering',
      description: 'The ask in flight answers promptly with stop_reason "cancelled" and the text that arrived; the session stays usable.',
      tags: ['sessions'],
      querystring: SessionQuery,
      response: {
        200: Type.Object({
          session_id: Type.String(),
          cancelled: Type.Boolean({ description: 'false when no question was in flight' })
        }, { description: 'Whether a turn was cancelled' }),
        ...errors(400, 401, 404)
      }
    }
  }, async (request) => {
    const sessionId = request.query.session_id
    return { session_id: sessionId, cancelled: manager.cancel(sessionId) }
  })
}

export default askRoutes
