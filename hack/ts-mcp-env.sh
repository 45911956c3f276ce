#!/usr/bin/env bash
# Prepares (idempotently, cached under target/ by version) a node_modules holding both official TypeScript MCP
# clients, which the bridge tests drive as real clients: `@modelcontextprotocol/sdk` (1.x, handshake era) and
# `@modelcontextprotocol/client` (2.x, whose auto mode picks 2026-07-28). Prints the directory that holds
# node_modules on stdout; a test script placed there (or run with NODE_PATH=<dir>/node_modules) imports both.
set -euo pipefail
cd "$(dirname "$0")/.."
SDK_VERSION="${MCP_TS_SDK_VERSION:-1.32.2}"
CLIENT_VERSION="${MCP_TS_CLIENT_VERSION:-2.4.0}"
dir="target/ts-mcp-${SDK_VERSION}-${CLIENT_VERSION}"
command -v node >/dev/null || { echo "missing prerequisite: node (20 or newer) and npm" >&2; exit 1; }
major="$(node -p 'process.versions.node.split(".")[0]')"
[ "$major" -ge 20 ] || { echo "node $major is too old: @modelcontextprotocol/client needs node 20 or newer" >&2; exit 1; }
if [ ! -f "$dir/.installed" ]; then
  rm -rf "$dir"
  mkdir -p "$dir"
  printf '{"name":"mcpfly-ts-clients","private":true,"type":"module"}\n' >"$dir/package.json"
  (cd "$dir" && npm install --silent --no-audit --no-fund --save-exact \
    "@modelcontextprotocol/sdk@${SDK_VERSION}" "@modelcontextprotocol/client@${CLIENT_VERSION}" >&2)
  touch "$dir/.installed"
fi
echo "$(pwd)/$dir"
