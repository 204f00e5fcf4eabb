// One question, one agent turn.

import type { FastifyPluginAsyncTypebox } from '@fastify/type-provider-typebox'
import { Type } from '@fastify/type-provider-typebox'
import { AgentSessionError } from '../lib/errors.js'
import { errors, SessionQuery } from './schemas.js'

const askRoutes: FastifyPluginAsyncTypebox = async (fastify) => {
  const manager = fastify.agentSessions
  const { maxQuestionBytes } = fastify.agentSessionsConfig

  fastify.post('/api/ask', {
    schema: {
      operationId: 'ask',
      summary: 'Ask the session\'s agent a question about the workspace',
      tags: ['sessions'],
      querystring: SessionQuery,
      body: Type.Object({
        question: Type.String({ minLength: 1, description: `The question; at most MAX_QUESTION_BYTES (${maxQuestionBytes}) bytes of UTF-8` })
      }),
      response: {
        200: Type.Object({ answer: Type.String(), session_id: Type.String() }, { description: 'The agent\'s answer' }),
        ...errors(400, 401, 404, 409, 413, 429, 502, 503, 504)
      }
    }
  }, async (request) => {
    const { question } = request.body
    if (question.trim() === '') {
      throw new AgentSessionError('INVALID_REQUEST', 'question must not be blank')
    }
    const size = Buffer.byteLength(question)
    if (size > maxQuestionBytes) {
      throw new AgentSessionError('PAYLOAD_TOO_LARGE', `question is ${size} bytes; the limit is ${maxQuestionBytes} (MAX_QUESTION_BYTES)`)
    }
    const sessionId = request.query.session_id
    const { answer, durationMs } = await manager.ask(sessionId, question, {
      // Once the session took it: an ask refused as unknown, ended or busy is not a question received.
      onAccepted: () => {
        request.log.info({ sessionId, questionBytes: size }, 'question received')
        request.log.debug({ sessionId, question }, 'question text')
      }
    })
    request.log.info({ sessionId, answerBytes: Buffer.byteLength(answer), turnMs: durationMs }, 'question answered')
    request.log.debug({ sessionId, answer }, 'answer text')
    return { answer, session_id: sessionId }
  })
}

export default askRoutes
