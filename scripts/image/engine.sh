# Sourced by the image scripts: a container engine that works on a Debian
# host without Docker Hub or a Docker daemon (rootful podman with runc, its
# configuration private to this project). Installs podman, runc and mmdebstrap
# with apt-get when they are missing.

IMAGE_SCRIPTS=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT_ROOT=$(cd "$IMAGE_SCRIPTS/../.." && pwd)
export CONTAINERS_CONF="$IMAGE_SCRIPTS/containers.conf"

log () { printf '[image] %s\n' "$*" >&2; }
die () { log "error: $*"; exit 1; }

# Exit status 3 means "no engine can be had here" (the image test skips on it).
ensure_engine () {
  local missing=()
  command -v podman >/dev/null || missing+=(podman)
  command -v runc >/dev/null || missing+=(runc)
  command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "missing ${missing[*]} and cannot install them (needs root and apt-get)"
    exit 3
  fi
  log "installing ${missing[*]} with apt-get"
  if ! { DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >&2; then
    log "apt-get could not install ${missing[*]}"
    exit 3
  fi
}
