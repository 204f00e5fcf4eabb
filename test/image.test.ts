// The container image, built by scripts/image/build.sh (bases reused, layers
// cached) and run with podman: the service on the image's Node with the
// bundled simulator as its agent. Skips only when no engine can be installed.

import t, { type Test } from 'tap'
import { execFile, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readdir, readFile } from 'node:fs/promises'
import { createServer } from 'node:net'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { ROOT, sleep, waitForGone } from './helpers/index.js'

const run = promisify(execFile)
const BUILD = join(ROOT, 'scripts', 'image', 'build.sh')
const IMAGE = 'localhost/fastify-agent-sessions:test'
const ENV = { ...process.env, CONTAINERS_CONF: join(ROOT, 'scripts', 'image', 'containers.conf') }
const TOKEN = randomBytes(16).toString('hex')
const KILL_GRACE_MS = 2000

// A cold build (Debian and Node bases, every layer) takes minutes; a warm one seconds.
t.setTimeout(40 * 60_000)

interface Built { ok: true, seconds: number }
interface NotBuilt { ok: false, why: string }

async function buildImage (): Promise<Built | NotBuilt> {
  const started = performance.now()
  const child = spawn('bash', [BUILD, '--agent', 'simulator', '--tag', IMAGE], { env: ENV, stdio: ['ignore', 'ignore', 'pipe'] })
  let stderr = ''
  child.stderr.on('data', (chunk: Buffer) => { stderr = (stderr + String(chunk)).slice(-20_000) })
  const code = await new Promise<number | null>((resolve) => child.once('close', resolve))
  if (code === 3) return { ok: false, why: `podman cannot be installed here: ${stderr.trim().split('\n').at(-1) ?? ''}` }
  if (code !== 0) throw new Error(`scripts/image/build.sh exited ${code}:\n${stderr}`)
  return { ok: true, seconds: (performance.now() - started) / 1000 }
}

async function podman (...args: string[]): Promise<{ code: number, stdout: string, stderr: string }> {
  try {
    const { stdout, stderr } = await run('podman', args, { env: ENV, maxBuffer: 16 * 1024 * 1024 })
    return { code: 0, stdout, stderr }
  } catch (err) {
    const e = err as { code?: number, stdout?: string, stderr?: string }
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' }
  }
}

async function freePort (): Promise<number> {
  const server = createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as { port: number }).port
  await new Promise((resolve) => server.close(resolve))
  return port
}

interface Container { name: string, url: string, startedAt: number }
const started: string[] = []

/** Starts the image on 127.0.0.1:<free port> (host network) with named volumes; removed with them after the test. */
async function startContainer (t: Test, env: Record<string, string> = {}): Promise<Container> {
  const name = `agent-sessions-test-${randomBytes(4).toString('hex')}`
  const port = await freePort()
  const volumes = [`${name}-workspace`, `${name}-state`]
  t.after(async () => {
    await podman('rm', '--force', '--time', '0', name)
    await podman('volume', 'rm', '--force', ...volumes)
  })
  const envArgs = Object.entries({ HOST: '127.0.0.1', PORT: String(port), API_TOKEN: TOKEN, KILL_GRACE: `${KILL_GRACE_MS}ms`, ...env })
    .flatMap(([key, value]) => ['--env', `${key}=${value}`])
  const startedAt = performance.now()
  const res = await podman('run', '--detach', '--name', name, '--network', 'host',
    // No systemd here for podman's periodic timer; the test runs the check itself.
    '--health-interval', 'disable',
    '--volume', `${volumes[0]}:/workspace`, '--volume', `${volumes[1]}:/state`,
    ...envArgs, IMAGE)
  if (res.code !== 0) throw new Error(`podman run failed: ${res.stderr}`)
  started.push(res.stdout.trim())
  return { name, url: `http://127.0.0.1:${port}`, startedAt }
}

