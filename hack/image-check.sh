#!/usr/bin/env bash
# CI's image check: installs the tools, builds both images twice (the digests must match), runs the container
# smoke test under runc, then the end-to-end test whose machines are runc containers of the runtime image
# (tests/runc_machines.rs, ignored in `cargo test` because it needs root, runc and this image). Needs root;
# elsewhere it says SKIPPED loudly and exits 0.
#   MCPFLY_IMAGES=skip hack/test.sh     # skips it on purpose (also printed)
set -euo pipefail
cd "$(dirname "$0")/.."
banner() { echo "======== images: $* ========"; }
if [ "${MCPFLY_IMAGES:-}" = skip ]; then banner "SKIPPED (MCPFLY_IMAGES=skip)"; exit 0; fi
if [ "$(id -u)" != 0 ]; then banner "SKIPPED: not root (mmdebstrap and runc need root; CI runs as root)"; exit 0; fi
# One timestamp for both builds (the commit time), so a commit made meanwhile cannot tell them apart.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct)}"
# Both builds follow today's Debian archive (drift from hack/images/debian.lock is printed, not fatal): what CI
# checks is that two builds from the same inputs agree and that the image serves MCP.
export MCPFLY_IMAGES_LOCK="${MCPFLY_IMAGES_LOCK:-follow}"
start=$SECONDS
hack/image-tools.sh
echo "image tools: $((SECONDS - start)) s"
t=$SECONDS; first="$(hack/build-images.sh target/images)"; echo "image build: $((SECONDS - t)) s"
t=$SECONDS; second="$(hack/build-images.sh target/images-rebuild)"; echo "image rebuild: $((SECONDS - t)) s"
for image in runtime controller; do
  a="$(cat "$first/$image/digest")"; b="$(cat "$second/$image/digest")"
  if [ "$a" != "$b" ]; then
    banner "FAIL: $image is not reproducible ($a, then $b)"
    exit 1
  fi
  echo "images: $image reproducible: $a"
done
rm -rf "$second"
hack/image-smoke.sh "$first"
# The controller deploys npm and image deployments to the emulator, whose machines run under runc.
export MCPFLY_CONTROL_PLANE_BINS="${MCPFLY_CONTROL_PLANE_BINS:-$(hack/control-plane-bins.sh)}"
export MCPFLY_EMULATOR_RUNC_IMAGE="$first/runtime:mcpfly-runtime"
t=$SECONDS
if ! CARGO_INCREMENTAL=0 cargo test --locked --test runc_machines -- --ignored --exact \
    npm_and_image_deployments_run_as_runc_machines_behind_the_proxy; then
  banner "FAIL: runc machines end to end (tests/runc_machines.rs)"
  exit 1
fi
echo "runc machines end to end: $((SECONDS - t)) s"
banner "PASSED in $((SECONDS - start)) s"
