// The slice of pino's interface the core logs through, so lib/ needs no
// framework: Fastify's logger, pino itself or a test double all fit.

export type LogFn = (obj: object, msg?: string) => void

export interface Logger {
  debug: LogFn
  info: LogFn
  warn: LogFn
  error: LogFn
}

const noop: LogFn = () => {}
export const silentLogger: Logger = { debug: noop, info: noop, warn: noop, error: noop }
