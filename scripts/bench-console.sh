#!/usr/bin/env bash
# What the web console costs the operator at 1,000 swarm agents: 100 consoles following the
# live event stream, and rendering pages (issue 14). Prints the figures; with --docs writes its
# section of docs/benchmarks.md. About 3 minutes after the release build.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked -q -p infermesh-operator -p infermesh-swarm --bin infermesh --bin infermesh-swarm
# A thousand agents hold a thousand connections on each side.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec python3 scripts/bench_console.py "$@"
