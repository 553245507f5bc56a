#!/usr/bin/env bash
# Dispatch microbenchmark of the core: no-op shards through the real core and a real store,
# completed at once by in-process agents (each writes a one-record part where its attempt is
# told to and reports it honestly), on SQLite (a file) and on Postgres (a throwaway cluster on
# loopback, synchronous_commit on). Prints shards/s; writes its section of docs/benchmarks.md.
#
#   bash scripts/bench-dispatch.sh
#
# BENCH_BEFORE_BIN=PATH also runs another build of infermesh-dispatch-bench (the same harness
# built against an older core) in the same rounds, for a before/after comparison;
# BENCH_BEFORE_LABEL names that build in the table (default: "before core v2 (82fd9c2)").
# Settings: BENCH_SHARDS (5000), BENCH_AGENTS (10), BENCH_SLOTS (4), BENCH_ROUNDS (3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
SHARDS=${BENCH_SHARDS:-5000}
AGENTS=${BENCH_AGENTS:-10}
SLOTS=${BENCH_SLOTS:-4}
ROUNDS=${BENCH_ROUNDS:-3}
BEFORE=${BENCH_BEFORE_BIN:-}
export BENCH_BEFORE_LABEL=${BENCH_BEFORE_LABEL:-before core v2 (82fd9c2)}

cargo build --release --locked -q -p infermesh-operator --bin infermesh-dispatch-bench
AFTER=target/release/infermesh-dispatch-bench

# A throwaway Postgres on loopback, as the postgres user when run as root.
bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d /tmp/infermesh-bench-XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -w start >/dev/null
trap 'as_pg "$bindir/pg_ctl" -D "$dir/data" stop -m immediate >/dev/null; rm -rf "$dir"' EXIT
pg="postgres://postgres@127.0.0.1:$port"

out=$(mktemp)
run() { # $1 = label, $2 = binary, $3 = backend
  local url=""
  if [ "$3" = postgres ]; then
    local db="bench_$(date +%s%N)"
    psql -q "$pg/postgres" -c "CREATE DATABASE $db"
    url="$pg/$db"
  fi
  local line
  line=$("$2" --shards "$SHARDS" --agents "$AGENTS" --slots "$SLOTS" ${url:+--database-url "$url"})
  echo "{\"label\": \"$1\", \"run\": $line}" | tee -a "$out"
}
for round in $(seq "$ROUNDS"); do
  for backend in sqlite postgres; do
    [ -n "$BEFORE" ] && run before "$BEFORE" "$backend"
    run after "$AFTER" "$backend"
  done
done

python3 - "$out" "$SHARDS" "$AGENTS" "$SLOTS" "$ROUNDS" <<'PY'
import json, os, re, statistics, subprocess, sys, datetime
path, shards, agents, slots, rounds = sys.argv[1:6]
runs = [json.loads(l) for l in open(path) if l.strip()]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
def med(label, backend):
    xs = [r["run"]["shards_per_second"] for r in runs if r["label"] == label and r["run"]["backend"] == backend]
    return (statistics.median(xs), xs) if xs else (None, [])
for r in runs:
    assert r["run"]["ledger_ok"] and r["run"]["charges"] == int(shards), r
lines = [
    "<!-- bench:dispatch:start -->",
    "## Core: dispatch of no-op shards (`scripts/bench-dispatch.sh`)",
    "",
    f"Generated on {datetime.date.today()} (commit {commit}); {os.cpu_count()} CPU(s), {cpu}.",
    "",
    f"- {shards} shards of one workload, {agents} in-process agents x {slots} slots, each shard completed at once: "
    "the agent writes a one-record part where its attempt is told to and reports it; the operator checks the part "
    "(size, sha256, records), commits it in the store, renames it and charges. Every run ends with one charge per shard "
    "and `ledger verify` clean.",
    "- SQLite: a file, WAL. Postgres: a throwaway cluster on loopback, `synchronous_commit` on. Median of "
    f"{rounds} rounds (all rounds listed).",
    "",
    "| store | build | shards/s (median) | rounds |",
    "|---|---|---:|---|",
]
for backend in ("sqlite", "postgres"):
    for label in ("before", "after"):
        m, xs = med(label, backend)
        if m is None:
            continue
        name = "this commit" if label == "after" else os.environ["BENCH_BEFORE_LABEL"]
        lines.append(f"| {backend} | {name} | {m:,.0f} | {', '.join(f'{x:,.0f}' for x in xs)} |")
lines += ["", "<!-- bench:dispatch:end -->"]
section = "\n".join(lines) + "\n"
doc = "docs/benchmarks.md"
text = open(doc).read()
if "<!-- bench:dispatch:start -->" in text:
    text = re.sub(r"<!-- bench:dispatch:start -->.*?<!-- bench:dispatch:end -->\n?", section, text, flags=re.S)
else:
    text = text.rstrip("\n") + "\n\n" + section
open(doc, "w").write(text)
print(f"[bench-dispatch] wrote {doc}")
PY
