// POST /api/cancel with the cursor driver: the turn's process group is torn
// down, the ask answers `cancelled` with the text that arrived, and the
// session's chat goes on.

import t from 'tap'
import { ask, build, sandbox, startSession, waitFor, waitForGone } from './helpers/index.js'

t.test('cancel tears the cursor turn down and the session stays usable', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const id = await startSession(app)
  const none = await app.inject({ method: 'POST', url: `/api/cancel?session_id=${id}` })
  t.same(none.json(), { session_id: id, cancelled: false }, 'no turn in flight')
  t.equal((await ask(app, id, 'first')).statusCode, 200)

  const pending = ask(app, id, 'wait [[fault:stall]] [[fault:grandchild]] [[fault:ignore-sigterm]]')
  await waitFor(() => box.pids().some((p) => p.role === 'grandchild'), 'the turn and its grandchild started')
  const cancelled = await app.inject({ method: 'POST', url: `/api/cancel?session_id=${id}` })
  t.same(cancelled.json(), { session_id: id, cancelled: true })
  const res = await pending
  t.equal(res.statusCode, 200, res.body)
  t.equal(res.json().stop_reason, 'cancelled')
  t.same(await waitForGone(box.pids().map((p) => p.pid)), [], 'the turn\'s processes, its grandchild too, are gone')

  const next = await ask(app, id, 'and now?')
  t.equal(next.statusCode, 200, next.body)
  t.match(next.json().answer, /^Answer 2:/, 'the same chat goes on after the cancelled turn')
})

t.test('cancel of an unknown session is a 404 like the other routes', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box)
  const res = await app.inject({ method: 'POST', url: '/api/cancel?session_id=nope' })
  t.equal(res.statusCode, 404)
  t.equal(res.json().error, 'SESSION_NOT_FOUND')
})
