// Every setting once: its environment variable, its plugin option, its type
// and default. The env schema (validated by env-schema / @fastify/env), the
// option mapping and the typed config object are all derived from this table.

import { readFileSync, statSync } from 'node:fs'
import { isIP, isIPv4, isIPv6 } from 'node:net'
import { totalmem } from 'node:os'
import { resolve } from 'node:path'
import { parse as parseShellWords, quote as quoteShellWords } from 'shell-quote'
import { capabilityLeakProblem, resolveAgentUser, switchUserProblem, workspaceAccessProblem, type AgentUser } from './processes/agent-user.js'

type Kind = 'duration' | 'integer' | 'string' | 'boolean' | 'signal' | 'list' | 'command'

interface Setting {
  env: string
  option: string
  kind: Kind
  default?: string
  min?: number
  max?: number
  enum?: readonly string[]
  /** A regular expression the value must match (strings only), and what it takes, for the error message. */
  pattern?: string
  hint?: string
  /** Read by the standalone server only; not a plugin option (an embedder's host owns these). */
  serverOnly?: boolean
  /** Set means meant: present but blank (an empty variable, an option read from one that is unset) is an error, never "off". */
  secret?: boolean
}

export const SETTINGS = [
  { env: 'PORT', option: 'port', kind: 'integer', default: '3000', min: 0, max: 65535, serverOnly: true },
  { env: 'HOST', option: 'host', kind: 'string', default: '127.0.0.1', serverOnly: true },
  { env: 'LOG_LEVEL', option: 'logLevel', kind: 'string', default: 'info', enum: ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'], serverOnly: true },
  { env: 'WORKSPACE_DIR', option: 'workspaceDir', kind: 'string' },
  { env: 'AGENT_PROTOCOL', option: 'agentProtocol', kind: 'string', default: 'cursor', enum: ['cursor', 'acp'] },
  { env: 'CURSOR_AGENT_BIN', option: 'cursorAgentBin', kind: 'string', default: 'cursor-agent' },
  { env: 'AGENT_COMMAND', option: 'agentCommand', kind: 'command' },
  { env: 'AGENT_AUTH_METHOD', option: 'agentAuthMethod', kind: 'string' },
  { env: 'PERMISSION_POLICY', option: 'permissionPolicy', kind: 'string', default: 'reject', enum: ['reject', 'allow', 'ask'] },
  { env: 'PERMISSION_TIMEOUT', option: 'permissionTimeout', kind: 'duration', default: '60s', min: 1 },
  { env: 'SESSION_TIMEOUT', option: 'sessionTimeout', kind: 'duration', default: '10m', min: 1 },
  { env: 'MAX_SESSION_TIMEOUT', option: 'maxSessionTimeout', kind: 'duration', default: '24h', min: 1 },
  { env: 'CLEANUP_INTERVAL', option: 'cleanupInterval', kind: 'duration', default: '1m', min: 10 },
  { env: 'KILL_GRACE', option: 'killGrace', kind: 'duration', default: '5s', min: 0 },
  { env: 'KILL_SIGNAL', option: 'killSignal', kind: 'signal', default: 'SIGTERM', enum: ['SIGTERM', 'SIGINT', 'SIGHUP', 'SIGQUIT', 'SIGUSR1', 'SIGUSR2'] },
  { env: 'ASK_TIMEOUT', option: 'askTimeout', kind: 'duration', default: '60s', min: 1 },
  { env: 'START_TIMEOUT', option: 'startTimeout', kind: 'duration', default: '60s', min: 1 },
  { env: 'AGENT_IDLE_TIMEOUT', option: 'agentIdleTimeout', kind: 'duration', default: '5m', min: 0 },
  { env: 'MAX_LIVE_AGENTS', option: 'maxLiveAgents', kind: 'string', default: 'auto', pattern: '^\\s*(auto|[1-9]\\d{0,6})\\s*$', hint: 'auto or a whole number of at least 1' },
  { env: 'STATE_DIR', option: 'stateDir', kind: 'string' },
  { env: 'EXPIRY_WARNING', option: 'expiryWarning', kind: 'duration', default: '60s', min: 0 },
  { env: 'STREAM_HEARTBEAT', option: 'streamHeartbeat', kind: 'duration', default: '15s', min: 100 },
  { env: 'STREAM_BUFFER_BYTES', option: 'streamBufferBytes', kind: 'integer', default: '1048576', min: 1024 },
  { env: 'MAX_SESSIONS', option: 'maxSessions', kind: 'integer', default: '100', min: 1 },
  { env: 'MAX_SESSIONS_PER_CLIENT', option: 'maxSessionsPerClient', kind: 'integer', default: '20', min: 1 },
  { env: 'MAX_QUESTION_BYTES', option: 'maxQuestionBytes', kind: 'integer', default: '65536', min: 1 },
  { env: 'MAX_ANSWER_BYTES', option: 'maxAnswerBytes', kind: 'integer', default: '16777216', min: 1024 },
  { env: 'BODY_LIMIT', option: 'bodyLimit', kind: 'integer', default: '1048576', min: 1024 },
  { env: 'API_TOKEN', option: 'apiToken', kind: 'string', secret: true },
  { env: 'API_TOKEN_FILE', option: 'apiTokenFile', kind: 'string', secret: true },
  // One exact value, so that a `=true` or `=1` set in passing does not open the server.
  { env: 'ALLOW_UNAUTHENTICATED_NON_LOOPBACK', option: 'allowUnauthenticatedNonLoopback', kind: 'string', enum: ['i-understand'], serverOnly: true },
  { env: 'START_RATE_LIMIT', option: 'startRateLimit', kind: 'integer', default: '30', min: 1 },
  { env: 'START_RATE_WINDOW', option: 'startRateWindow', kind: 'duration', default: '1m', min: 1 },
  // Longest a client may take to send a whole request (headers and body); answers are not limited by it.
  { env: 'RECEIVE_TIMEOUT', option: 'receiveTimeout', kind: 'duration', default: '30s', min: 100, serverOnly: true },
  { env: 'TRUST_PROXY', option: 'trustProxy', kind: 'string', serverOnly: true },
  { env: 'AGENT_MODEL', option: 'agentModel', kind: 'string' },
  { env: 'AGENT_FORCE', option: 'agentForce', kind: 'boolean', default: 'false' },
  { env: 'AGENT_TRUST', option: 'agentTrust', kind: 'boolean', default: 'true' },
  { env: 'AGENT_USER', option: 'agentUser', kind: 'string' },
  { env: 'AGENT_ENV_PASS', option: 'agentEnvPass', kind: 'list' },
  { env: 'CORS_ORIGINS', option: 'corsOrigins', kind: 'list' },
  // Clustering (off unless REDIS_URL is set): see lib/cluster/.
  { env: 'REDIS_URL', option: 'redisUrl', kind: 'string', pattern: '^\\s*rediss?://\\S+\\s*$', hint: 'a redis:// or rediss:// URL' },
  { env: 'REDIS_PREFIX', option: 'redisPrefix', kind: 'string', default: 'agent-sessions:', pattern: '^[\\w:.{}-]{1,64}$', hint: 'up to 64 letters, digits and _ : . { } -' },
  { env: 'INSTANCE_URL', option: 'instanceUrl', kind: 'string', pattern: '^\\s*https?://\\S+\\s*$', hint: 'an http:// or https:// URL the other instances can reach' },
  { env: 'INSTANCE_TTL', option: 'instanceTtl', kind: 'duration', default: '10s', min: 1000 }
] as const satisfies readonly Setting[]

export interface AgentSessionsConfig {
  port: number
  host: string
  logLevel: string
  workspaceDir: string
  /** cursor: cursor-agent in print mode, one process per turn; acp: one live ACP agent per session. */
  agentProtocol: 'cursor' | 'acp'
  cursorAgentBin: string
  /** The ACP agent's argv (AGENT_COMMAND split like a shell would, never run by one). */
  agentCommand?: string[]
  agentAuthMethod?: string
  /** reject, allow, or ask the client (PERMISSION_TIMEOUT to answer, then reject). */
  permissionPolicy: 'reject' | 'allow' | 'ask'
  permissionTimeoutMs: number
  /** A live agent whose last turn ended this long ago is stopped (the session hibernates); 0 never. */
  agentIdleTimeoutMs: number
  /** Most live agent processes at once (from the machine's memory unless set). */
  maxLiveAgents: number
  /** Where sessions and agent process records outlive the process; undefined: off. */
  stateDir?: string
  /** How long before a session expires its event-stream subscribers get `expiring`. */
  expiryWarningMs: number
  /** How often an idle event stream gets a comment line (so proxies keep it open). */
  streamHeartbeatMs: number
  /** Most bytes queued for one slow stream consumer before the stream is cut. */
  streamBufferBytes: number
  sessionTimeoutMs: number
  maxSessionTimeoutMs: number
  cleanupIntervalMs: number
  killGraceMs: number
  killSignal: NodeJS.Signals
  askTimeoutMs: number
  /** How long starting an agent may take: create-chat, or spawn + initialize + session/new (or session/load). */
  startTimeoutMs: number
  maxSessions: number
  /** Sessions one client (IP address, see trustProxy) may hold at once. */
  maxSessionsPerClient: number
  maxQuestionBytes: number
  maxAnswerBytes: number
  bodyLimit: number
  /** The bearer token, from API_TOKEN or read from API_TOKEN_FILE; undefined: no authentication. */
  apiToken?: string
  /** Where apiToken was read from, when it came from a file. */
  apiTokenFile?: string
  /** Server only: listen beyond loopback without API_TOKEN (ALLOW_UNAUTHENTICATED_NON_LOOPBACK=i-understand). */
  allowUnauthenticatedNonLoopback: boolean
  /** Session starts allowed per client (IP address) per startRateWindowMs. */
  startRateLimit: number
  startRateWindowMs: number
  /** Server only: longest a client may take to send a whole request. */
  receiveTimeoutMs: number
  /** Server only: Fastify's trustProxy: a hop count, or the addresses / CIDRs of trusted proxies; undefined: off. */
  trustProxy?: number | string[]
  agentModel?: string
  agentForce: boolean
  agentTrust: boolean
  /** The OS user every agent process runs as; undefined: the service's own user. */
  agentUser?: AgentUser
  /** Names of server environment variables passed to the agent beyond the base set. */
  agentEnvPass: string[]
  /** Browser origins allowed by CORS; `['*']` allows any; undefined leaves CORS off. */
  corsOrigins?: string[]
  /** Shared state for a cluster of instances; undefined: this instance stands alone. */
  redisUrl?: string
  /** Prefix of every Redis key (several clusters can share one Redis). */
  redisPrefix: string
  /** How the other instances reach this one; undefined: derived from HOST and the port it listens on. */
  instanceUrl?: string
  /** An instance whose liveness key is older than this is taken for dead. */
  instanceTtlMs: number
}

/** Settings as plugin options: durations as `'30s'` or milliseconds, the rest as their type. */
export interface AgentSessionsSettings {
  workspaceDir?: string
  agentProtocol?: 'cursor' | 'acp'
  cursorAgentBin?: string
  /** The ACP agent's command line, e.g. `npx @zed-industries/codex-acp` (a string, or argv as an array). */
  agentCommand?: string | readonly string[]
  agentAuthMethod?: string
  permissionPolicy?: 'reject' | 'allow' | 'ask'
  permissionTimeout?: string | number
  agentIdleTimeout?: string | number
  /** A number, or 'auto' (half the machine's memory at 256 MB per agent). */
  maxLiveAgents?: number | 'auto'
  /** A directory, or 'off'. The plugin keeps no state unless this is set; the standalone server defaults to one per port. */
  stateDir?: string
  expiryWarning?: string | number
  streamHeartbeat?: string | number
  streamBufferBytes?: number
  sessionTimeout?: string | number
  maxSessionTimeout?: string | number
  cleanupInterval?: string | number
  killGrace?: string | number
  killSignal?: NodeJS.Signals
  askTimeout?: string | number
  startTimeout?: string | number
  maxSessions?: number
  maxSessionsPerClient?: number
  maxQuestionBytes?: number
  maxAnswerBytes?: number
  bodyLimit?: number
  /** The bearer token clients must send. Present means meant: an empty or undefined value is a configuration error. */
  apiToken?: string
  /** A file holding the bearer token (a Docker or Kubernetes secret); one trailing newline is ignored. */
  apiTokenFile?: string
  startRateLimit?: number
  startRateWindow?: string | number
  agentModel?: string
  agentForce?: boolean
  agentTrust?: boolean
  /** An OS user name, or `uid[:gid]`, that every agent process runs as. */
  agentUser?: string | number
  /** Server environment variables the agent also gets (a comma-separated string or an array of names). */
  agentEnvPass?: string | readonly string[]
  /** `'*'`, or origins such as `https://app.example.com` (a comma-separated string or an array). */
  corsOrigins?: string | readonly string[]
  /** redis:// or rediss:// URL of the Redis a cluster of instances shares. */
  redisUrl?: string
  redisPrefix?: string
  /** How the other instances reach this one (default: from HOST and the listening port). */
  instanceUrl?: string
  instanceTtl?: string | number
}

/**
 * Environment variables that belong to this service: never passed on to the
 * agent. NODE_OPTIONS too: cursor-agent is a Node program, and the service's
 * own flags (--inspect, heap sizes, loaders) are not meant for it.
 */
export const SERVICE_ENV_NAMES: readonly string[] = [...SETTINGS.map((s) => s.env), 'NODE_OPTIONS']

const DURATION = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$/
const UNIT_MS = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 } as const

