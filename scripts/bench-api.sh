#!/usr/bin/env bash
# The Kubernetes API write budget of the controllers (issue 4): a simulated run of 10,000
# shards on 8 agents through the real Workload reconcile, status writer and Event publisher,
# against a mocked API server that counts every request. Prints markdown tables.
#   scripts/bench-api.sh            # 10 ms and 40 ms per shard
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
