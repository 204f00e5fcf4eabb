# fastify-agent-sessions: the standalone server and a coding agent in one image.
#
#   docker build -t fastify-agent-sessions .                       (Cursor's agent, pinned)
#   docker build --build-arg AGENT_INSTALL=simulator -t fastify-agent-sessions .
#   podman build --format docker ...                                (podman's default OCI format drops HEALTHCHECK and SHELL)
#   scripts/image/build.sh                                          (offline, on a machine without Docker Hub)
#
# Run it as the README's "Container image" section says: named volumes for
# /workspace, /state and /home/agent, the token as a secret file
# (API_TOKEN_FILE), the capabilities SETUID, SETGID and KILL kept (the
# service needs them to run the agent as its own user), a stop timeout of
# 30 s (Docker's 10 s equals the server's own graceful-close limit, KILL_GRACE + 5 s).

ARG NODE_VERSION=26
ARG NODE_IMAGE=node:${NODE_VERSION}-bookworm-slim
ARG DEBIAN_IMAGE=debian:bookworm-slim

# Build: every dependency (TypeScript is a devDependency), then compile to dist/
# without source maps or declarations (those ship in the npm package only).
FROM ${NODE_IMAGE} AS build
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json app.ts server.ts ./
COPY lib ./lib
COPY plugins ./plugins
COPY routes ./routes
RUN npx tsc -p tsconfig.build.json --sourceMap false --declaration false \
 && chmod -R u=rwX,g=rX,o= dist

# Production dependencies only, from the lockfile; none needs an install script.
# Type declarations and source maps are never loaded at run time.
FROM ${NODE_IMAGE} AS deps
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund \
 && find node_modules -type f \( -name '*.d.ts' -o -name '*.d.mts' -o -name '*.d.cts' -o -name '*.map' \) -delete \
 && chmod -R u=rwX,g=rX,o= node_modules

# The agent, in a stage of its own: its download tools never reach the
# runtime image, and nothing above invalidates the download.
#   AGENT_INSTALL=cursor               Cursor's agent CLI at CURSOR_VERSION, checked against CURSOR_SHA256
#                                      (the package Cursor's installer fetches; the default pin is the
#                                      linux x64 build, pass both arguments for another version or arm64)
#   AGENT_INSTALL=npm:<pkg>@<version>  an ACP agent from the npm registry, exact version
#   AGENT_INSTALL=simulator            the bundled cursor-agent simulator (tests, trying it out)
# Every entry point lands in /opt/agent/bin, which is on PATH. Cursor's CLI
# runs on the Node build its package bundles; an npm agent and the simulator
# get a Node of their own (/opt/agent/bin/node): the service's node carries
# file capabilities, so the agent's user must never execute it (see below).
# The simulator keeps its chats under the agent's HOME, as cursor-agent does
# (~/.cursor), so a volume there keeps them across restarts.
FROM ${NODE_IMAGE} AS agent
SHELL ["/bin/bash", "-o", "pipefail", "-euc"]
ARG AGENT_INSTALL=cursor
ARG CURSOR_VERSION=2026.06.26-7079533
ARG CURSOR_SHA256=7d93655a474f42c2b5d927e62a61be56bc560380dfeec005409e43493a2af848
COPY test/fixtures/fake-cursor-agent.mjs /tmp/simulator.mjs
RUN mkdir -p /opt/agent/bin; \
    case "$AGENT_INSTALL" in \
      cursor) \
        [[ -n "$CURSOR_VERSION" && "$CURSOR_SHA256" =~ ^[0-9a-f]{64}$ ]] \
          || { echo "AGENT_INSTALL=cursor needs CURSOR_VERSION and CURSOR_SHA256 (64 hex digits)" >&2; exit 1; }; \
        arch=$(dpkg --print-architecture); [[ $arch == amd64 ]] && arch=x64; \
        apt-get update; apt-get install -y --no-install-recommends curl ca-certificates; \
        curl -fsSL -o /tmp/cursor.tgz "https://downloads.cursor.com/lab/${CURSOR_VERSION}/linux/${arch}/agent-cli-package.tar.gz"; \
        echo "${CURSOR_SHA256}  /tmp/cursor.tgz" | sha256sum --check --strict -; \
        mkdir /opt/agent/cursor; tar --strip-components=1 --no-same-owner -xzf /tmp/cursor.tgz -C /opt/agent/cursor; \
        ln -s ../cursor/cursor-agent /opt/agent/bin/cursor-agent; ln -s ../cursor/cursor-agent /opt/agent/bin/agent ;; \
      npm:*) \
        [[ "${AGENT_INSTALL#npm:}" =~ ^(@[a-z0-9._-]+/)?[a-z0-9._-]+@[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$ ]] \
          || { echo "AGENT_INSTALL=npm:<package>@<version> needs an exact version; got '$AGENT_INSTALL'" >&2; exit 1; }; \
        mkdir /opt/agent/npm; cd /opt/agent/npm; echo '{"private":true}' > package.json; \
        npm install --omit=dev --no-audit --no-fund --no-package-lock "${AGENT_INSTALL#npm:}"; \
        for bin in /opt/agent/npm/node_modules/.bin/*; do ln -s "../npm/node_modules/.bin/${bin##*/}" /opt/agent/bin/; done; \
        install -m 0755 /usr/local/bin/node /opt/agent/bin/node ;; \
      simulator) \
        install -m 0755 /tmp/simulator.mjs /opt/agent/simulator.mjs; install -m 0755 /usr/local/bin/node /opt/agent/bin/node; \
        printf '%s\n' '#!/bin/sh' \
          'export FAKE_AGENT_STATE_DIR="${FAKE_AGENT_STATE_DIR:-${HOME:-/tmp}/.fake-cursor-agent}"' \
          'exec /opt/agent/bin/node /opt/agent/simulator.mjs "$@"' > /opt/agent/bin/cursor-agent; \
        chmod 0755 /opt/agent/bin/cursor-agent ;; \
      *) \
        echo "AGENT_INSTALL must be cursor, npm:<package>@<exact version> or simulator; got '$AGENT_INSTALL'" >&2; exit 1 ;; \
    esac; \
    chmod -R go-w /opt/agent; \
    ls -l /opt/agent/bin