/** `500ms`, `30s`, `10m`, `1h` or plain milliseconds; undefined when malformed. */
export function parseDuration (value: string | number): number | undefined {
  if (typeof value === 'number') return Number.isFinite(value) && value >= 0 ? value : undefined
  const match = DURATION.exec(value)
  if (match === null) return undefined
  return Math.round(Number(match[1]) * UNIT_MS[(match[2] ?? 'ms') as keyof typeof UNIT_MS])
}

function schemaFor (setting: Setting): Record<string, unknown> {
  const base: Record<string, unknown> = { type: 'string' }
  if (setting.default !== undefined) base.default = setting.default
  if (setting.enum !== undefined) base.enum = [...setting.enum]
  if (setting.kind === 'integer') base.pattern = '^\\s*\\d+\\s*$'
  if (setting.kind === 'boolean') base.pattern = '^\\s*(?:[Tt][Rr][Uu][Ee]|[Ff][Aa][Ll][Ss][Ee]|1|0|[Yy][Ee][Ss]|[Nn][Oo])\\s*$'
  if (setting.kind === 'duration') base.pattern = DURATION.source
  if (setting.pattern !== undefined) base.pattern = setting.pattern
  return base
}

/** The JSON schema env-schema validates the merged environment against (all strings, converted after). */
export const envJsonSchema = {
  type: 'object',
  properties: Object.fromEntries(SETTINGS.map((s) => [s.env, schemaFor(s)])),
  required: [] as string[]
}

