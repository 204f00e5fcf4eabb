// The README documents every setting and every error code the code has: the
// configuration table has a row per SETTINGS entry (its option, or none for a
// server-only setting, and its default), the error table a row per code.

import t from 'tap'
import { readFileSync } from 'node:fs'
import { join } from 'node:path'
import { SETTINGS } from '../lib/config.js'
import { ERROR_STATUS } from '../lib/errors.js'
import { ROOT } from './helpers/index.js'

const readme = readFileSync(join(ROOT, 'README.md'), 'utf8')
const section = (title: string): string => {
  const start = readme.indexOf(`\n## ${title}\n`)
  return readme.slice(start, readme.indexOf('\n## ', start + 1))
}

t.test('every setting has its row in the configuration table', async (t) => {
  const rows = section('Configuration').split('\n').filter((l) => l.startsWith('| ')).map((l) => l.split('|').map((c) => c.trim()))
  for (const setting of SETTINGS) {
    const row = rows.find((r) => r[1] === setting.env)
    t.ok(row, `${setting.env} has a row`)
    if (row === undefined) continue
    const serverOnly = 'serverOnly' in setting && setting.serverOnly === true
    t.equal(row[2], serverOnly ? '' : setting.option, `${setting.env}: its option`)
    if ('default' in setting) t.match(row[3], setting.default, `${setting.env}: its default`)
  }
})

t.test('every error code has its row in the error table, with its status', async (t) => {
  const rows = section('Errors').split('\n').filter((l) => l.startsWith('| ')).map((l) => l.split('|').map((c) => c.trim()))
  for (const [code, status] of Object.entries(ERROR_STATUS)) {
    const row = rows.find((r) => r[1].split(/,\s*/).includes(code))
    t.ok(row, `${code} has a row`)
    t.equal(row?.[2], String(status), `${code}: ${status}`)
  }
})
