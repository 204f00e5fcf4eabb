#!/bin/sh
# Installs the real ACP agents used by the end-to-end tests and the benchmarks
# (codex-acp, gemini-cli; pinned in test/agents/package-lock.json) into
# test/agents/node_modules, apart from the package's own dependencies.
# Idempotent: runs `npm ci` only when node_modules is missing or was installed
# from another lockfile. Install scripts are skipped: both agents ship ready to
# run (codex-acp's binary comes as a platform package), and the optional native
# add-ons whose scripts would compile or download are not needed over stdio.
set -eu

dir=$(cd "$(dirname "$0")" && pwd)
stamp="$dir/node_modules/.installed-lock.sha256"
want=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)

ready() {
  [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
    ls "$dir"/node_modules/@zed-industries/codex-acp-*/bin/codex-acp >/dev/null 2>&1 &&
    [ -f "$dir/node_modules/@google/gemini-cli/bundle/gemini.js" ]
}

if ready; then
  echo "test/agents: up to date"
  exit 0
fi

npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund
echo "$want" > "$stamp"
ready || { echo "test/agents: install finished but an agent is missing" >&2; exit 1; }
echo "test/agents: installed"
