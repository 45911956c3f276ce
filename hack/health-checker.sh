#!/usr/bin/env bash
# Builds the GitOps health checker the status tests use (testing/health-checker: kstatus from
# sigs.k8s.io/cli-utils, Flux's fork github.com/fluxcd/cli-utils, and gopher-lua running the Argo CD script),
# at the versions its go.mod pins, and caches it by the hash of its sources so only the first run pays.
#
#   hack/health-checker.sh            # prints the path of the binary
set -euo pipefail
cd "$(dirname "$0")/../testing/health-checker"

CACHE_ROOT="${MCPFLY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mcpfly}"
hash="$(cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)"
bin="$CACHE_ROOT/bin/health-checker-$hash"

if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "[health-checker] Go is required to build the health checker" >&2; exit 1; }
  echo "[health-checker] building $bin" >&2
  mkdir -p "$CACHE_ROOT/bin"
  CGO_ENABLED=0 go build -mod=readonly -trimpath -ldflags "-s -w" -o "$bin.tmp" .
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
