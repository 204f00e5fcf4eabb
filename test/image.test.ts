// The container image, built by scripts/image/build.sh (bases reused, layers
// cached) and run with podman: the service on the image's Node with the
// bundled simulator as its agent, as user node with only the capabilities
// SETUID, SETGID and KILL, the agent as user agent, the token from a file only
// node can read. Skips only when no engine can be installed.
// AGENT_SESSIONS_TEST_IMAGE names another tag (a worktree's builds beside main's).

import t, { type Test } from 'tap'
import { execFile, spawn } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { chmod, chown, mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { freePort, ROOT, sleep, waitForGone } from './helpers/index.js'

const run = promisify(execFile)
const BUILD = join(ROOT, 'scripts', 'image', 'build.sh')
const IMAGE = process.env.AGENT_SESSIONS_TEST_IMAGE ?? 'localhost/fastify-agent-sessions:test'
const ENV = { ...process.env, CONTAINERS_CONF: join(ROOT, 'scripts', 'image', 'containers.conf') }
const TOKEN = randomBytes(16).toString('hex')
const KILL_GRACE_MS = 2000
// What the README tells users to run the image with: no capability but the three the service needs.
const CAPS = ['--cap-drop=all', '--cap-add=SETUID,SETGID,KILL']
// CAP_KILL, CAP_SETGID, CAP_SETUID (bits 5, 6, 7) as /proc/<pid>/status shows them.
const SERVICE_CAPS = '00000000000000e0'
const NO_CAPS = '0000000000000000'

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

interface Container { name: string, url: string, startedAt: number }
const started: string[] = []

// The token as a secret file: owned by node (1000), mode 0400, mounted read-only.
const secrets = await mkdtemp(join(tmpdir(), 'agent-sessions-image-secret-'))
const TOKEN_FILE = join(secrets, 'api-token')
await writeFile(TOKEN_FILE, `${TOKEN}\n`)
await chown(TOKEN_FILE, 1000, 1000)
await chmod(TOKEN_FILE, 0o400)
await chmod(secrets, 0o755)
t.teardown(async () => await rm(secrets, { recursive: true, force: true }))
const TOKEN_IN_CONTAINER = '/run/secrets/api-token'

/**
 * Starts the image on 127.0.0.1:<free port> (host network) with named volumes
 * for the workspace, the state and the agent's home, the token from TOKEN_FILE,
 * and `caps` (by default only SETUID, SETGID and KILL); removed with its volumes after the test.
 */
async function startContainer (t: Test, env: Record<string, string> = {}, caps: string[] = CAPS, volumesOf?: Container): Promise<Container> {
  const name = `agent-sessions-test-${randomBytes(4).toString('hex')}`
  const port = await freePort()
  const prefix = volumesOf?.name ?? name
  const volumes = [`${prefix}-workspace`, `${prefix}-state`, `${prefix}-agent-home`]
  t.after(async () => {
    await podman('rm', '--force', '--time', '0', name)
    await podman('volume', 'rm', '--force', ...volumes)
  })
  const envArgs = Object.entries({ HOST: '127.0.0.1', PORT: String(port), API_TOKEN_FILE: TOKEN_IN_CONTAINER, KILL_GRACE: `${KILL_GRACE_MS}ms`, ...env })
    .flatMap(([key, value]) => ['--env', `${key}=${value}`])
  const startedAt = performance.now()
  const res = await podman('run', '--detach', '--name', name, '--network', 'host',
    // No systemd here for podman's periodic timer; the test runs the check itself.
    '--health-interval', 'disable',
    '--volume', `${volumes[0]}:/workspace`, '--volume', `${volumes[1]}:/state`, '--volume', `${volumes[2]}:/home/agent`,
    '--volume', `${TOKEN_FILE}:${TOKEN_IN_CONTAINER}:ro`,
    ...caps, ...envArgs, IMAGE)
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

interface HostProcess { pid: number, ppid: number, argv: string[], status: string }

/** The processes under the host pid `root` (the container's PID 1), read from the host's /proc, which shows the container's too. */
async function processesUnder (root: number): Promise<HostProcess[]> {
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
  const found: HostProcess[] = []
  for (const [pid, ppid] of parents) {
    if (!under(pid)) continue
    try {
      const argv = (await readFile(`/proc/${pid}/cmdline`, 'utf8')).split('\0')
      found.push({ pid, ppid, argv, status: await readFile(`/proc/${pid}/status`, 'utf8') })
    } catch {}
  }
  return found
}

/** A field of /proc/<pid>/status, its value as shown ("1000\t1000\t1000\t1000", "00000000000000e0"). */
function statusField (status: string, field: string): string {
  return new RegExp(`^${field}:[ \\t]*(.*)$`, 'm').exec(status)?.[1].trim() ?? ''
}

/** The simulator's grandchildren under the host pid `root`: a turn spawns its grandchild once it has read its prompt (and its faults). */
async function grandchildren (root: number): Promise<number> {
  return (await processesUnder(root)).filter((p) => p.argv.includes('__fake-child') && p.argv.includes('grandchild')).length
}

/** The simulator's main processes (the agents the service started) under the host pid `root`. */
async function agents (root: number): Promise<HostProcess[]> {
  return (await processesUnder(root)).filter((p) => p.argv.includes('/opt/agent/simulator.mjs') && !p.argv.includes('__fake-child'))
}

/** The server's JSON log lines so far. */
async function logLines (c: Container): Promise<any[]> {
  return (await podman('logs', c.name)).stdout.split('\n').filter((line) => line.startsWith('{')).map((line) => JSON.parse(line))
}

async function containerPid (c: Container): Promise<number> {
  return Number((await podman('inspect', '--format', '{{.State.Pid}}', c.name)).stdout.trim())
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
  t.same(inspect.Healthcheck?.Test, ['CMD', '/usr/local/bin/node', '/app/healthcheck.mjs'], 'HEALTHCHECK kept (docker format)')
  t.equal(inspect.Config.User, 'node')
  t.comment(`image size: ${(inspect.Size / 1e6).toFixed(1)} MB`)

  const c = await startContainer(t)
  const first = await firstAnswer(c, 120_000)
  t.equal(first.status, 200, 'ready on the first answer')
  t.comment(`cold start to healthy: ${Math.round(first.at - c.startedAt)} ms (podman run to the first 200 of /api/health/ready)`)

  t.test('runs the service on the image\'s Node, under tini, as node', async (t) => {
    const version = await podman('exec', c.name, '/usr/local/bin/node', '--version')
    t.match(version.stdout.trim(), /^v26\./, 'Node 26')
    const pid1 = await podman('exec', c.name, 'cat', '/proc/1/cmdline')
    t.equal(pid1.stdout.split('\0')[0], '/usr/bin/tini', 'PID 1 is tini')
    // Who each process is, from its Uid line (real uid).
    const tree = await podman('exec', c.name, 'sh', '-c', 'for p in /proc/[0-9]*; do echo "$(cut -d" " -f1,4 $p/stat) $(sed -n "s/^Uid:\\t//p" $p/status | cut -f1) $(tr "\\0" " " < $p/cmdline)"; done')
    t.match(tree.stdout, /^\d+ 1 1000 \/usr\/local\/bin\/node dist\/server\.js/m, 'the server is tini\'s child (start.sh exec()ed it) and runs as node (1000)')
    t.notMatch(tree.stdout, /(^|\/)(npm|npx|corepack|yarn)( |$)/m)
    const tools = await podman('exec', c.name, 'sh', '-c', 'ls /usr/local/bin; command -v npm npx corepack yarn || true; find /app -name "*.map" -o -name "*.d.ts" | head -3')
    t.equal(tools.stdout.trim(), 'node', 'no npm, corepack, yarn, source maps or declarations in the image')
  })

  t.test('health 200, auth 401 without the token, start and ask through the image\'s agent', async (t) => {
    const health = await api(c, 'GET', '/api/health', undefined, null)
    t.equal(health.status, 200)
    t.equal(health.json.status, 'ok')
    t.equal(health.json.agent, undefined, 'without the token, health says nothing of the agent')
    const detailed = await api(c, 'GET', '/api/health')
    t.equal(detailed.json.agent.version, '2026.11.20-fake', 'the bundled simulator answers')
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

  t.test('the service is node with only SETUID, SETGID and KILL; its agent is agent (1001) and reaches none of its secrets; ending a stuck agent works across users', async (t) => {
    const pid1 = await containerPid(c)
    const [server] = (await processesUnder(pid1)).filter((p) => p.ppid === pid1 && p.argv.includes('dist/server.js'))
    t.ok(server, 'the server process')
    t.equal(statusField(server.status, 'Uid'), '1000\t1000\t1000\t1000', 'the service runs as node (real, effective, saved, fs uid)')
    t.equal(statusField(server.status, 'Gid'), '1000\t1000\t1000\t1000')
    t.equal(statusField(server.status, 'CapEff'), SERVICE_CAPS, 'effective: exactly SETUID, SETGID and KILL')
    t.equal(statusField(server.status, 'CapPrm'), SERVICE_CAPS, 'permitted: the same')
    t.equal(statusField(server.status, 'CapAmb'), NO_CAPS, 'no ambient capabilities (podman gives a non-root user the added ones as ambient: start.sh drops them)')
    t.equal(statusField(server.status, 'CapInh'), NO_CAPS, 'no inheritable ones either (podman sets those too: start.sh drops them)')
    t.equal(statusField(server.status, 'CapBnd'), SERVICE_CAPS, 'the container keeps no other capability')
    t.comment(`service: CapInh ${statusField(server.status, 'CapInh')} CapPrm ${statusField(server.status, 'CapPrm')} ` +
      `CapEff ${statusField(server.status, 'CapEff')} CapAmb ${statusField(server.status, 'CapAmb')} NoNewPrivs ${statusField(server.status, 'NoNewPrivs')}`)
    const serverPidInside = statusField(server.status, 'NSpid').split(/\s+/).at(-1)
    t.match(serverPidInside, /^\d+$/)

    // A stuck turn keeps the agent alive while we look at it (SIGTERM ignored: only SIGKILL ends it).
    const start = await api(c, 'POST', '/api/session/start')
    t.equal(start.status, 200)
    const id = start.json.session_id as string
    const ask = api(c, 'POST', `/api/ask?session_id=${id}`, { question: '[[fault:stall]] [[fault:ignore-sigterm]] [[fault:grandchild]] hello' })
    await waitForAsync(async () => (await grandchildren(pid1)) === 1, 60_000, 'the stuck turn')
    const [agent] = await agents(pid1)
    t.ok(agent, 'the agent process')
    t.equal(statusField(agent.status, 'Uid'), '1001\t1001\t1001\t1001', 'the agent runs as agent (1001)')
    t.equal(statusField(agent.status, 'Gid'), '1001\t1001\t1001\t1001', 'in group agent')
    t.equal(statusField(agent.status, 'Groups'), '', 'without supplementary groups (node\'s membership of group agent is not passed on)')
    for (const field of ['CapInh', 'CapPrm', 'CapEff', 'CapAmb']) t.equal(statusField(agent.status, field), NO_CAPS, `the agent holds no capability (${field})`)
    t.comment(`agent: CapInh ${statusField(agent.status, 'CapInh')} CapPrm ${statusField(agent.status, 'CapPrm')} ` +
      `CapEff ${statusField(agent.status, 'CapEff')} CapAmb ${statusField(agent.status, 'CapAmb')}`)

    // What the agent's shell commands could do, tried by a process with the
    // agent's exact credentials (setpriv from root: uid, gid, no groups; the
    // change from root drops every permitted, effective and ambient capability).
    const probe = `cat /proc/self/status; echo ---; ` +
      'ls /state >/dev/null 2>&1 && echo "read /state"; ' +
      `cat ${TOKEN_IN_CONTAINER} >/dev/null 2>&1 && echo "read the token file"; ` +
      `cat /proc/${serverPidInside}/environ >/dev/null 2>&1 && echo "read the service's environ"; ` +
      `stat -c "the service's environ: %U %a" /proc/${serverPidInside}/environ; ` +
      `cat /proc/${serverPidInside}/cmdline >/dev/null 2>&1 && echo "can read the service's cmdline"; ` +
      `kill -0 ${serverPidInside} 2>/dev/null && echo "signalled the service"; ` +
      '/usr/local/bin/node -e "" 2>/dev/null && echo "executed /usr/local/bin/node"; ' +
      'cat /usr/local/bin/node >/dev/null 2>&1 && echo "read /usr/local/bin/node"; ' +
      'ls /workspace >/dev/null && echo "can list the workspace"; true'
    const res = await podman('exec', '--user', 'root', c.name, 'setpriv', '--reuid=1001', '--regid=1001', '--clear-groups', '--', 'sh', '-c', probe)
    t.equal(res.code, 0, res.stderr)
    const [probeStatus, tried] = res.stdout.split('---\n')
    for (const field of ['Uid', 'Gid', 'Groups', 'CapPrm', 'CapEff', 'CapAmb', 'CapBnd']) {
      t.equal(statusField(probeStatus, field), statusField(agent.status, field), `the probe's ${field} is the agent's`)
    }
    t.equal(tried.trim(), 'the service\'s environ: node 400\ncan read the service\'s cmdline\ncan list the workspace',
      'the agent\'s user cannot list /state, read the token file or the service\'s environ (node\'s, 0400, and another uid fails the ptrace check), signal the service, ' +
      'or execute or read its node; command lines are readable, as on any Linux system')
    // The token file works for the service (it started with it) and only for it.
    const asNode = await podman('exec', '--user', 'node', c.name, 'sh', '-c', `test -r ${TOKEN_IN_CONTAINER} && stat -c '%a %u' ${TOKEN_IN_CONTAINER}`)
    t.equal(asNode.stdout.trim(), '400 1000', 'the token file: mode 0400, owned by node')

    // Ending the session tears the agent down across users: SIGTERM ignored, SIGKILL after KILL_GRACE (CAP_KILL).
    const ended = await api(c, 'POST', `/api/session/end?session_id=${id}`)
    t.equal(ended.status, 200)
    t.equal((await ask).status, 404, 'the stuck ask was answered: its session ended')
    let end: any
    await waitForAsync(async () => {
      end = (await logLines(c)).find((l) => l.msg === 'session ended' && l.sessionId === id)
      return end !== undefined
    }, 30_000, 'the session\'s teardown')
    t.equal(end.processes, 'killed', 'the service SIGKILLed the agent\'s group (another user\'s)')
    t.same((await processesUnder(pid1)).filter((p) => p.argv.includes('/opt/agent/simulator.mjs')).map((p) => p.argv.join(' ')), [],
      'neither the agent nor its grandchild is left')
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
    const inside = (await processesUnder(pid)).map((p) => p.pid)
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
    t.same(await waitForGone(inside, 10_000), [], 'none of the container\'s processes is left (the service, its agents, their grandchildren)')
    const logs = await logLines(c)
    // The image keeps its store on the /state volume: a stop hibernates the sessions instead of ending them.
    const hibernated = logs.filter((l) => l.msg === 'session hibernated' && l.why === 'shutdown')
    t.same(hibernated.map((l) => l.sessionId).sort(), [...ids].sort(), 'the five sessions hibernated by the shutdown')
    t.ok(hibernated.every((l) => l.processes === 'killed'), 'each agent (user agent) needed the SIGKILL after KILL_GRACE: stuck for real')
    t.equal(logs.filter((l) => l.msg === 'session ended' && ids.includes(l.sessionId)).length, 0, 'none of them ended (the earlier subtests ended sessions of their own)')
    for (const res of await Promise.all(asks)) t.equal(res.status, 503, 'each stuck ask was answered: shutting down')

    // The same container started again: its sessions come back from /state, and answer.
    t.equal((await podman('start', c.name)).code, 0, 'started again')
    t.equal((await firstAnswer(c, 120_000)).status, 200, 'ready again')
    for (const id of ids) {
      t.equal((await api(c, 'POST', `/api/heartbeat?session_id=${id}`)).status, 200, `session ${id} is known after the restart`)
    }
    const after = await api(c, 'POST', `/api/ask?session_id=${ids[0]}`, { question: 'still there?' })
    t.equal(after.status, 200, `an ask after the restart is answered: ${JSON.stringify(after.json)}`)
    t.equal(after.json.session_id, ids[0])
  })
})

t.test('sessions outlive their container: a new one on the same volumes brings them back, conversations included', { skip: built.ok ? false : built.why }, async (t) => {
  const first = await startContainer(t)
  t.equal((await firstAnswer(first, 120_000)).status, 200)
  const start = await api(first, 'POST', '/api/session/start')
  const id = start.json.session_id as string
  const before = await api(first, 'POST', `/api/ask?session_id=${id}`, { question: 'first question' })
  t.equal(before.status, 200)
  t.match(before.json.answer, /^Answer 1: /)
  const stop = await podman('stop', '--time', '30', first.name)
  t.equal(stop.code, 0, 'podman stop')
  t.equal((await podman('inspect', '--format', '{{.State.ExitCode}}', first.name)).stdout.trim(), '0', 'exit code 0')
  t.ok((await logLines(first)).some((l) => l.msg === 'session hibernated' && l.sessionId === id), 'hibernated on the state volume')
  t.equal((await podman('rm', first.name)).code, 0, 'the container removed (an upgrade replaces it)')
  // The agent's conversation lives in its home (the simulator's chats, as Cursor's under ~/.cursor): that volume comes along.
  const second = await startContainer(t, {}, CAPS, first)
  t.equal((await firstAnswer(second, 120_000)).status, 200)
  t.equal((await api(second, 'POST', `/api/heartbeat?session_id=${id}`)).status, 200, 'the session is known to the new container')
  const after = await api(second, 'POST', `/api/ask?session_id=${id}`, { question: 'second question' })
  t.equal(after.status, 200, JSON.stringify(after.json))
  t.match(after.json.answer, /^Answer 2: /, 'the agent resumed the same conversation (its second answer)')
})

t.test('the HEALTHCHECK fails while the agent is unusable', { skip: built.ok ? false : built.why }, async (t) => {
  // With the engine's default capabilities (no --cap-drop): they include SETUID, SETGID and KILL.
  const c = await startContainer(t, { CURSOR_AGENT_BIN: '/opt/agent/bin/missing-agent' }, [])
  const first = await firstAnswer(c, 120_000)
  t.equal(first.status, 503, 'not ready')
  t.equal((await api(c, 'GET', '/api/health/live', undefined, null)).status, 200, 'but alive')
  const health = await api(c, 'GET', '/api/health', undefined, null)
  t.equal(health.json.status, 'degraded')
  const check = await podman('healthcheck', 'run', c.name)
  t.equal(check.code, 1, 'podman healthcheck run fails')
  t.match(check.stdout + check.stderr, /unhealthy/)
})

t.test('without SETUID, SETGID and KILL the service refuses to start, saying why', { skip: built.ok ? false : built.why }, async (t) => {
  const exited = async (c: Container): Promise<{ code: string, logs: string }> => {
    await waitForAsync(async () => (await podman('inspect', '--format', '{{.State.Status}}', c.name)).stdout.trim() === 'exited', 60_000, `${c.name} to exit`)
    const code = (await podman('inspect', '--format', '{{.State.ExitCode}}', c.name)).stdout.trim()
    const logs = await podman('logs', c.name)
    return { code, logs: logs.stdout + logs.stderr }
  }
  // Dropped from the container (docker/podman --cap-drop ALL alone, Kubernetes' drop [ALL] without add):
  // the kernel would refuse to execute the service's node (file capabilities it cannot grant) with a bare EPERM.
  const dropped = await exited(await startContainer(t, {}, ['--cap-drop=all']))
  t.equal(dropped.code, '1', 'exit code 1')
  t.match(dropped.logs, /the container lacks the capabilities SETUID SETGID KILL \(CapBnd 0000000000000000\)/)
  t.match(dropped.logs, /--cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL/, 'and how to keep them')
  t.notMatch(dropped.logs, /Operation not permitted/, 'not the bare EPERM')
  const killDropped = await exited(await startContainer(t, {}, ['--cap-drop=all', '--cap-add=SETUID,SETGID']))
  t.match(killDropped.logs, /the container lacks the capabilities KILL \(CapBnd 00000000000000c0\)/, 'one missing is named alone')
  // no_new_privs (Kubernetes' allowPrivilegeEscalation: false): node runs, its file capabilities do not apply, the service says so.
  // With the engine's default capabilities: podman's --cap-add hands a non-root user the added ones as
  // ambient capabilities, which no_new_privs lets the service keep (Docker and Kubernetes do not).
  const nnp = await exited(await startContainer(t, {}, ['--security-opt=no-new-privileges']))
  t.equal(nnp.code, '1', 'exit code 1')
  t.match(nnp.logs, /AGENT_USER=agent \(option agentUser\): the service cannot run processes as agent and signal them: it lacks CAP_SETUID, CAP_SETGID, CAP_KILL \(CapEff 0000000000000000 in \/proc\/self\/status\); no_new_privs is set/)
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
