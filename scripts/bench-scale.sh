#!/usr/bin/env bash
# Scale benchmark (issue 13): `infermesh local` as the operator with `infermesh-swarm` agents
# over real gRPC — no-op dispatch at 10, 100 and 1,000 agents on SQLite and Postgres, operator
# CPU per shard, assignment latency, operator memory with up to 1,000,000 queued shards — and
# Ray's no-op task rate on the same machine as the anchor. Writes its section of
# docs/benchmarks.md and docs/scale-*.png; raw figures in target/bench-scale.jsonl.
#
#   scripts/bench-scale.sh                      everything (about 15 minutes here)
#   scripts/bench-scale.sh --agents 10,100 --stores sqlite --queued '' --no-ray
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
HOME_DIR="${INFERMESH_HOME:-$HOME/.cache/infermesh}"
RAY_VERSION=2.52.1
MATPLOTLIB_VERSION=3.10.7

bash scripts/setup.sh >/dev/null
cargo build --release --locked -q -p infermesh-operator -p infermesh-swarm --bin infermesh --bin infermesh-swarm --bin infermesh-dispatch-bench

ray=1
args=()
for a in "$@"; do
  if [ "$a" = "--no-ray" ]; then ray=0; else args+=("$a"); fi
done
# The bench venv: Ray (the anchor) and matplotlib (the plots), pinned, apart from the test venv.
BENCH_VENV="$HOME_DIR/bench-venv"
if ! "$BENCH_VENV/bin/python" -c "import importlib.metadata as m
assert m.version('ray') == '$RAY_VERSION' and m.version('matplotlib') == '$MATPLOTLIB_VERSION'" 2>/dev/null; then
  echo "[bench-scale] installing ray==$RAY_VERSION and matplotlib==$MATPLOTLIB_VERSION in $BENCH_VENV" >&2
  python3 -m venv "$BENCH_VENV"
  "$BENCH_VENV/bin/pip" install -q --disable-pip-version-check "ray==$RAY_VERSION" "matplotlib==$MATPLOTLIB_VERSION"
fi
# A thousand agents hold a thousand connections on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$ray" = 1 ]; then args+=(--ray-python "$BENCH_VENV/bin/python"); fi
exec "$BENCH_VENV/bin/python" scripts/bench_scale.py "${args[@]}"
