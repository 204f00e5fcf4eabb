// An agent's stdout as the JSON-RPC lines the ACP SDK should see. Agents and
// the tools they wrap sometimes print logs there; those lines are skipped
// (and counted) instead of being answered with parse errors, and one enormous
// line is dropped without buffering it whole.

import type { Readable } from 'node:stream'

export interface JsonLinesOptions {
  /** Longest line kept; longer ones are dropped as they stream. */
  maxLineBytes: number
  /** Told about each skipped line: why, and its first bytes. */
  onSkip: (why: 'not-json' | 'too-long', sample: string) => void
}

const NEWLINE = 0x0a
const SAMPLE_BYTES = 120

export function jsonLines (input: Readable, options: JsonLinesOptions): ReadableStream<Uint8Array> {
  let pending: Buffer[] = []
  let pendingBytes = 0
  let dropping = false
  let ended = false

  const lineOf = (parts: Buffer[]): Buffer | null => {
    const line = parts.length === 1 ? parts[0] : Buffer.concat(parts)
    let start = 0
    while (start < line.length && (line[start] === 0x20 || line[start] === 0x09 || line[start] === 0x0d)) start++
    if (start === line.length) return null
    // A JSON-RPC message is an object; anything else is someone's log line.
    if (line[start] !== 0x7b) {
      options.onSkip('not-json', line.subarray(start, start + SAMPLE_BYTES).toString('utf8'))
      return null
    }
    return line
  }

  return new ReadableStream<Uint8Array>({
    start (controller) {
      input.on('data', (chunk: Buffer) => {
        let from = 0
        while (from < chunk.length) {
          const newline = chunk.indexOf(NEWLINE, from)
          const end = newline === -1 ? chunk.length : newline
          if (!dropping) {
            pending.push(chunk.subarray(from, end))
            pendingBytes += end - from
            if (pendingBytes > options.maxLineBytes) {
              options.onSkip('too-long', Buffer.concat(pending).subarray(0, SAMPLE_BYTES).toString('utf8'))
              dropping = true
              pending = []
              pendingBytes = 0
            }
          }
          if (newline === -1) break
          if (!dropping) {
            const line = lineOf(pending)
            if (line !== null && !ended) controller.enqueue(Buffer.concat([line, Buffer.from('\n')]))
          }
          dropping = false
          pending = []
          pendingBytes = 0
          from = newline + 1
        }
      })
      const end = (): void => {
        if (ended) return
        ended = true
        if (!dropping && pendingBytes > 0) {
          const line = lineOf(pending)
          if (line !== null) controller.enqueue(line)
        }
        controller.close()
      }
      input.once('end', end)
      // A pipe destroyed by the teardown closes without 'end'.
      input.once('close', end)
      input.once('error', () => { end() })
    },
    cancel () {
      // The reader is gone (the connection closed): nothing may be enqueued after this.
      ended = true
      input.destroy()
    }
  })
}
