// A live agent runs for hours and hundreds of turns: nothing of a finished
// turn (its question, its answer) may stay reachable from the agent's process.

import t from 'tap'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import { fileURLToPath } from 'node:url'
import { build, sandbox } from './helpers/index.js'

const ACP_SIMULATOR = fileURLToPath(new URL('./fixtures/fake-acp-agent.mjs', import.meta.url))

setFlagsFromString('--expose-gc')
const gc = runInNewContext('gc') as () => void

function heapAfterGc (): number {
  for (let i = 0; i < 4; i++) gc()
  return process.memoryUsage().heapUsed
}

t.test('turns of a live ACP agent leave no memory behind', async (t) => {
  const box = sandbox(t)
  const app = await build(t, box, { agentProtocol: 'acp', agentCommand: [process.execPath, ACP_SIMULATOR], agentIdleTimeout: 0 })
  const session = await app.agentSessions.create()
  // A large question makes a retained turn plain: its text alone is 20 KB.
  const question = 'x'.repeat(20_000)
  // Warm up past the kept history (the last 100 turns): code compiled on first
  // use, buffers grown to size and the history are not per turn.
  for (let i = 0; i < 120; i++) await app.agentSessions.ask(session.id, `${question} warm ${i}`)
  const before = heapAfterGc()
  const turns = 150
  for (let i = 0; i < turns; i++) await app.agentSessions.ask(session.id, `${question} ${i}`)
  const perTurn = (heapAfterGc() - before) / turns
  t.comment(`heap growth per turn: ${Math.round(perTurn)} bytes`)
  // A turn kept alive holds its 20 KB question at least; a few KB of history per turn is allowed.
  t.ok(perTurn < 10_000, `heap grows ${Math.round(perTurn)} bytes per turn`)
})
