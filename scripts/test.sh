#!/usr/bin/env bash
# The test command (README, .ci/run): installs what is missing, then checks formatting and
# lints, and runs every test of the workspace — unit, in-process gRPC, and end-to-end tests
# that start `infermesh local` with real agent processes and real ONNX Runtime.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# A clean CI checkout builds everything once: incremental caches only cost time and disk.
if [ "${CI:-}" = "true" ]; then export CARGO_INCREMENTAL=0; fi

echo "[test] the test control plane (built once per pin, then cached under the infermesh home)"
bash scripts/controlplane.sh build

echo "[test] cargo fmt --check"
cargo fmt --all -- --check
echo "[test] cargo clippy (warnings denied)"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "[test] compile-time checked queries: operator/.sqlx matches the Postgres schema"
bash scripts/sqlx-prepare.sh --check
echo "[test] cargo test"
# The end-to-end tests start the infermesh and infermesh-agent binaries; build them first
# (cargo test builds a package's binaries only for that package's own integration tests).
cargo build --workspace --bins --locked
cargo test --workspace --locked