/** Plugin options rewritten as environment entries, so options win over process.env in one merge. */
export function optionsAsEnv (options: AgentSessionsSettings): Record<string, string> {
  const env: Record<string, string> = {}
  for (const setting of SETTINGS as readonly Setting[]) {
    if (setting.serverOnly === true) continue
    const value = (options as Record<string, unknown>)[setting.option]
    if (setting.secret === true && Object.hasOwn(options, setting.option)) {
      // `apiToken: process.env.SOME_TOKEN` with SOME_TOKEN unset must not silently turn authentication off.
      if (typeof value !== 'string' || value.trim() === '') {
        throw invalid(setting, 'a non-empty string when given (leave the option out for none)', value)
      }
    }
    if (value === undefined || value === null) continue
    // argv given as an array is quoted back into one command line, so it splits into the same words.
    env[setting.env] = setting.kind === 'command' && Array.isArray(value)
      ? quoteShellWords(value as string[])
      : Array.isArray(value) ? value.join(',') : String(value)
  }
  return env
}

export class ConfigError extends Error {
  constructor (message: string) {
    super(message)
    this.name = 'ConfigError'
  }
}

function settingOf (env: string): Setting {
  return (SETTINGS as readonly Setting[]).find((s) => s.env === env) as Setting
}

/** The one shape of a bad-setting message: it names the variable, the option (server-only settings have none) and what it takes. */
function invalid (setting: Setting, expected: string, got: unknown): ConfigError {
  const name = setting.serverOnly === true ? setting.env : `${setting.env} (option ${setting.option})`
  return new ConfigError(`Invalid configuration: ${name} must be ${expected}, got ${got === undefined ? 'undefined' : JSON.stringify(got)}`)
}

