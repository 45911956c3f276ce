#!/usr/bin/env bash
# Builds the mcpfly release binary the images ship, and prints its path. It is built without the `demo` feature:
# the local harness (demo, Fly emulator, local control plane) stays out of production, and the build is refused
# if it leaks back in. The build folder and the cargo home are
# remapped, so the binary (and the image digest) does not depend on where the repository was checked out; the
# result is cached under target/ by a hash of the Rust sources, Cargo.lock and the toolchain, so only a source
# change pays for a release build (several minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$(pwd)"
cargo_home="${CARGO_HOME:-$HOME/.cargo}"
cache="target/image-build"
mkdir -p "$cache"

# Tracked and untracked (not ignored) Rust inputs of every workspace crate; tests/ does not reach the binary.
# The images' binary: no default features (the `demo` harness). The Dockerfiles build it the same way
# (tests/image_definitions.rs keeps the three in step).
build_flags=(--release --locked -p mcpfly --bin mcpfly --no-default-features)

source_hash="$({
  rustc -vV
  echo "${build_flags[*]}"
  git ls-files -z -co --exclude-standard \
    | tr '\0' '\n' \
    | grep -E '(^|/)(Cargo\.(toml|lock)|build\.rs)$|\.rs$' \
    | grep -v '^tests/' \
    | LC_ALL=C sort \
    | while read -r f; do [ -f "$f" ] && sha256sum "$f"; done
} | sha256sum | cut -c1-16)"
bin="$cache/mcpfly-$source_hash"

if [ ! -x "$bin" ]; then
  start=$SECONDS
  echo "[release-binary] building mcpfly (release, sources $source_hash)" >&2
  RUSTFLAGS="--remap-path-prefix=$root=/build/mcpfly --remap-path-prefix=$cargo_home=/cargo" \
    CARGO_TARGET_DIR="$cache/cargo" \
    cargo build "${build_flags[@]}" >&2
  # The point of the remapping: a binary naming its build folder makes the image digest depend on the checkout.
  if grep -q -a -F "$root" "$cache/cargo/release/mcpfly"; then
    echo "[release-binary] the release binary embeds the build folder $root; refusing to ship it" >&2
    exit 1
  fi
  # The harness must not be in it: strings only the emulator and the local control plane carry, and the answer of
  # `mcpfly demo` (checked only once the strings are absent, so a leaked demo is never started here).
  for marker in "/__emulator/" "kube-apiserver"; do
    if grep -q -a -F -- "$marker" "$cache/cargo/release/mcpfly"; then
      echo "[release-binary] the release binary carries the local harness (found \"$marker\"); refusing to ship it" >&2
      exit 1
    fi
  done
  if answer="$("$cache/cargo/release/mcpfly" demo 2>&1)" || [[ "$answer" != *"is not in this build"* ]]; then
    echo "[release-binary] \`mcpfly demo\` should fail with \"is not in this build\"; it said: $answer" >&2
    exit 1
  fi
  rm -f "$cache"/mcpfly-*
  install -m 0755 "$cache/cargo/release/mcpfly" "$bin.tmp"
  mv "$bin.tmp" "$bin"
  echo "[release-binary] built in $((SECONDS - start)) s" >&2
fi
echo "$root/$bin"
