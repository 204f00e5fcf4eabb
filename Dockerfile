# syntax=docker/dockerfile:1
# fastify-agent-sessions: the standalone server with cursor-agent installed.
#   docker build -t fastify-agent-sessions .
#   docker run --rm -p 3000:3000 -v "$PWD":/workspace -e CURSOR_API_KEY -e API_TOKEN fastify-agent-sessions

ARG NODE_VERSION=20

# Build: every dependency (TypeScript is a devDependency), then compile to dist/.
FROM node:${NODE_VERSION}-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json app.ts server.ts ./
COPY lib ./lib
COPY plugins ./plugins
COPY routes ./routes
RUN npx tsc -p tsconfig.build.json

# Production dependencies only, from the lockfile; none needs an install script.
FROM node:${NODE_VERSION}-bookworm-slim AS deps
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --ignore-scripts --no-audit --no-fund && npm cache clean --force

FROM node:${NODE_VERSION}-bookworm-slim AS runtime
# tini as PID 1: forwards SIGTERM to node and reaps the agent's orphaned
# children. curl and ca-certificates for Cursor's installer; git because the
# agent reads and edits repositories.
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini ca-certificates curl git \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /workspace && chown node:node /workspace

# The installer puts cursor-agent in ~/.local/bin of the user who runs it.
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=3000 \
    WORKSPACE_DIR=/workspace \
    PATH=/home/node/.local/bin:$PATH

USER node
# pipefail: a failed download must fail the build, not pipe nothing into bash.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN curl https://cursor.com/install -fsS | bash && cursor-agent --version

WORKDIR /app
# Owned by root and read-only to the node user: the agent runs shell commands
# as node, and must not be able to rewrite the service.
COPY package.json ./
COPY --from=deps /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist

EXPOSE 3000
VOLUME ["/workspace"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.PORT || 3000) + '/api/health').then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["node", "dist/server.js"]