const HINT: Record<Kind, string> = {
  duration: 'a duration such as 500ms, 30s, 10m, 1h or plain milliseconds',
  integer: 'a whole number',
  string: 'a string',
  boolean: 'true or false',
  signal: 'a signal name',
  list: 'a comma-separated list',
  command: 'a command line'
}

/** Rewrites an env-schema / ajv failure into a message that names the variable and what it takes. */
export function describeEnvError (err: unknown, values: Record<string, unknown> = {}): ConfigError {
  const errors = (err as { errors?: Array<{ instancePath?: string, params?: { allowedValues?: unknown[] } }> }).errors
  const first = errors?.[0]
  const name = first?.instancePath?.replace(/^\//, '')
  const setting = name === undefined ? undefined : (SETTINGS as readonly Setting[]).find((s) => s.env === name)
  if (setting === undefined) return new ConfigError(`Invalid configuration: ${(err as Error).message}`)
  const expected = setting.enum !== undefined ? `one of ${setting.enum.join(', ')}` : setting.hint ?? HINT[setting.kind]
  return invalid(setting, expected, values[setting.env])
}

/** A comma-separated list, each item checked for what its setting holds. */
function checkList (setting: Setting, text: string): string[] | undefined {
  const items = text.split(',').map((item) => item.trim()).filter((item) => item !== '')
  if (items.length === 0) return undefined
  if (setting.env === 'AGENT_ENV_PASS') return checkEnvNames(setting, items)
  return checkOrigins(setting, text, items)
}

/**
 * CORS_ORIGINS: `*`, or origins exactly as browsers send them
 * (scheme://host[:port], no path), since @fastify/cors compares the Origin
 * header as a string and a typo would silently deny.
 */
function checkOrigins (setting: Setting, text: string, items: string[]): string[] {
  if (items.includes('*')) {
    if (items.length > 1) throw invalid(setting, '* alone or a list of origins', text)
    return items
  }
  for (const item of items) {
    let origin: string | undefined
    try {
      origin = new URL(item).origin
    } catch {}
    if (origin !== item) {
      throw invalid(setting, '* or origins such as https://app.example.com (scheme, host and port, no path or trailing slash)', item)
    }
  }
  return items
}

/**
 * A command line split into argv the way a shell would split it (quotes,
 * escapes), but never run through one: operators, redirections and
 * substitutions are refused instead of silently becoming arguments.
 */
function parseCommand (setting: Setting, text: string): string[] | undefined {
  const words: string[] = []
  // Variables stay as written ($HOME is passed on literally, not expanded by us).
  for (const token of parseShellWords(text, (name) => `$${name}`)) {
    if (typeof token === 'string') {
      words.push(token)
    } else if ('pattern' in token) {
      words.push(token.pattern)
    } else {
      const what = 'comment' in token ? '#' : token.op
      throw invalid(setting, `a command and its arguments (it is not run by a shell, so "${what}" cannot be used)`, text)
    }
  }
  if (words.length === 0) return undefined
  // A relative path means relative to where the server started; a bare name is looked up on PATH.
  if (words[0].includes('/')) words[0] = resolve(words[0])
  return words
}

const ENV_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/

/** AGENT_ENV_PASS: variable names; the service's own settings never reach the agent, whatever is listed. */
function checkEnvNames (setting: Setting, items: string[]): string[] {
  for (const item of items) {
    if (!ENV_NAME.test(item)) throw invalid(setting, 'a comma-separated list of environment variable names', item)
    if (SERVICE_ENV_NAMES.includes(item)) {
      throw invalid(setting, 'names of variables for the agent, not the service\'s own settings', item)
    }
  }
  return items
}

/**
 * TRUST_PROXY: a hop count, or the addresses / CIDRs of the proxies whose
 * X-Forwarded-For is believed (also proxy-addr's names loopback, linklocal,
 * uniquelocal). `true` (believe anyone) is refused: any client could then
 * pick its own address and escape the per-client limits.
 */
function checkTrustProxy (setting: Setting, text: string): number | string[] {
  if (/^\d+$/.test(text)) {
    const hops = Number(text)
    if (hops < 1 || hops > 100) throw invalid(setting, 'a hop count from 1 to 100, or proxy addresses', text)
    return hops
  }
  const items = text.split(',').map((item) => item.trim()).filter((item) => item !== '')
  for (const item of items) {
    if (['loopback', 'linklocal', 'uniquelocal'].includes(item)) continue
    const [address, bits, extra] = item.split('/')
    const family = isIP(address)
    const maxBits = family === 4 ? 32 : 128
    const goodBits = bits === undefined || (/^\d+$/.test(bits) && Number(bits) <= maxBits)
    if (family === 0 || !goodBits || extra !== undefined) {
      throw invalid(setting, 'a hop count, or a comma-separated list of proxy addresses or CIDRs (10.0.0.0/8, ::1)', item)
    }
  }
  if (items.length === 0) throw invalid(setting, 'a hop count, or a comma-separated list of proxy addresses or CIDRs', text)
  return items
}

/** The bearer token: no whitespace inside, since clients could never send it in an Authorization header. */
function checkToken (setting: Setting, token: string, shown: string): string {
  if (token === '') throw invalid(setting, 'a non-empty token (unset it for none)', shown)
  if (/\s/.test(token)) throw invalid(setting, 'a token without whitespace', shown)
  return token
}

/** Reads API_TOKEN_FILE: the whole file, less one trailing newline (what `echo` and most secret stores add). */
function readTokenFile (setting: Setting, path: string): string {
  let text: string
  try {
    text = readFileSync(path, 'utf8')
  } catch (err) {
    throw invalid(setting, `a readable file holding the token (${(err as NodeJS.ErrnoException).code ?? String(err)})`, path)
  }
  const token = text.replace(/\r?\n$/, '')
  if (token.trim() === '') throw invalid(setting, 'a file holding the token (it is empty)', path)
  return checkToken(setting, token, path)
}

/** Converts the validated string values into the typed config, checking ranges and cross-field rules. */
export function resolveConfig (env: Record<string, unknown>): AgentSessionsConfig {
  const values: Record<string, unknown> = {}
  for (const setting of SETTINGS as readonly Setting[]) {
    const raw = env[setting.env]
    if (setting.secret === true && raw !== undefined && String(raw).trim() === '') {
      // API_TOKEN= (say, from an unset variable in a compose file) must not silently turn authentication off.
      throw invalid(setting, 'non-empty when set (unset it for none)', raw)
    }
    if (raw === undefined || raw === '') continue
    const text = String(raw).trim()
    let value: unknown = text
    if (setting.kind === 'duration' || setting.kind === 'integer') {
      const n = setting.kind === 'duration' ? parseDuration(text) : Number(text)
      if (n === undefined || !Number.isSafeInteger(n)) {
        throw invalid(setting, HINT[setting.kind], raw)
      }
      if ((setting.min !== undefined && n < setting.min) || (setting.max !== undefined && n > setting.max)) {
        const range = setting.max === undefined ? `at least ${setting.min}` : `between ${setting.min} and ${setting.max}`
        throw invalid(setting, `${range}${setting.kind === 'duration' ? ' ms' : ''}`, raw)
      }
      value = n
    } else if (setting.kind === 'boolean') {
      value = /^(true|1|yes)$/i.test(text)
    } else if (setting.kind === 'list') {
      value = checkList(setting, text)
    } else if (setting.kind === 'command') {
      value = parseCommand(setting, text)
    } else if (setting.env === 'TRUST_PROXY') {
      value = checkTrustProxy(setting, text)
    }
    values[setting.option] = value
  }

  const workspaceDir = resolve(String(values.workspaceDir ?? process.cwd()))
  let isDir = false
  try {
    isDir = statSync(workspaceDir).isDirectory()
  } catch {}
  if (!isDir) {
    throw invalid(settingOf('WORKSPACE_DIR'), 'an existing directory', workspaceDir)
  }

  if (values.apiToken !== undefined && values.apiTokenFile !== undefined) {
    throw new ConfigError('Invalid configuration: API_TOKEN (option apiToken) and API_TOKEN_FILE (option apiTokenFile) are both set: set one of them')
  }
  const apiToken = values.apiTokenFile !== undefined
    ? readTokenFile(settingOf('API_TOKEN_FILE'), resolve(values.apiTokenFile as string))
    : values.apiToken === undefined ? undefined : checkToken(settingOf('API_TOKEN'), values.apiToken as string, '<hidden>')

  const agentUser = values.agentUser === undefined ? undefined : checkAgentUser(values.agentUser as string, workspaceDir)

  const config: AgentSessionsConfig = {
    port: values.port as number,
    host: values.host as string,
    logLevel: values.logLevel as string,
    workspaceDir,
    // A relative path means relative to where the server started, not to
    // WORKSPACE_DIR (the agent's cwd); a bare name is looked up on PATH.
    agentProtocol: values.agentProtocol as 'cursor' | 'acp',
    cursorAgentBin: (values.cursorAgentBin as string).includes('/') ? resolve(values.cursorAgentBin as string) : values.cursorAgentBin as string,
    agentCommand: values.agentCommand as string[] | undefined,
    agentAuthMethod: values.agentAuthMethod as string | undefined,
    permissionPolicy: values.permissionPolicy as 'reject' | 'allow' | 'ask',
    permissionTimeoutMs: values.permissionTimeout as number,
    agentIdleTimeoutMs: values.agentIdleTimeout as number,
    maxLiveAgents: values.maxLiveAgents === 'auto' ? defaultMaxLiveAgents() : Number(values.maxLiveAgents),
    stateDir: values.stateDir === undefined || values.stateDir === 'off' ? undefined : resolve(values.stateDir as string),
    expiryWarningMs: values.expiryWarning as number,
    streamHeartbeatMs: values.streamHeartbeat as number,
    streamBufferBytes: values.streamBufferBytes as number,
    sessionTimeoutMs: values.sessionTimeout as number,
    maxSessionTimeoutMs: values.maxSessionTimeout as number,
    cleanupIntervalMs: values.cleanupInterval as number,
    killGraceMs: values.killGrace as number,
    killSignal: values.killSignal as NodeJS.Signals,
    askTimeoutMs: values.askTimeout as number,
    startTimeoutMs: values.startTimeout as number,
    maxSessions: values.maxSessions as number,
    maxSessionsPerClient: values.maxSessionsPerClient as number,
    maxQuestionBytes: values.maxQuestionBytes as number,
    maxAnswerBytes: values.maxAnswerBytes as number,
    bodyLimit: values.bodyLimit as number,
    apiToken,
    apiTokenFile: values.apiTokenFile === undefined ? undefined : resolve(values.apiTokenFile as string),
    allowUnauthenticatedNonLoopback: values.allowUnauthenticatedNonLoopback === 'i-understand',
    startRateLimit: values.startRateLimit as number,
    startRateWindowMs: values.startRateWindow as number,
    receiveTimeoutMs: values.receiveTimeout as number,
    trustProxy: values.trustProxy as number | string[] | undefined,
    agentModel: values.agentModel as string | undefined,
    agentForce: values.agentForce as boolean,
    agentTrust: values.agentTrust as boolean,
    agentUser,
    agentEnvPass: (values.agentEnvPass as string[] | undefined) ?? [],
    corsOrigins: values.corsOrigins as string[] | undefined,
    redisUrl: values.redisUrl as string | undefined,
    redisPrefix: values.redisPrefix as string,
    instanceUrl: values.instanceUrl === undefined ? undefined : (values.instanceUrl as string).replace(/\/+$/, ''),
    instanceTtlMs: values.instanceTtl as number
  }
  if (config.agentProtocol === 'acp' && config.agentCommand === undefined) {
    throw invalid(settingOf('AGENT_COMMAND'), 'the ACP agent\'s command line when AGENT_PROTOCOL=acp (e.g. "npx @zed-industries/codex-acp")', undefined)
  }
  if (config.sessionTimeoutMs > config.maxSessionTimeoutMs) {
    throw new ConfigError('Invalid configuration: SESSION_TIMEOUT must not exceed MAX_SESSION_TIMEOUT')
  }
  return config
}

/** What an idle live agent is assumed to cost when MAX_LIVE_AGENTS is not set (agents measured here: 60-300 MB). */
export const ASSUMED_AGENT_BYTES = 256 * 1024 * 1024

/** MAX_LIVE_AGENTS=auto: half the machine's memory, at ASSUMED_AGENT_BYTES per live agent, at least one. */
export function defaultMaxLiveAgents (): number {
  return Math.max(1, Math.floor(totalmem() / 2 / ASSUMED_AGENT_BYTES))
}

/**
 * AGENT_USER: who it is, and whether this service can run processes as that
 * user, signal their groups, and whether that user can use WORKSPACE_DIR.
 * Each failure stops start-up: silently running the agent as the service's own
 * user would hand it the service's secrets.
 */
function checkAgentUser (spec: string, workspaceDir: string): AgentUser {
  let user: AgentUser
  try {
    user = resolveAgentUser(spec)
  } catch (err) {
    throw invalid(settingOf('AGENT_USER'), `a user name or uid[:gid] of another user than the service's (${(err as Error).message})`, spec)
  }
  const cannotSwitch = switchUserProblem(user)
  if (cannotSwitch !== undefined) {
    throw new ConfigError(`Invalid configuration: AGENT_USER=${spec} (option agentUser): ${cannotSwitch}. ` +
      'Run the service as root, or grant it the SETUID, SETGID and KILL capabilities, or unset AGENT_USER ' +
      '(the container image: keep those three capabilities and allow privilege escalation, as the README\'s Container image section says).')
  }
  const leak = capabilityLeakProblem(user)
  if (leak !== undefined) {
    throw new ConfigError(`Invalid configuration: AGENT_USER=${spec} (option agentUser): ${leak}.`)
  }
  const cannotEnter = workspaceAccessProblem(user, workspaceDir)
  if (cannotEnter !== undefined) {
    throw new ConfigError(`Invalid configuration: WORKSPACE_DIR (option workspaceDir) must be a directory AGENT_USER ${describeUser(user)} ` +
      `can enter and list: ${cannotEnter}`)
  }
  return user
}

function describeUser (user: AgentUser): string {
  return `${user.name ?? user.uid} (uid ${user.uid}, gid ${user.gid})`
}

/** 127.0.0.0/8, ::1 (also as an IPv4-mapped address) and localhost: reachable from this machine only. */
export function isLoopbackHost (host: string): boolean {
  const h = host.trim().toLowerCase().replace(/^\[(.*)\]$/, '$1').replace(/\.$/, '')
  if (h === 'localhost' || h.endsWith('.localhost')) return true
  if (isIPv4(h)) return h.startsWith('127.')
  if (isIPv6(h)) {
    if (h === '::1' || h === '0:0:0:0:0:0:0:1') return true
    const mapped = /^(?:0{0,4}:){0,5}:?ffff:(\d+\.\d+\.\d+\.\d+)$/.exec(h)
    return mapped !== null && isIPv4(mapped[1]) && mapped[1].startsWith('127.')
  }
  return false
}

/**
 * Why the standalone server must not listen as configured, or undefined. The
 * agent edits files and runs commands: an API reachable from other machines
 * without a token hands that to anyone on the network.
 */
export function exposureError (config: Pick<AgentSessionsConfig, 'host' | 'apiToken' | 'allowUnauthenticatedNonLoopback'>): ConfigError | undefined {
  if (isLoopbackHost(config.host) || (config.apiToken ?? '') !== '' || config.allowUnauthenticatedNonLoopback) return undefined
  return new ConfigError(`Refusing to listen on HOST=${config.host} without API_TOKEN: anyone who can reach this address ` +
    'could make the agent read and edit the workspace and run commands. Set API_TOKEN (clients then send ' +
    '"Authorization: Bearer <token>"), or listen on a loopback address (HOST=127.0.0.1), or, if another layer ' +
    'authenticates every request, set ALLOW_UNAUTHENTICATED_NON_LOOPBACK=i-understand.')
}
