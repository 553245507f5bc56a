#!/usr/bin/env bash
# The local quickstart: set up (idempotent), build, and embed the quickstart corpus with
# all-MiniLM-L6-v2 across two agent processes on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
HOME_DIR="${INFERMESH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infermesh}"

echo "[quickstart] building (release)"
cargo build --release --locked -p infermesh-operator -p infermesh-agent

# The manifest names the model relative to itself: link the downloaded model there.
ln -sfn "$HOME_DIR/models/minilm" examples/quickstart/models
rm -rf examples/quickstart/out

exec target/release/infermesh local -f examples/quickstart/quickstart.yaml --agents "${AGENTS:-2}" "$@"
