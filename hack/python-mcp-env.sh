#!/usr/bin/env bash
# Prepares (idempotently, cached under target/) a Python venv holding the official MCP Python SDK, which the
# bridge tests drive as a real client, and `uv` (its wheel ships the `uv` and `uvx` binaries into the venv's
# bin/), which PyPI servers run with locally (demo, local machines). Prints the venv's python path on stdout;
# `uvx` is beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
MCP_VERSION="${MCP_PY_VERSION:-2.3.0}"   # the first release whose default client mode speaks 2026-07-28
UV_VERSION="${UV_VERSION:-0.13.9}"
venv="target/py-mcp-${MCP_VERSION}"
py="${PYTHON:-python3}"
command -v "$py" >/dev/null || { echo "missing prerequisite: python3 (3.10 or newer, with venv and pip)" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import mcp" 2>/dev/null; then
  rm -rf "$venv"
  "$py" -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "mcp==${MCP_VERSION}" >&2
fi
# Separately, so a venv cached before uv was added gains it without a rebuild.
if [ ! -x "$venv/bin/uvx" ] || [ "$("$venv/bin/uv" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==${UV_VERSION}" >&2
fi
echo "$(pwd)/$venv/bin/python"