/** Waits for the first answer of the readiness probe (any status); returns it and when it came. */
async function firstAnswer (c: Container, timeoutMs: number): Promise<{ status: number, at: number }> {
  const deadline = performance.now() + timeoutMs
  for (;;) {
    try {
      const res = await fetch(`${c.url}/api/health/ready`)
      await res.arrayBuffer()
      return { status: res.status, at: performance.now() }
    } catch {}
    if (performance.now() > deadline) {
      const logs = await podman('logs', c.name)
      throw new Error(`${c.name} did not answer within ${timeoutMs} ms:\n${logs.stdout}${logs.stderr}`)
    }
    await sleep(50)
  }
}

async function api (c: Container, method: string, path: string, body?: object, token: string | null = TOKEN): Promise<{ status: number, json: any }> {
  const res = await fetch(`${c.url}${path}`, {
    method,
    headers: { ...(token === null ? {} : { authorization: `Bearer ${token}` }), ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) })
  })
  return { status: res.status, json: await res.json() }
}

/** The simulator's grandchildren under the host pid `root`: a turn spawns its grandchild once it has read its prompt (and its faults). */
async function grandchildren (root: number): Promise<number> {
  const parents = new Map<number, number>()
  for (const entry of await readdir('/proc')) {
    if (!/^\d+$/.test(entry)) continue
    try {
      const stat = await readFile(`/proc/${entry}/stat`, 'utf8')
      parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]))
    } catch {}
  }
  const under = (pid: number): boolean => {
    for (let p = parents.get(pid); p !== undefined && p > 1; p = parents.get(p)) if (p === root) return true
    return false
  }
  let count = 0
  for (const pid of parents.keys()) {
    try {
      const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')
      if (argv.includes('__fake-child') && argv.includes('grandchild') && under(pid)) count++
    } catch {}
  }
  return count
}

async function waitForAsync (probe: () => Promise<boolean>, timeoutMs: number, what: string): Promise<void> {
  const deadline = performance.now() + timeoutMs
  while (!(await probe())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await sleep(50)
  }
}

// podman's overlay driver bind-mounts its storage directory on itself on first
// use; a test that brought it there takes it away once no container is left.
const STORAGE_MOUNT = ' /var/lib/containers/storage/overlay '
const storageMountedBefore = (await readFile('/proc/self/mounts', 'utf8')).includes(STORAGE_MOUNT)

const built = await buildImage()
if (!built.ok) {
  t.comment(`skipped: ${built.why}`)
}

