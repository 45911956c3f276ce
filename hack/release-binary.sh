#!/usr/bin/env bash
# Builds the mcpfly release binary the images ship, and prints its path. The build folder and the cargo home are
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
source_hash="$({
  rustc -vV
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
    cargo build --release --locked -p mcpfly --bin mcpfly >&2
  # The point of the remapping: a binary naming its build folder makes the image digest depend on the checkout.
  if grep -q -a -F "$root" "$cache/cargo/release/mcpfly"; then
    echo "[release-binary] the release binary embeds the build folder $root; refusing to ship it" >&2
    exit 1
  fi
  rm -f "$cache"/mcpfly-*
  install -m 0755 "$cache/cargo/release/mcpfly" "$bin.tmp"
  mv "$bin.tmp" "$bin"
  echo "[release-binary] built in $((SECONDS - start)) s" >&2
fi
echo "$root/$bin"
