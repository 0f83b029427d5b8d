#!/usr/bin/env bash
# braid's benchmarks, in one command: builds release binaries, then runs
# every benchmark (or the one named) and prints its tables.
#
#   bash tests/bench.sh [users|limit|noop|many|instructions|overhead|scale|events|context|footprint|emulation|cache]
#   BRAID_BENCH_STORE=postgres bash tests/bench.sh scale   (or events): the same on PostgreSQL
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:${CARGO_HOME:-$HOME/.cargo}/bin"
cargo build --release --workspace --bins
exec target/release/braid-bench "${1:-all}"