t.test('the image', { skip: built.ok ? false : built.why }, async (t) => {
  if (!built.ok) return
  t.comment(`build (bases reused when present): ${built.seconds.toFixed(1)} s`)

  const inspect = JSON.parse((await podman('image', 'inspect', IMAGE)).stdout)[0]
  t.same(inspect.Config.Volumes ?? {}, {}, 'no anonymous VOLUME')
  t.same(inspect.Healthcheck?.Test, ['CMD', 'node', '/app/healthcheck.mjs'], 'HEALTHCHECK kept (docker format)')
  t.equal(inspect.Config.User, 'node')
  t.comment(`image size: ${(inspect.Size / 1e6).toFixed(1)} MB`)

  const c = await startContainer(t)
  const first = await firstAnswer(c, 120_000)
  t.equal(first.status, 200, 'ready on the first answer')
  t.comment(`cold start to healthy: ${Math.round(first.at - c.startedAt)} ms (podman run to the first 200 of /api/health/ready)`)

  t.test('runs the service on the image\'s Node, under tini, as node', async (t) => {
    const version = await podman('exec', c.name, 'node', '--version')
    t.match(version.stdout.trim(), /^v26\./, 'Node 26')
    const pid1 = await podman('exec', c.name, 'cat', '/proc/1/cmdline')
    t.equal(pid1.stdout.split('\0')[0], '/usr/bin/tini', 'PID 1 is tini')
    const tree = await podman('exec', c.name, 'sh', '-c', 'for p in /proc/[0-9]*; do echo "$(cat $p/stat | cut -d" " -f1,4) $(stat -c %U $p) $(tr "\\0" " " < $p/cmdline)"; done')
    t.match(tree.stdout, /^\d+ 1 node node dist\/server\.js/m, 'the server is tini\'s child and runs as node')
    t.notMatch(tree.stdout, /(^|\/)(npm|npx|corepack|yarn)( |$)/m)
    const tools = await podman('exec', c.name, 'sh', '-c', 'ls /usr/local/bin; command -v npm npx corepack yarn || true; find /app -name "*.map" -o -name "*.d.ts" | head -3')
    t.equal(tools.stdout.trim(), 'node', 'no npm, corepack, yarn, source maps or declarations in the image')
  })

  t.test('health 200, auth 401 without the token, start and ask through the image\'s agent', async (t) => {
    const health = await api(c, 'GET', '/api/health', undefined, null)
    t.equal(health.status, 200)
    t.equal(health.json.status, 'ok')
    t.equal(health.json.agent.version, '2026.11.20-fake', 'the bundled simulator answers')
    t.equal((await api(c, 'GET', '/api/health/live', undefined, null)).status, 200)
    const refused = await api(c, 'POST', '/api/session/start', undefined, null)
    t.equal(refused.status, 401)
    t.equal(refused.json.error, 'UNAUTHORIZED')
    const start = await api(c, 'POST', '/api/session/start')
    t.equal(start.status, 200)
    const answer = await api(c, 'POST', `/api/ask?session_id=${start.json.session_id}`, { question: 'where am I? [[show:cwd]]' })
    t.equal(answer.status, 200)
    t.equal(answer.json.answer, '/workspace', 'the agent ran in the workspace volume')
    t.equal((await api(c, 'POST', `/api/session/end?session_id=${start.json.session_id}`)).status, 200)
  })

  t.test('the HEALTHCHECK passes', async (t) => {
    const check = await podman('healthcheck', 'run', c.name)
    t.equal(check.code, 0, `podman healthcheck run: ${check.stdout}${check.stderr}`)
  })

  t.test('neither the service\'s user nor the agent\'s can write the application or the agent', async (t) => {
    const targets = '/app /app/dist /app/dist/server.js /app/node_modules /app/node_modules/fastify/package.json /app/package.json /app/healthcheck.mjs /opt/agent /opt/agent/bin /opt/agent/simulator.mjs /usr/local/bin/node /usr/local/bin'
    for (const user of ['node', 'agent']) {
      // find -writable asks the kernel (access(2)); touch and mkdir try for real.
      const script = `find ${targets} -maxdepth 0 -writable 2>/dev/null; find /app /opt/agent /usr/local -writable 2>/dev/null | head; ` +
        `for f in ${targets}; do if [ -d "$f" ]; then mkdir "$f/.probe" 2>/dev/null && echo "created in $f"; else touch "$f" 2>/dev/null && echo "wrote $f"; fi; done; true`
      const res = await podman('exec', '--user', user, c.name, 'sh', '-c', script)
      t.equal(res.code, 0)
      t.equal(res.stdout.trim(), '', `${user} can write none of them`)
    }
    const agentReads = await podman('exec', '--user', 'agent', c.name, 'sh', '-c', 'cat /app/package.json; ls /state; echo done')
    t.equal(agentReads.stdout.trim(), 'done', 'the agent user can read neither the application nor the service\'s state')
    const workspace = await podman('exec', '--user', 'agent', c.name, 'sh', '-c', 'touch /workspace/probe && echo ok')
    t.equal(workspace.stdout.trim(), 'ok', 'the agent user writes the workspace')
  })

  t.test('SIGTERM with 5 stuck agents: exit 0 within KILL_GRACE + 2 s', async (t) => {
    const ids: string[] = []
    for (let i = 0; i < 5; i++) ids.push((await api(c, 'POST', '/api/session/start')).json.session_id)
    // Stuck: no output, and SIGTERM ignored, so only the ladder's SIGKILL ends them.
    const asks = ids.map(async (id) => await api(c, 'POST', `/api/ask?session_id=${id}`, { question: '[[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]] hello' }))
    const pid = Number((await podman('inspect', '--format', '{{.State.Pid}}', c.name)).stdout.trim())
    t.ok(pid > 1, `the container's PID 1 is ${pid} on the host`)
    // Stuck for real once each turn has read its prompt, which its grandchild
    // shows (the host's /proc shows the container's processes too).
    await waitForAsync(async () => (await grandchildren(pid)) === 5, 60_000, 'the 5 stuck turns')
    // The signal the engine sends on stop, straight to the container's PID 1
    // (podman kill's and podman wait's own start-up is not the service's time).
    const sent = performance.now()
    process.kill(pid, 'SIGTERM')
    const gone = await waitForGone([pid], 60_000)
    const ms = performance.now() - sent
    t.same(gone, [], 'PID 1 exited')
    t.ok(ms < KILL_GRACE_MS + 2000, `exited in ${Math.round(ms)} ms (KILL_GRACE ${KILL_GRACE_MS} ms)`)
    t.comment(`SIGTERM to exit with 5 stuck agents: ${Math.round(ms)} ms (KILL_GRACE ${KILL_GRACE_MS} ms)`)
    t.equal((await podman('wait', c.name)).stdout.trim(), '0', 'exit code 0')
    const logs = (await podman('logs', c.name)).stdout.split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line))
    const ended = logs.filter((l) => l.msg === 'session ended' && l.reason === 'shutdown')
    t.equal(ended.length, 5, 'five sessions ended by the shutdown')
    t.ok(ended.every((l) => l.processes === 'killed'), 'each agent needed the SIGKILL after KILL_GRACE: stuck for real')
    for (const res of await Promise.all(asks)) t.equal(res.status, 503, 'each stuck ask was answered: shutting down')
  })
})

