#!/usr/bin/env bash
# The whole test suite, from a fresh machine: builds (or reuses from the cache) the real control-plane binaries
# from their published Go modules, prints their versions, runs every Rust test in the workspace, then builds
# both images and runs them as containers (hack/image-check.sh; as root, otherwise it says SKIPPED).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null || { echo "missing prerequisite: $1 ($2)" >&2; exit 1; }; }
need cargo "Rust 1.89 or newer, https://rustup.rs"
need go "Go 1.26 or newer, to build kube-apiserver, etcd, kubectl, helm, the health checker and Ory Hydra (or set KUBEBUILDER_ASSETS)"
need cc "a C compiler, for Ory Hydra's SQLite driver (cgo)"
need python3 "Python 3.10 or newer with venv, for the official MCP Python SDK client tests"
need npm "Node.js 20 or newer with npm, for the official TypeScript MCP client tests"

start=$SECONDS
bins="$(hack/control-plane-bins.sh)"
export MCPFLY_CONTROL_PLANE_BINS="$bins"
echo "control-plane binaries ($((SECONDS - start)) s): $bins"
"$bins/kube-apiserver" --version
"$bins/etcd" --version | sed -n 1p
"$bins/kubectl" version --client | sed -n 1p
"$bins/helm" version --short

# kstatus (sigs.k8s.io/cli-utils and Flux's fork) and Argo CD's Lua runtime, for the GitOps health tests.
checker="$(hack/health-checker.sh)"
export MCPFLY_HEALTH_CHECKER="$checker"
echo "GitOps health checker: $checker"
"$checker" --versions

# Ory Hydra, a real OAuth 2.1 authorization server, for the bridge's OAuth tests (tests/bridge_oauth.rs).
hydra="$(hack/hydra.sh)"
export MCPFLY_HYDRA="$hydra"
echo "Ory Hydra: $hydra"

# The official Python MCP SDK, for the bridge's client-compatibility tests (a venv under target/).
echo "python MCP SDK: $(hack/python-mcp-env.sh)"
# Both official TypeScript MCP clients (1.x and 2.x), for the same tests (a node_modules under target/).
echo "TypeScript MCP clients: $(hack/ts-mcp-env.sh)"

cargo test --workspace --locked "$@"

# Both images built twice from pinned sources (same digests) and run as containers under runc.
hack/image-check.sh
