#!/usr/bin/env bash
# The Kubernetes API write budget of the controllers (issue 4): a simulated run of 10,000
# shards on 8 agents through the real Workload reconcile, status writer and Event publisher,
# against a mocked API server that counts every request. Prints markdown tables.
#   scripts/bench-api.sh            # 10 ms and 40 ms per shard, then 1,000 agents x 1,000 Workloads
#   scripts/bench-api.sh --small    # without the 1,000 x 1,000 run (a few minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
# The figures are counts of API calls, not speed: the dev profile (dependencies at
# opt-level 2) is enough and reuses the test build.
cargo build -q -p infermesh-operator --bin infermesh-api-bench
for ms in 10 40; do
  ./target/debug/infermesh-api-bench --shards 10000 --agents 8 --slots 2 --compute-ms "$ms"
  echo
done
# Issue 13: 1,000 agents and 1,000 Workloads at once (100 shards of 1 s each): how the writer
# spends its budget, how stale a status gets, how late a final phase is written.
# A release build: a thousand Workloads at once are too slow for the dev profile's core.
if [ "${1:-}" != "--small" ]; then
  cargo build --release --locked -q -p infermesh-operator --bin infermesh-api-bench
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
  ./target/release/infermesh-api-bench --shards 100000 --workloads 1000 --agents 1000 --slots 1 --compute-ms 1000
fi
