#!/usr/bin/env bash
# Cluster mode at scale on the real control plane of the test suite (issue 13): N kwok nodes
# carry the Mesh's agent DaemonSet pods, one operator process plays the chart's operator pod,
# and infermesh-swarm attaches one simulated agent per node over TLS with a token bound to its
# pod. Prints the operator's mutating API calls (from the audit log), how stale Agent
# statuses got, how late final phases reached the API, and the swarm's figures.
#
#   scripts/bench-cluster.sh                                   1,000 nodes, 1,000 Workloads
#   scripts/bench-cluster.sh --nodes 50 --workloads 20         a quick look
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh >/dev/null
bash scripts/controlplane.sh build >/dev/null
cargo build --release --locked -q -p infermesh-operator -p infermesh-swarm -p infermesh-tests \
  --bin infermesh --bin infermesh-swarm --bin infermesh-cluster-bench
# A thousand agents hold a thousand connections on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec ./target/release/infermesh-cluster-bench --json target/bench-cluster.json "$@"
