// The environment an agent process starts with.

/**
 * The environment an agent process gets: the server's own, less the service's
 * settings and secrets (API_TOKEN must never reach a process that runs shell
 * commands), plus what the operator adds explicitly.
 */
export function agentEnvironment (base: NodeJS.ProcessEnv, withhold: readonly string[], extra: Record<string, string> = {}): Record<string, string | undefined> {
  const env: Record<string, string | undefined> = {}
  const hidden = new Set(withhold)
  for (const [key, value] of Object.entries(base)) {
    if (!hidden.has(key) && value !== undefined) env[key] = value
  }
  return { ...env, ...extra }
}

