#!/usr/bin/env bash
# Cold-start figures (BENCHMARKS.md "Cold start (issue 18)"): autostart-to-first-answer (a request through the
# emulator's proxy until the MCP `initialize` answer) for an npm and a PyPI server running as runc machines of
# the built runtime image, from `stopped` (package cache empty, and kept as a volume would keep it) and from
# `suspended`. The controller deploys them; the test stops/suspends the machine through the Machines API.
#
#   hack/bench-coldstart.sh [IMAGES_DIR]     # default target/images (hack/build-images.sh builds it)
#   MCPFLY_COLDSTART_REPS=5 hack/bench-coldstart.sh
#
# Needs root, runc, umoci (hack/image-tools.sh) and npm/PyPI reachable. On a shared machine run it under a lock:
#   flock /work/helpers/bench.lock hack/bench-coldstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
images="${1:-target/images}"
[ "$(id -u)" = 0 ] || { echo "bench-coldstart: needs root (runc, network namespaces)" >&2; exit 1; }
[ -f "$images/runtime/index.json" ] || { echo "bench-coldstart: no runtime image in $images (run hack/build-images.sh)" >&2; exit 1; }
export MCPFLY_CONTROL_PLANE_BINS="${MCPFLY_CONTROL_PLANE_BINS:-$(hack/control-plane-bins.sh)}"
export MCPFLY_EMULATOR_RUNC_IMAGE="$(cd "$images/runtime" && pwd):mcpfly-runtime"
export CARGO_INCREMENTAL=0
cargo test --locked --test runc_machines --no-run
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -sr)"
echo "load at start: $(uptime)"
cargo test --locked --test runc_machines cold_start_figures -- --ignored --nocapture --test-threads 1 2>&1 \
  | grep --line-buffered -E '^cold start:|^test |panicked|Error|error'
echo "load at end: $(uptime)"
