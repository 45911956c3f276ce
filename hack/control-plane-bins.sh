#!/usr/bin/env bash
# Builds the real Kubernetes control-plane binaries the tests use (kube-apiserver, kubectl, etcd, helm)
# from their published Go modules at pinned versions, and caches them by version so only the first run pays.
#
#   hack/control-plane-bins.sh            # prints the directory holding the binaries
#
# If KUBEBUILDER_ASSETS is set (the envtest convention) and holds kube-apiserver, etcd and kubectl, it is used
# as is and nothing is built. helm is always taken from the cache (or built), since envtest does not ship it.
set -euo pipefail

K8S_VERSION="${MCPFLY_K8S_VERSION:-v1.35.4}"
HELM_VERSION="${MCPFLY_HELM_VERSION:-v4.2.4}"
CACHE_ROOT="${MCPFLY_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/mcpfly}"
BIN_DIR="$CACHE_ROOT/bin/k8s-$K8S_VERSION-helm-$HELM_VERSION"

log() { echo "[control-plane-bins] $*" >&2; }

k8s_minor="${K8S_VERSION#v1.}"; k8s_minor="${k8s_minor%%.*}"
staging_version="v0.${K8S_VERSION#v1.}"

build_kubernetes() {
  local work="$CACHE_ROOT/gomod/k8s-$K8S_VERSION"
  mkdir -p "$work"
  cd "$work"
  if [ ! -f go.sum ]; then
    log "preparing Go module for k8s.io/kubernetes $K8S_VERSION"
    rm -f go.mod go.sum
    go mod init mcpfly.dev/control-plane-bins >/dev/null 2>&1
    # k8s.io/kubernetes' go.mod replaces each staging module with ./staging/src/k8s.io/NAME; read that list
    # from the module itself instead of typing it, so a release that adds a module still builds.
    local kgomod
    kgomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
    local names
    names="$(sed -n 's#.*=> ./staging/src/k8s.io/\([A-Za-z0-9_.-]*\).*#\1#p' "$kgomod" | sort -u)"
    [ -n "$names" ] || { log "no staging modules found in $kgomod"; exit 1; }
    for name in $names; do
      go mod edit -replace "k8s.io/$name=k8s.io/$name@$staging_version"
    done
    go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
    go mod edit -godebug "default=go1.$(sed -n 's/^go 1\.\([0-9]*\).*/\1/p' "$kgomod")"
    cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "go.etcd.io/etcd/server/v3"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
    # tidy resolves etcd at the version k8s.io/apiserver requires, so etcd matches the release's client;
    # a bare `go get` of etcd would pull its newest release and upgrade grpc under kube-apiserver.
    go mod tidy >&2
  fi
  local ldflags_common="-s -w"
  local vkeys="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$k8s_minor -X k8s.io/component-base/version.gitTreeState=clean"
  local ckeys="-X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION -X k8s.io/client-go/pkg/version.gitMajor=1 -X k8s.io/client-go/pkg/version.gitMinor=$k8s_minor -X k8s.io/client-go/pkg/version.gitTreeState=clean"
  export CGO_ENABLED=0
  log "building kube-apiserver $K8S_VERSION"
  go build -trimpath -ldflags "$ldflags_common $vkeys" -o "$BIN_DIR.tmp/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
  log "building kubectl $K8S_VERSION"
  go build -trimpath -ldflags "$ldflags_common $vkeys $ckeys" -o "$BIN_DIR.tmp/kubectl" k8s.io/kubernetes/cmd/kubectl
  log "building etcd (the version $K8S_VERSION depends on)"
  go build -trimpath -ldflags "$ldflags_common" -o "$BIN_DIR.tmp/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
  # helm pins its own k8s.io/* versions, which clash with the replaces above: build it on its own.
  log "building helm $HELM_VERSION"
  local major="${HELM_VERSION%%.*}"
  CGO_ENABLED=0 GOBIN="$BIN_DIR.tmp" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

main() {
  if [ -f "$BIN_DIR/.complete" ]; then
    echo "$BIN_DIR"; return
  fi
  command -v go >/dev/null || { log "Go is required to build the control plane (apt-get install golang, or set KUBEBUILDER_ASSETS)"; exit 1; }
  mkdir -p "$BIN_DIR.tmp"
  local start=$SECONDS
  if [ -n "${KUBEBUILDER_ASSETS:-}" ] && [ -x "$KUBEBUILDER_ASSETS/kube-apiserver" ] && [ -x "$KUBEBUILDER_ASSETS/etcd" ] && [ -x "$KUBEBUILDER_ASSETS/kubectl" ]; then
    log "using kube-apiserver, etcd and kubectl from KUBEBUILDER_ASSETS=$KUBEBUILDER_ASSETS"
    cp "$KUBEBUILDER_ASSETS"/{kube-apiserver,etcd,kubectl} "$BIN_DIR.tmp/"
  else
    ( build_kubernetes )
  fi
  ( build_helm )
  rm -rf "$BIN_DIR"
  mv "$BIN_DIR.tmp" "$BIN_DIR"
  touch "$BIN_DIR/.complete"
  log "built in $((SECONDS - start)) s into $BIN_DIR"
  echo "$BIN_DIR"
}

main "$@"
