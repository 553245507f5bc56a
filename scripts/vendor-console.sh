#!/usr/bin/env bash
# Fetches the console's browser libraries from the npm registry at the pinned versions of
# operator/assets/console/vendor/VENDORED.tsv and checks their sha256 against it. The files
# are committed: the console needs no internet and no Node build step. Run this only to
# check the vendored files or to move to a new version (then update VENDORED.tsv).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=operator/assets/console/vendor
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
declare -A dist=([htmx.min.js]=dist/htmx.min.js [uPlot.iife.min.js]=dist/uPlot.iife.min.js [uPlot.min.css]=dist/uPlot.min.css)
grep -v '^#' "$dir/VENDORED.tsv" | while IFS=$'\t' read -r file pkg version sha _license; do
  if [ ! -d "$tmp/$pkg-$version" ]; then
    (cd "$tmp" && npm pack --silent "$pkg@$version" >/dev/null)
    mkdir -p "$tmp/$pkg-$version"
    tar xzf "$tmp/$pkg-$version.tgz" -C "$tmp/$pkg-$version"
  fi
  got=$(sha256sum "$tmp/$pkg-$version/package/${dist[$file]}" | cut -d' ' -f1)
  [ "$got" = "$sha" ] || { echo "$pkg@$version ${dist[$file]}: sha256 $got, VENDORED.tsv says $sha" >&2; exit 1; }
  cp "$tmp/$pkg-$version/package/${dist[$file]}" "$dir/$file"
  echo "$file: $pkg@$version $sha"
done
