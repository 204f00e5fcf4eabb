// This package's name and version, found from the running module whether it
// runs from the sources or from dist/.

import { readFileSync } from 'node:fs'
import { dirname, join } from 'node:path'
import { fileURLToPath } from 'node:url'

export interface PackageInfo { name: string, version: string }

function find (): PackageInfo {
  let dir = dirname(fileURLToPath(import.meta.url))
  for (;;) {
    try {
      const pkg = JSON.parse(readFileSync(join(dir, 'package.json'), 'utf8')) as PackageInfo
      if (pkg.name === 'fastify-agent-sessions') return { name: pkg.name, version: pkg.version }
    } catch {}
    const parent = dirname(dir)
    if (parent === dir) return { name: 'fastify-agent-sessions', version: '0.0.0' }
    dir = parent
  }
}

export const packageInfo: PackageInfo = find()
