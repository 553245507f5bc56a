#!/usr/bin/env bash
# Seeded fault injection against real processes (tests/src/chaos): `infermesh local` as the
# operator core and gRPC server on a private Postgres (or SQLite), real infermesh-agent
# processes with ONNX Runtime, each in a network namespace of its own. Every run's invariants
# are checked; a failing seed prints the command that replays it.
#
#   scripts/chaos.sh --seed 17                 replay one seed (its scenario follows from it)
#   scripts/chaos.sh --seed 3 --scenario pg-kill
#   scripts/chaos.sh --seed 10000              replay a kept regression (seeds 10,000 and up)
#   scripts/chaos.sh --seeds 200 --doc docs/reliability.md --report /tmp/chaos.jsonl
#   scripts/chaos.sh --ci                      the short fixed set CI plays
#
# Network and disk faults need root (namespaces, nftables, a tmpfs); without root those runs
# are skipped and said so. Run folders: $TMPDIR/infermesh-chaos/seed-N (kept when a run fails).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/setup.sh >/dev/null
cargo build --workspace --bins --locked -q
exec target/debug/infermesh-chaos "$@"