t.test('the HEALTHCHECK fails while the agent is unusable', { skip: built.ok ? false : built.why }, async (t) => {
  const c = await startContainer(t, { CURSOR_AGENT_BIN: '/opt/agent/bin/missing-agent' })
  const first = await firstAnswer(c, 120_000)
  t.equal(first.status, 503, 'not ready')
  t.equal((await api(c, 'GET', '/api/health/live', undefined, null)).status, 200, 'but alive')
  const health = await api(c, 'GET', '/api/health', undefined, null)
  t.equal(health.json.status, 'degraded')
  const check = await podman('healthcheck', 'run', c.name)
  t.equal(check.code, 1, 'podman healthcheck run fails')
  t.match(check.stdout + check.stderr, /unhealthy/)
})

t.test('no container, volume or conmon process is left behind', { skip: built.ok ? false : built.why }, async (t) => {
  // The tests above removed theirs in their own teardown, which ran before this test.
  const containers = await podman('ps', '--all', '--filter', 'name=agent-sessions-test-', '--format', '{{.Names}}')
  t.equal(containers.stdout.trim(), '', 'no container')
  const volumes = await podman('volume', 'ls', '--filter', 'name=agent-sessions-test-', '--format', '{{.Name}}')
  t.equal(volumes.stdout.trim(), '', 'no volume')
  const conmon = await run('ps', ['-eo', 'args'])
  t.notMatch(conmon.stdout, /conmon.*agent-sessions-test-/, 'no conmon')
  const mounts = await readFile('/proc/self/mounts', 'utf8')
  t.ok(started.length >= 2 && started.every((id) => /^[0-9a-f]{64}$/.test(id) && !mounts.includes(id)), 'no mount of theirs')
  if (!storageMountedBefore && mounts.includes(STORAGE_MOUNT) && (await podman('ps', '--all', '--quiet')).stdout.trim() === '') {
    await run('umount', [STORAGE_MOUNT.trim()])
  }
  t.equal((await readFile('/proc/self/mounts', 'utf8')).includes(STORAGE_MOUNT), storageMountedBefore, 'podman\'s storage mount as before the test')
})
