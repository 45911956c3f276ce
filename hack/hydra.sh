#!/usr/bin/env bash
# Builds Ory Hydra (a real OAuth 2.1 / OpenID Connect authorization server) from its published Go module at a
# pinned version, for the bridge's OAuth tests (tests/bridge_oauth.rs), and caches it by version so only the
# first run pays (~2+ min on 2 cores). SQLite is compiled in so Hydra can run with DSN=memory.
#
#   hack/hydra.sh            # prints the path of the binary
set -euo pipefail

HYDRA_VERSION="${MCPFLY_HYDRA_VERSION:-v2.3.0}"
# Hydra's go.mod replaces pop with Ory's fork; a dependency's replaces are ignored outside its own module, so the
# same replace is repeated here (the version Hydra v2.3.0 pins).
POP_REPLACE="github.com/gobuffalo/pop/v6=github.com/ory/pop/v6@v6.2.1-0.20241121111754-e5dfc0f3344b"
CACHE_ROOT="${MCPFLY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mcpfly}"
bin="$CACHE_ROOT/bin/hydra-$HYDRA_VERSION"

log() { echo "[hydra] $*" >&2; }

if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { log "Go is required to build Hydra"; exit 1; }
  command -v cc >/dev/null || { log "a C compiler is required (Hydra's SQLite driver uses cgo)"; exit 1; }
  work="$CACHE_ROOT/gomod/hydra-$HYDRA_VERSION"
  mkdir -p "$work" "$CACHE_ROOT/bin"
  cd "$work"
  if [ ! -f go.sum ]; then
    log "preparing Go module for github.com/ory/hydra/v2 $HYDRA_VERSION"
    rm -f go.mod go.sum
    go mod init mcpfly.dev/hydra >/dev/null 2>&1
    go get -tool "github.com/ory/hydra/v2@$HYDRA_VERSION" >&2
    go mod edit -replace "$POP_REPLACE"
    go mod tidy >&2
  fi
  log "building $bin"
  CGO_ENABLED=1 go build -tags sqlite,sqlite_omit_load_extension -trimpath -ldflags "-s -w" \
    -o "$bin.tmp" github.com/ory/hydra/v2
  mv "$bin.tmp" "$bin"
fi
echo "$bin"
