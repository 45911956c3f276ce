#!/usr/bin/env bash
# The bridge benchmark (BENCHMARKS.md): mcpfly bridge against supergateway 4.0 (npm) and mcp-proxy 0.13 (PyPI)
# and a no-child floor, side by side, interleaved over rounds, with a fast child (`mcpfly example-server`) and a
# slow-starting one (a Python SDK server). Installs the peers under target/bench-peers (once), builds the release
# binaries, then runs bridge-bench; arguments go to it (`--help` lists them; `--smoke` is a one-minute check of
# the harness, not figures). The report lands in target/bench/bridge-<time>/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
peers=target/bench-peers
mkdir -p "$peers/npm"
if [ ! -f "$peers/npm/node_modules/supergateway/dist/index.js" ]; then
  npm install --prefix "$peers/npm" --no-audit --no-fund --loglevel=error supergateway@4.0.0 >&2
fi
if [ ! -x "$peers/venv/bin/mcp-proxy" ]; then
  python3 -m venv "$peers/venv"
  # mcp-proxy brings the official Python MCP SDK, which the slow-starting child uses too.
  "$peers/venv/bin/pip" install --quiet --disable-pip-version-check 'mcp-proxy==0.13.0'
fi
# One cargo invocation: built one package at a time, the shared dependencies get different feature sets and are
# compiled twice (a cold release build here takes tens of minutes).
cargo build --release --locked -p mcpfly -p mcpfly-bridge-bench
exec target/release/bridge-bench \
  --mcpfly target/release/mcpfly \
  --supergateway-js "$peers/npm/node_modules/supergateway/dist/index.js" \
  --mcp-proxy "$peers/venv/bin/mcp-proxy" \
  --python "$peers/venv/bin/python" \
  --slow-server bench/bridge/slow_server.py \
  "$@"