FROM ${NODE_IMAGE} AS node

FROM ${DEBIAN_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-euc"]
# tini as PID 1: forwards SIGTERM to node and reaps the agents' orphans.
# libatomic1: Node 25 and later need it. ca-certificates: the agent's HTTPS.
# git: the agent reads and edits repositories. libcap2-bin: setcap (below).
# Users: node (1000) runs the service; agent (1001) runs every agent process
# (AGENT_USER). The application is root's and read-only to node, unreadable
# to agent; /workspace is the agent's (node, in group agent, manages it);
# /state is the service's alone; /home/agent is the agent's HOME (its login
# and its own conversation storage).
# No setuid or setgid programs: an agent running one (su, mount, passwd, ...)
# would run code as root with the capabilities the container keeps.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libatomic1 ca-certificates git libcap2-bin \
 && apt-get clean && rm -rf /var/lib/apt/lists/* /var/log/apt /var/log/dpkg.log \
 && groupadd --gid 1000 node && useradd --uid 1000 --gid node --shell /usr/sbin/nologin --create-home node \
 && groupadd --gid 1001 agent && useradd --uid 1001 --gid agent --shell /bin/bash --create-home agent \
 && usermod --append --groups agent node \
 && chmod 0750 /home/node /home/agent \
 && install -d -o root -g node -m 0750 /app \
 && install -d -o agent -g agent -m 2770 /workspace \
 && install -d -o node -g node -m 0700 /state \
 && find / -xdev -type f -perm /6000 -exec chmod ug-s {} +
# The service's node carries SETUID, SETGID and KILL as file capabilities: a
# non-root service gets them when it starts (to run agents as AGENT_USER and
# signal their process groups); the agents it starts hold none (a non-root
# exec() of a program without file capabilities keeps only ambient ones,
# which exec()ing this node has cleared, and the service refuses to hold).
# Any user who executes this file gains them, so it is 0750 root:node: the
# agent's user cannot execute (or read) it. Copied and marked in one step, so
# the image holds one copy of it.
RUN --mount=type=bind,from=node,source=/usr/local/bin/node,target=/tmp/node \
    install -o root -g node -m 0750 /tmp/node /usr/local/bin/node \
 && setcap cap_setuid,cap_setgid,cap_kill=ep /usr/local/bin/node \
 && [ "$(getcap /usr/local/bin/node)" = '/usr/local/bin/node cap_kill,cap_setgid,cap_setuid=ep' ]
COPY --from=agent /opt/agent /opt/agent
# WORKDIR exists already (root's): BuildKit would create a missing one owned by the current user.
WORKDIR /app
COPY --chown=root:node package.json ./
COPY --chown=root:node --from=deps /src/node_modules ./node_modules
COPY --chown=root:node --from=build /src/dist ./dist
COPY --chown=root:node --chmod=0750 scripts/image/healthcheck.mjs scripts/image/start.sh ./
# What the agent could gain from the image: no setuid or setgid file, and no
# file capabilities but the service's node's (the agent stage included).
RUN [ -z "$(find / -xdev -type f -perm /6000)" ] \
 && [ "$(find / -xdev -type f -print0 | xargs -0 getcap)" = '/usr/local/bin/node cap_kill,cap_setgid,cap_setuid=ep' ]

# The agent's PATH is the service's: /opt/agent/bin (with the agent's own
# node, when it has one) comes first; the service's node is named by its path.
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=3000 \
    WORKSPACE_DIR=/workspace \
    STATE_DIR=/state \
    AGENT_USER=agent \
    PATH=/opt/agent/bin:$PATH

USER node
EXPOSE 3000
# Readiness at the address the server listens on (HOST, PORT): unhealthy while
# the agent does not answer or the server shuts down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/node", "/app/healthcheck.mjs"]
# start.sh says why when the container lacks SETUID, SETGID or KILL (the kernel
# would refuse to run the service's node with a bare EPERM), then execs the command.
ENTRYPOINT ["/usr/bin/tini", "--", "/app/start.sh"]
CMD ["/usr/local/bin/node", "dist/server.js"]
