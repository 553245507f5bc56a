#!/usr/bin/env bash
# What input and output formats cost (issue 15): the same texts embedded by `infermesh local`
# (the quickstart model, 2 agents) from JSONL, CSV and Parquet, one file and 100 files, written
# as JSONL and as Parquet, against the JSONL-to-JSONL figure; and planning time for 10,000
# files. Prints the figures; with --docs writes its section of docs/benchmarks.md. About 5
# minutes after the release build. Extra arguments go to the bench (--texts, --repeat).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
docs=false
args=()
for a in "$@"; do
  if [ "$a" = "--docs" ]; then docs=true; else args+=("$a"); fi
done
bash scripts/setup.sh >/dev/null
cargo build --release --locked -q -p infermesh-operator -p infermesh-agent -p infermesh-tests \
  --bin infermesh --bin infermesh-agent --bin infermesh-formats-bench
out=$(mktemp /tmp/infermesh-formats-XXXXXX.json)
target/release/infermesh-formats-bench "${args[@]}" >"$out"
cat "$out"
$docs || exit 0
python3 - "$out" <<'PY'
import json, sys, pathlib, platform, os
r = json.load(open(sys.argv[1]))
rows = ["| input | files | output | seconds | texts/s | vs JSONL -> JSONL |", "|---|---:|---|---:|---:|---:|"]
for x in r["runs"]:
    rows.append(f"| {x['input']} | {x['files']} | {x['output']} | {x['seconds']:.2f} | {x['textsPerSecond']:.1f} | {100 * (x['vsJsonl'] - 1):+.1f} % |")
plan = [f"- {p['files']:,} {p['format']} files: resolved (listed{', footers read' if p['format'] == 'parquet' else ''}) in {p['resolveSeconds']:.2f} s, planned into {p['shards']} shards in {p['planSeconds']:.2f} s" for p in r["planning"]]
others = [x["vsJsonl"] for x in r["runs"] if (x["input"], x["files"], x["output"]) != ("jsonl", 1, "jsonl")]
worst = min(others)
spread = max(x["textsPerSecond"] for x in r["runs"]) / min(x["textsPerSecond"] for x in r["runs"]) - 1
section = "\n".join([
    "<!-- bench:formats:start -->",
    f"### Input and output formats (`scripts/bench-formats.sh`, {r['texts']:,} texts, best of the runs)",
    "",
    f"The same quickstart texts embedded by `infermesh local` with two agents, from each format as one",
    f"file and as 100 files, to JSONL and to Parquet parts ({os.cpu_count()} cores, no GPU).",
    "",
    *rows,
    "",
    *plan,
    "",
    f"Slowest other variant against JSONL -> JSONL: {100 * (worst - 1):+.1f} % (target: within 5 % of it);",
    f"fastest to slowest of all runs: {100 * spread:.1f} %.",
    "<!-- bench:formats:end -->",
])
p = pathlib.Path("docs/benchmarks.md")
text = p.read_text()
start, end = "<!-- bench:formats:start -->", "<!-- bench:formats:end -->"
if start in text:
    text = text[: text.index(start)] + section + text[text.index(end) + len(end):]
else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
p.write_text(text)
print("docs/benchmarks.md: formats section written")
PY
