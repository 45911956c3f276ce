#!/usr/bin/env bash
# The fleet benchmark (BENCHMARKS.md): builds the release binaries, then runs fleet-bench, which starts a real
# control plane, the Fly emulator with realistic settings and `mcpfly controller` as a separate process.
# Arguments go to fleet-bench (e.g. `hack/bench.sh --n 1000`; `--help` lists them). Takes about 25 minutes at
# N = 1000; the report lands in target/bench/fleet-<time>/report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export MCPFLY_CONTROL_PLANE_BINS="${MCPFLY_CONTROL_PLANE_BINS:-$(hack/control-plane-bins.sh)}"
cargo build --release --locked -p mcpfly --bin mcpfly
cargo build --release --locked -p mcpfly-bench --bin fleet-bench
exec target/release/fleet-bench "$@"
