#!/bin/sh
# The image's command runs through this check (tini -> this -> setpriv -> node,
# each an exec, no process left in between). The service's node carries SETUID, SETGID and
# KILL as file capabilities (to run the agent as its own user); when the
# container's bounding set lacks one of them (--cap-drop ALL without the
# matching --cap-add, Kubernetes' capabilities.drop [ALL] without add), the
# kernel refuses to execute it with a bare EPERM. Say why instead.
set -eu
case "${1:-}" in
  /usr/local/bin/node|node)
    bnd=$(sed -n 's/^CapBnd:[[:space:]]*//p' /proc/self/status)
    missing=
    [ $((0x$bnd >> 7 & 1)) -eq 1 ] || missing="$missing SETUID"
    [ $((0x$bnd >> 6 & 1)) -eq 1 ] || missing="$missing SETGID"
    [ $((0x$bnd >> 5 & 1)) -eq 1 ] || missing="$missing KILL"
    if [ -n "$missing" ]; then
      echo "fastify-agent-sessions: the container lacks the capabilities$missing (CapBnd $bnd)." \
        "The service runs as user node and needs SETUID, SETGID and KILL to run the agent as its own user (AGENT_USER=agent):" \
        "its node carries them as file capabilities, and the kernel will not start it without them." \
        "Keep them: --cap-drop ALL --cap-add SETUID --cap-add SETGID --cap-add KILL (docker, podman)," \
        "or securityContext.capabilities: { drop: [ALL], add: [SETUID, SETGID, KILL] } (Kubernetes)." >&2
      exit 1
    fi
    # podman's --cap-add hands a non-root user the added capabilities as
    # inheritable and ambient ones too. Executing node (file capabilities)
    # clears the ambient set but keeps the inheritable one, which every agent
    # would carry: with it, a program with inheritable file capabilities (a
    # prepared file in a bind-mounted workspace) would grant them to the
    # agent. Neither set is needed: drop both, as under Docker and Kubernetes.
    exec setpriv --inh-caps=-all --ambient-caps=-all -- "$@"
    ;;
esac
exec "$@"
