// The image's HEALTHCHECK: GET /api/health/ready at the address the server
// listens on (HOST and PORT, as the server reads them). Exit 0 when ready.
// A wildcard HOST is reached through loopback of the same family.

const host = (process.env.HOST ?? '127.0.0.1').trim()
const port = (process.env.PORT ?? '3000').trim()
const WILDCARD = { '0.0.0.0': '127.0.0.1', '::': '[::1]', '[::]': '[::1]', '': '127.0.0.1' }
const address = WILDCARD[host] ?? (host.includes(':') && !host.startsWith('[') ? `[${host}]` : host)

try {
  const res = await fetch(`http://${address}:${port}/api/health/ready`, { signal: AbortSignal.timeout(4000) })
  if (!res.ok) console.error(`not ready: ${res.status} ${await res.text()}`)
  process.exit(res.ok ? 0 : 1)
} catch (err) {
  console.error(`health check failed: ${err.cause?.message ?? err.message}`)
  process.exit(1)
}
