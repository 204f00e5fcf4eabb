// INSTANCE_URL's default: how the other instances reach this one, from the
// address it listens on. A wildcard bind (0.0.0.0, ::) is not an address
// anyone can connect to, so it is replaced by this machine's first
// non-internal IPv4 address (in a container or a pod: its own IP), else its
// first global IPv6 one; a machine with several networks should set
// INSTANCE_URL itself (Kubernetes: from the pod IP, see deploy/).

import { isIPv6 } from 'node:net'
import { networkInterfaces, type NetworkInterfaceInfo } from 'node:os'

const WILDCARDS = new Set(['0.0.0.0', '::', '0:0:0:0:0:0:0:0', '::0', ''])

export function defaultInstanceUrl (host: string, port: number, interfaces: NodeJS.Dict<NetworkInterfaceInfo[]> = networkInterfaces()): string {
  let address = host.trim().replace(/^\[(.*)\]$/, '$1')
  if (WILDCARDS.has(address)) address = routableAddress(interfaces) ?? '127.0.0.1'
  return `http://${isIPv6(address) ? `[${address}]` : address}:${port}`
}

function routableAddress (interfaces: NodeJS.Dict<NetworkInterfaceInfo[]>): string | undefined {
  const all = Object.values(interfaces).flatMap((list) => list ?? []).filter((i) => !i.internal)
  return all.find((i) => i.family === 'IPv4')?.address ??
    all.find((i) => i.family === 'IPv6' && !i.address.toLowerCase().startsWith('fe80'))?.address
}
