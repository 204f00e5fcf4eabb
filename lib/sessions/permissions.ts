// What the service answers when an agent asks for permission to run a tool,
// by PERMISSION_POLICY: reject (the default, pick a reject option) or allow
// (pick an allow-once option). Options are chosen by their ACP kind.

import type { PermissionDecision, PermissionOption } from '../agents/types.js'

export type PermissionPolicy = 'reject' | 'allow'

const PREFERENCE: Record<PermissionPolicy, readonly string[]> = {
  // Once before always: a rule the agent would remember outlives this answer.
  reject: ['reject_once', 'reject_always'],
  allow: ['allow_once', 'allow_always']
}

/** The decision a policy makes for these options; `cancelled` when none fits. */
export function decideByPolicy (policy: PermissionPolicy, options: readonly PermissionOption[]): PermissionDecision {
  for (const kind of PREFERENCE[policy]) {
    const option = options.find((o) => o.kind === kind)
    if (option !== undefined) return { outcome: 'selected', optionId: option.optionId }
  }
  return { outcome: 'cancelled' }
}
