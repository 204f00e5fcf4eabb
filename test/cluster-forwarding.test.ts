// Any instance answers any session: three instances sharing a real Redis;
// a session started on A is asked (JSON and SSE), heartbeated, cancelled,
// watched and ended through the others, which forward to A (auth, request id,
// body and streams), and its 404 reason is the same from every instance.

import t from 'tap'
import { EVENT_TIMEOUT_MS, sandbox } from './helpers/index.js'
import { call, startInstance, until, type Instance } from './helpers/cluster.js'
import { redisMissing, startRedis } from './helpers/redis.js'
import { openSse } from './helpers/sse.js'

const TOKEN = 'cluster-secret-token'
const auth = { authorization: `Bearer ${TOKEN}` }

const missing = redisMissing()
if (missing !== null) {
  t.plan(0, missing)
} else {
  t.test('start via A, ask via B, heartbeat via C, an SSE ask via B, cancel via C, end via A', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const [a, b, c] = await Promise.all([1, 2, 3].map(async () => await startInstance(t, box, redis.url, { apiToken: TOKEN }))) as [Instance, Instance, Instance]
    const owner = a.app.agentSessionsCluster!.instanceId
    // Every instance sees the others (the view is read with each liveness write).
    await until(async () => (await call('GET', `${c.url}/api/health`, undefined, auth)).json.cluster?.instances.length === 3, 'three live instances', EVENT_TIMEOUT_MS)

    const started = await call('POST', `${a.url}/api/session/start`, undefined, auth)
    t.equal(started.status, 200)
    const id = started.json.session_id as string

    t.equal((await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'remember blue' })).status, 401, 'B still wants the token')
    const asked = await call('POST', `${b.url}/api/ask?session_id=${id}`, { question: 'remember blue' }, { ...auth, 'x-request-id': 'trace-ask-1' })
    t.equal(asked.status, 200, JSON.stringify(asked.json))
    t.equal(asked.json.session_id, id)
    t.match(asked.json.answer, /remember blue/, 'the body reached the agent')
    t.equal(asked.headers.get('x-request-id'), 'trace-ask-1', 'the request id went along and came back')
    t.ok(a.app.agentSessions.has(id), 'A runs the session')
    t.notOk(b.app.agentSessions.has(id), 'B only forwarded')

    const beat = await call('POST', `${c.url}/api/heartbeat?session_id=${id}`, undefined, auth)
    t.equal(beat.status, 200)
    t.match(beat.json, { message: 'Heartbeat received', session_id: id })
    t.notOk(c.app.agentSessions.has(id))

    const history = await call('GET', `${c.url}/api/session/history?session_id=${id}`, undefined, auth)
    t.equal(history.status, 200)
    t.same(history.json.turns.map((turn: { question: string }) => turn.question), ['remember blue'])

    // The session's own stream, watched through C while the ask streams through B.
    const watch = await openSse(`${c.url}/api/session/events?session_id=${id}`, { headers: auth })
    t.equal(watch.status, 200)
    t.match(watch.headers.get('content-type'), /^text\/event-stream/)

    const stream = await openSse(`${b.url}/api/ask?session_id=${id}`, { method: 'POST', body: JSON.stringify({ question: 'and now? [[fault:slow-chunks=300]]' }), headers: auth })
    t.equal(stream.status, 200)
    t.match(stream.headers.get('content-type'), /^text\/event-stream/, 'the SSE stream comes through B')
    const first = await stream.next()
    t.ok(first !== null, 'the first event came through B while the turn runs')
    t.equal(a.app.agentSessions.get(id).state, 'busy', 'the turn was still running on A')
    const cancelled = await call('POST', `${c.url}/api/cancel?session_id=${id}`, undefined, auth)
    t.equal(cancelled.status, 200)
    t.same(cancelled.json, { session_id: id, cancelled: true }, 'cancel via C reached the turn on A')
    const rest = await stream.all()
    const last = rest.at(-1)
    t.equal(last?.event, 'answer')
    t.equal(last?.data.stop_reason, 'cancelled')
    const seen: string[] = []
    for (;;) {
      const event = await watch.next()
      if (event === null) break
      seen.push(event.event)
      if (event.event === 'turn_ended' || event.event === 'answer' || seen.length > 200) break
    }
    t.ok(seen.length > 0, `the session stream through C carried the turn (${seen.slice(0, 5).join(', ')}...)`)
    watch.abort()

    const ended = await call('POST', `${a.url}/api/session/end?session_id=${id}`, undefined, auth)
    t.equal(ended.status, 200)
    for (const [name, instance] of [['A', a], ['B', b], ['C', c]] as const) {
      const gone = await call('POST', `${instance.url}/api/heartbeat?session_id=${id}`, undefined, auth)
      t.equal(gone.status, 404, `${name}: 404`)
      t.equal(gone.json.error, 'SESSION_NOT_FOUND')
      t.equal(gone.json.reason, 'ended', `${name}: reason ended`)
    }
    t.equal(owner, a.app.agentSessionsCluster!.instanceId)
  })

  t.test('a start lands elsewhere when the receiving instance is full; 503 only when none has room', async (t) => {
    const redis = await startRedis(t)
    const box = sandbox(t)
    const a = await startInstance(t, box, redis.url, { maxSessions: 1 })
    const b = await startInstance(t, box, redis.url, { maxSessions: 1 })
    await until(async () => {
      const view = (await call('GET', `${a.url}/api/health`)).json.cluster
      return view?.instances.length === 2 && view.instances.every((i: { free_sessions: number }) => i.free_sessions === 1)
    }, 'both instances advertised with room', EVENT_TIMEOUT_MS)
    const first = await call('POST', `${a.url}/api/session/start`)
    t.equal(first.status, 200)
    t.ok(a.app.agentSessions.has(first.json.session_id), 'the first start stays on A (it had room)')
    // A advertises its full house within a moment; B's room is what counts.
    const second = await call('POST', `${a.url}/api/session/start`)
    t.equal(second.status, 200, JSON.stringify(second.json))
    t.ok(b.app.agentSessions.has(second.json.session_id), 'the second start, sent to A, landed on B')
    t.equal((await call('POST', `${a.url}/api/heartbeat?session_id=${second.json.session_id}`)).status, 200, 'and A answers for it')
    await until(async () => {
      const view = (await call('GET', `${a.url}/api/health`)).json.cluster
      return view?.instances.every((i: { free_sessions: number }) => i.free_sessions === 0)
    }, 'both instances advertised full', EVENT_TIMEOUT_MS)
    const third = await call('POST', `${b.url}/api/session/start`)
    t.equal(third.status, 503, 'none has room')
    t.equal(third.json.error, 'SESSION_LIMIT_REACHED')
    t.ok(third.headers.get('retry-after'), 'with Retry-After')
  })
}
