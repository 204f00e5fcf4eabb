#!/usr/bin/env bash
# Runs the image built by build.sh with podman, the way the README says to run
# it anywhere: named volumes for /workspace, /state and /home/agent, the API
# token from a file only the service's user reads (API_TOKEN_FILE), no
# capability but SETUID, SETGID and KILL (the service runs the agent as its
# own user), a stop timeout above the server's graceful-close limit.
#
#   scripts/image/run.sh [--port 3000] [--token-file FILE] [--name NAME] [-- podman run options...]
#
# Environment: IMAGE (default localhost/fastify-agent-sessions:dev),
# CURSOR_API_KEY (passed to the agent when set). Host networking: the server
# listens on 127.0.0.1:PORT of this machine. Stop it with `podman stop NAME`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/engine.sh"

image=${IMAGE:-localhost/fastify-agent-sessions:dev}
port=3000
name=fastify-agent-sessions
token_file=
while [ $# -gt 0 ]; do
  case "$1" in
    --port) port=$2; shift 2 ;;
    --token-file) token_file=$2; shift 2 ;;
    --name) name=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

ensure_engine
podman image exists "$image" || die "no image $image: run scripts/image/build.sh first"

args=(--detach --name "$name" --network host
  --env HOST=127.0.0.1 --env "PORT=$port"
  --volume "$name-workspace:/workspace" --volume "$name-state:/state" --volume "$name-agent-home:/home/agent"
  --cap-drop ALL --cap-add SETUID,SETGID,KILL
  # Above KILL_GRACE + 5 s, the server's own limit for a graceful close.
  --stop-timeout 30)
if [ -n "$token_file" ]; then
  [ -r "$token_file" ] || die "cannot read $token_file"
  # Mounted as it is: the service (uid 1000) must read it, the agent (1001) must not.
  [ "$(stat -c '%u %a' "$token_file")" = '1000 400' ] || die "$token_file: give it to uid 1000, mode 0400 (chown 1000 $token_file && chmod 0400 $token_file)"
  args+=(--volume "$(realpath "$token_file"):/run/secrets/api-token:ro" --env API_TOKEN_FILE=/run/secrets/api-token)
fi
[ -n "${CURSOR_API_KEY:-}" ] && args+=(--env CURSOR_API_KEY)

podman run "${args[@]}" "$@" "$image"
log "started $name on http://127.0.0.1:$port (podman logs -f $name; podman stop $name)"
