#!/usr/bin/env bash
# Regenerates operator/.sqlx/, the offline data of the Postgres store's compile-time checked
# queries: starts a throwaway Postgres, applies the migrations, and compiles the operator
# against it with SQLX_OFFLINE_DIR set, which makes the query macros write their data.
# Run it after changing a query or a Postgres migration, and commit operator/.sqlx/.
# With --check it only compares: exit 1 when operator/.sqlx/ is out of date (CI runs this).
set -euo pipefail
check=false
[ "${1:-}" = "--check" ] && check=true
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"

bindir=$(pg_config --bindir 2>/dev/null || true)
[ -x "$bindir/initdb" ] || bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
dir=$(mktemp -d /tmp/infermesh-sqlx-XXXXXX)
as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
[ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >/dev/null
as_pg "$bindir/pg_ctl" -D "$dir/data" -l "$dir/log" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -w start >/dev/null
trap 'as_pg "$bindir/pg_ctl" -D "$dir/data" stop -m immediate >/dev/null; rm -rf "$dir"' EXIT

url="postgres://postgres@127.0.0.1:$port/postgres"
for m in operator/migrations/postgres/*.sql; do
  psql -q -v ON_ERROR_STOP=1 "$url" -f "$m"
done
out="$PWD/operator/.sqlx"
$check && out="$dir/sqlx"
rm -rf "$out" && mkdir -p "$out"
touch operator/src/store/postgres.rs
SQLX_OFFLINE=false DATABASE_URL="$url" SQLX_OFFLINE_DIR="$out" \
  cargo check -q -p infermesh-operator --all-targets
if $check; then
  if ! diff -r -q "$out" operator/.sqlx; then
    echo "operator/.sqlx is out of date with the queries: run scripts/sqlx-prepare.sh and commit it" >&2
    exit 1
  fi
  echo "[sqlx-prepare] operator/.sqlx is up to date ($(ls "$out" | wc -l) queries)"
else
  echo "[sqlx-prepare] $(ls "$out" | wc -l) queries in operator/.sqlx/"
fi
