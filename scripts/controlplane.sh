#!/usr/bin/env bash
# A real Kubernetes control plane for the test suite, built from Go modules (the way envtest
# and kwok do it): etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok
# (which plays the kubelet of fake Nodes), all on 127.0.0.1. See tests/controlplane/README.md.
#
#   scripts/controlplane.sh build        build the five binaries (cached by pin hash)
#   scripts/controlplane.sh up [DIR]     build if needed, start, wait until ready, print env
#   scripts/controlplane.sh env [DIR]    print the env lines of a running control plane
#   scripts/controlplane.sh down [DIR]   stop the processes and remove the state dir
#   scripts/controlplane.sh bin-dir      print the directory that holds the binaries
#
# Environment:
#   INFERMESH_HOME       cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/infermesh)
#   CP_STATE_DIR         state dir when DIR is not given (default ${TMPDIR:-/tmp}/infermesh-cp-$UID)
#   CP_ETCD_PORT, CP_ETCD_PEER_PORT, CP_APISERVER_PORT, CP_KCM_PORT, CP_SCHEDULER_PORT,
#   CP_KWOK_PORT
#                        fixed ports (default: free ports picked at start)
#   CP_READY_TIMEOUT     seconds each component may take to become ready (default 120)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CP_SRC="$ROOT/tests/controlplane"
MODULES=(kube etcd kwok)
# Bump when the build recipe below changes, so that the cache key changes with it.
RECIPE=1

# Go: the machine's, else the toolchain scripts/setup.sh put under the infermesh home.
export PATH="${INFERMESH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infermesh}/go/bin:/usr/local/go/bin:$PATH"

die() { echo "controlplane: $*" >&2; exit 1; }
log() { echo "[controlplane] $*" >&2; }

cache_root() { echo "${INFERMESH_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/infermesh}/controlplane"; }

# The cache key: a hash of every go.mod and go.sum, the Go version and the recipe number.
cache_key() {
  command -v go >/dev/null || die "go is not on PATH (Go >= 1.26 is needed; see tests/controlplane/README.md)"
  {
    echo "recipe=$RECIPE"
    go version
    for m in "${MODULES[@]}"; do
      echo "== $m/go.mod"; cat "$CP_SRC/$m/go.mod"
      echo "== $m/go.sum"; cat "$CP_SRC/$m/go.sum"
    done
  } | sha256sum | cut -c1-16
}

bin_dir() { echo "$(cache_root)/$(cache_key)/bin"; }

# Reads the version of a required module from a module's go.mod (a `require` line or block).
module_version() {
  awk -v m="$2" '($1 == m) { print $2; exit } ($1 == "require" && $2 == m) { print $3; exit }' \
    "$CP_SRC/$1/go.mod"
}

now_ms() { date +%s%3N; }
secs_since() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; }

cmd_build() {
  local key dest tmp kube_version kube_minor t0 ldflags
  key="$(cache_key)"
  dest="$(cache_root)/$key"
  if [ -f "$dest/.complete" ]; then
    log "binaries up to date in $dest/bin"
    return 0
  fi
  mkdir -p "$(cache_root)"
  tmp="$(mktemp -d "$(cache_root)/.build-$key.XXXXXX")"
  chmod 755 "$tmp"
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" EXIT
  mkdir -p "$tmp/bin" "$tmp/share"

  kube_version="$(module_version kube k8s.io/kubernetes)"
  [ -n "$kube_version" ] || die "no k8s.io/kubernetes version in $CP_SRC/kube/go.mod"
  kube_minor="$(echo "$kube_version" | cut -d. -f2)"
  # -mod=readonly: the build fails instead of editing go.mod/go.sum when they are not tidy.
  # CGO_ENABLED=0: static binaries, as the upstream releases are built; no C compiler needed.
  export GOFLAGS="-mod=readonly -buildvcs=false" CGO_ENABLED=0
  # A build cache of its own, removed with $tmp: once the binaries are cached it is only
  # gigabytes of disk that the Rust build needs more.
  export GOCACHE="$tmp/gocache"

  build_one() { # module, output name, package, extra ldflags
    local m="$1" name="$2" pkg="$3" extra="${4:-}" t0
    t0="$(now_ms)"
    log "building $name ($pkg) ..."
    (cd "$CP_SRC/$m" && nice -n 10 go build -trimpath -ldflags "-s -w $extra" -o "$tmp/bin/$name" "$pkg") ||
      die "go build of $name failed"
    log "built $name in $(secs_since "$t0") s ($(du -h "$tmp/bin/$name" | cut -f1))"
  }

  t0="$(now_ms)"
  ldflags="-X k8s.io/component-base/version.gitVersion=$kube_version"
  ldflags+=" -X k8s.io/component-base/version.gitMajor=1"
  ldflags+=" -X k8s.io/component-base/version.gitMinor=$kube_minor"
  ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
  build_one kube kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver "$ldflags"
  build_one kube kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager "$ldflags"
  build_one kube kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler "$ldflags"
  build_one etcd etcd go.etcd.io/etcd/server/v3
  build_one kwok kwok sigs.k8s.io/kwok/cmd/kwok

  # The kwok binary has no built-in Stages: without --config it exits with "no stages
  # found". Copy the default Stages that kwokctl uses (node-initialize,
  # node-heartbeat-with-lease, pod-ready, pod-complete, pod-delete) from the pinned module.
  local kwok_dir
  kwok_dir="$(cd "$CP_SRC/kwok" && go list -m -f '{{.Dir}}' sigs.k8s.io/kwok)"
  [ -d "$kwok_dir" ] || die "kwok module source not found"
  {
    local f first=1
    for f in stage/node/fast/node-initialize.yaml \
      stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      stage/pod/fast/pod-ready.yaml stage/pod/fast/pod-complete.yaml \
      stage/pod/fast/pod-delete.yaml; do
      [ "$first" = 1 ] || echo "---"
      first=0
      cat "$kwok_dir/kustomize/$f"
    done
  } >"$tmp/share/kwok-stages.yaml"

  echo "$kube_version" >"$tmp/kube-version"
  touch "$tmp/.complete"
  rm -rf "$dest"
  mv "$tmp" "$dest"
  trap - EXIT
  log "build done in $(secs_since "$t0") s: $dest/bin"
}

# ---------------------------------------------------------------------------------------------
# up / down / env

state_dir() {
  local d="${1:-${CP_STATE_DIR:-${TMPDIR:-/tmp}/infermesh-cp-$(id -u)}}"
  mkdir -p "$d" 2>/dev/null || true
  (cd "$d" 2>/dev/null && pwd) || echo "$d"
}

free_port() {
  if command -v python3 >/dev/null; then
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
  else
    local p
    while :; do
      p=$((20000 + RANDOM % 30000))
      if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
  fi
}

# Fails with the tail of the component's log.
fail_component() { # name, message
  local s="$STATE" name="$1"
  echo "controlplane: $name $2" >&2
  if [ -f "$s/logs/$name.log" ]; then
    echo "---- last 40 lines of $s/logs/$name.log ----" >&2
    tail -n 40 "$s/logs/$name.log" >&2
    echo "----" >&2
  fi
  echo "controlplane: the state dir is kept for inspection; run: $0 down $s" >&2
  exit 1
}

# Waits until `check` succeeds; fails when the process dies or the timeout passes.
wait_for() { # name, check command...
  local name="$1"; shift
  local pid deadline
  pid="$(cat "$STATE/pids/$name")"
  deadline=$(($(date +%s) + ${CP_READY_TIMEOUT:-120}))
  until "$@" >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || fail_component "$name" "exited before it became ready"
    [ "$(date +%s)" -lt "$deadline" ] ||
      fail_component "$name" "did not become ready within ${CP_READY_TIMEOUT:-120} s"
    sleep 0.2
  done
}

start() { # name, command...
  local name="$1"; shift
  # setsid: its own process group and session, so that it outlives this script and `down`
  # can signal it alone.
  setsid "$@" >"$STATE/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/pids/$name"
}

gen_certs() {
  local p="$STATE/pki"
  mkdir -p "$p"
  (
    cd "$p"
    umask 077
    # ECDSA P-256 keys for the CAs and TLS certificates: an RSA key costs ~0.2 s here.
    local ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
    openssl req -x509 "${ec[@]}" -nodes -keyout ca.key -out ca.crt -days 3650 \
      -subj "/CN=infermesh-test-ca" -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" 2>/dev/null
    # name, subject, extensions
    issue() {
      openssl req -new "${ec[@]}" -nodes -keyout "$1.key" -out "$1.csr" -subj "$2" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    issue apiserver "/CN=kube-apiserver" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    local client="basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
    issue admin "/O=system:masters/CN=admin" "$client"
    issue kube-controller-manager "/CN=system:kube-controller-manager" "$client"
    issue kube-scheduler "/CN=system:kube-scheduler" "$client"
    # The front proxy (aggregation layer): its own CA, as kubeadm sets it up. The apiserver
    # publishes this CA in kube-system/extension-apiserver-authentication, where the
    # controller-manager, the scheduler and any aggregated API server look for it.
    openssl req -x509 "${ec[@]}" -nodes -keyout front-proxy-ca.key -out front-proxy-ca.crt \
      -days 3650 -subj "/CN=infermesh-test-front-proxy-ca" \
      -addext "basicConstraints=critical,CA:TRUE" \
      -addext "keyUsage=critical,digitalSignature,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new "${ec[@]}" -nodes -keyout front-proxy-client.key \
      -out front-proxy-client.csr -subj "/CN=front-proxy-client" 2>/dev/null
    printf '%s\n' "$client" >front-proxy-client.ext
    openssl x509 -req -in front-proxy-client.csr -CA front-proxy-ca.crt -CAkey front-proxy-ca.key \
      -CAcreateserial -days 3650 -extfile front-proxy-client.ext -out front-proxy-client.crt 2>/dev/null
    rm -f front-proxy-client.csr front-proxy-client.ext
    # The service-account token key pair: RSA, so that tokens are RS256, which every JWT
    # library verifies.
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
  ) || true
  local f
  for f in ca.crt ca.key apiserver.crt admin.crt kube-controller-manager.crt kube-scheduler.crt \
    front-proxy-ca.crt front-proxy-client.crt sa.key sa.pub; do
    [ -s "$p/$f" ] || die "certificate generation failed: no $p/$f (openssl)"
  done
}

write_kubeconfig() { # file, user, server
  local p="$STATE/pki"
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: infermesh-test
  cluster:
    server: $3
    certificate-authority: $p/ca.crt
users:
- name: $2
  user:
    client-certificate: $p/$2.crt
    client-key: $p/$2.key
contexts:
- name: infermesh-test
  context:
    cluster: infermesh-test
    user: $2
current-context: infermesh-test
EOF
}

print_env() {
  local s="$1"
  local ETCD_PORT APISERVER_PORT
  # shellcheck disable=SC1091
  . "$s/ports"
  echo "export KUBECONFIG=$s/kubeconfig"
  echo "export INFERMESH_CP_STATE=$s"
  echo "export INFERMESH_CP_APISERVER=https://127.0.0.1:$APISERVER_PORT"
  echo "export INFERMESH_CP_ETCD=http://127.0.0.1:$ETCD_PORT"
  echo "export INFERMESH_CP_BIN=$(cat "$s/bin-dir")"
}

running() { # state dir: is any recorded process alive?
  local f
  for f in "$1"/pids/*; do
    [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null && return 0
  done
  return 1
}

cmd_up() {
  local t0 bin version api
  t0="$(now_ms)"
  STATE="$(state_dir "${1:-}")"
  if [ -d "$STATE/pids" ] && running "$STATE"; then
    die "a control plane is already running in $STATE (run: $0 down $STATE)"
  fi
  cmd_build
  bin="$(bin_dir)"
  version="$(cat "$bin/../kube-version")"
  rm -rf "$STATE/etcd" "$STATE/pids" "$STATE/logs" "$STATE/pki"
  mkdir -p "$STATE/logs" "$STATE/pids"
  echo "$bin" >"$STATE/bin-dir"
  t0="$(now_ms)" # start-up time excludes the build

  local etcd_port="${CP_ETCD_PORT:-$(free_port)}" peer_port="${CP_ETCD_PEER_PORT:-$(free_port)}"
  local api_port="${CP_APISERVER_PORT:-$(free_port)}" kcm_port="${CP_KCM_PORT:-$(free_port)}"
  local sched_port="${CP_SCHEDULER_PORT:-$(free_port)}" kwok_port="${CP_KWOK_PORT:-$(free_port)}"
  cat >"$STATE/ports" <<EOF
ETCD_PORT=$etcd_port
ETCD_PEER_PORT=$peer_port
APISERVER_PORT=$api_port
KCM_PORT=$kcm_port
SCHEDULER_PORT=$sched_port
KWOK_PORT=$kwok_port
EOF
  api="https://127.0.0.1:$api_port"
  local issuer="https://kubernetes.default.svc.cluster.local"

  gen_certs
  log "certificates and keys generated ($(secs_since "$t0") s)"
  write_kubeconfig "$STATE/kubeconfig" admin "$api"
  write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" kube-controller-manager "$api"
  write_kubeconfig "$STATE/kube-scheduler.kubeconfig" kube-scheduler "$api"
  local p="$STATE/pki"

  start etcd "$bin/etcd" \
    --name=infermesh-test \
    --data-dir="$STATE/etcd" \
    --listen-client-urls="http://127.0.0.1:$etcd_port" \
    --advertise-client-urls="http://127.0.0.1:$etcd_port" \
    --listen-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls="http://127.0.0.1:$peer_port" \
    --initial-cluster="infermesh-test=http://127.0.0.1:$peer_port" \
    --unsafe-no-fsync=true \
    --log-level=warn
  wait_for etcd curl -sf "http://127.0.0.1:$etcd_port/health"
  log "etcd ready on 127.0.0.1:$etcd_port ($(secs_since "$t0") s)"

  # Audit: every request of a ServiceAccount (the operator's, the agents'), at Metadata
  # level, so a test can compare what the operator did with what its RBAC grants.
  cat >"$STATE/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: ["system:serviceaccounts"]
  - level: None
POLICY
  start kube-apiserver "$bin/kube-apiserver" \
    --audit-policy-file="$STATE/audit-policy.yaml" \
    --audit-log-path="$STATE/logs/audit.log" \
    --audit-log-format=json \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --bind-address=127.0.0.1 \
    --advertise-address=127.0.0.1 \
    --secure-port="$api_port" \
    --tls-cert-file="$p/apiserver.crt" \
    --tls-private-key-file="$p/apiserver.key" \
    --client-ca-file="$p/ca.crt" \
    --service-account-issuer="$issuer" \
    --api-audiences="$issuer" \
    --service-account-key-file="$p/sa.pub" \
    --service-account-signing-key-file="$p/sa.key" \
    --authorization-mode=Node,RBAC \
    --enable-admission-plugins=NodeRestriction \
    --service-cluster-ip-range=10.96.0.0/16 \
    --endpoint-reconciler-type=none \
    --requestheader-client-ca-file="$p/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$p/front-proxy-client.crt" \
    --proxy-client-key-file="$p/front-proxy-client.key" \
    --allow-privileged=true \
    --profiling=false \
    --v=1
  wait_for kube-apiserver curl -sf --cacert "$p/ca.crt" "$api/readyz"
  log "kube-apiserver $version ready on $api ($(secs_since "$t0") s)"

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig="$STATE/kube-controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$kcm_port" \
    --leader-elect=false \
    --use-service-account-credentials=true \
    --service-account-private-key-file="$p/sa.key" \
    --root-ca-file="$p/ca.crt" \
    --cluster-signing-cert-file="$p/ca.crt" \
    --cluster-signing-key-file="$p/ca.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --controllers='*' \
    --profiling=false \
    --v=1
  wait_for kube-controller-manager curl -sfk "https://127.0.0.1:$kcm_port/healthz"
  log "kube-controller-manager ready ($(secs_since "$t0") s)"

  # DaemonSet pods (and all others) are bound to their node by the scheduler.
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig="$STATE/kube-scheduler.kubeconfig" \
    --bind-address=127.0.0.1 \
    --secure-port="$sched_port" \
    --leader-elect=false \
    --profiling=false \
    --v=1
  wait_for kube-scheduler curl -sfk "https://127.0.0.1:$sched_port/healthz"
  log "kube-scheduler ready ($(secs_since "$t0") s)"

  start kwok "$bin/kwok" \
    --kubeconfig="$STATE/kubeconfig" \
    --config="$bin/../share/kwok-stages.yaml" \
    --manage-all-nodes=false \
    --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip=127.0.0.1 \
    --node-lease-duration-seconds=40 \
    --server-address="127.0.0.1:$kwok_port"
  wait_for kwok curl -sf "http://127.0.0.1:$kwok_port/healthz"
  log "kwok ready ($(secs_since "$t0") s)"

  # The serviceaccount controller creates the `default` ServiceAccount in each namespace.
  wait_for kube-controller-manager curl -sf --cacert "$p/ca.crt" --cert "$p/admin.crt" \
    --key "$p/admin.key" "$api/api/v1/namespaces/default/serviceaccounts/default"
  log "control plane up in $(secs_since "$t0") s (state: $STATE)"
  print_env "$STATE"
}

cmd_env() {
  local s
  s="$(state_dir "${1:-}")"
  [ -f "$s/ports" ] || die "no control plane state in $s"
  print_env "$s"
}

cmd_down() {
  local s name pid pids=() alive
  s="$(state_dir "${1:-}")"
  [ -d "$s" ] || { log "nothing in $s"; return 0; }
  # Every component shuts down gracefully in about 2 s; signal them all at once, and kill
  # what is still alive after 10 s.
  for name in kwok kube-scheduler kube-controller-manager kube-apiserver etcd; do
    [ -f "$s/pids/$name" ] || continue
    pid="$(cat "$s/pids/$name")"
    kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
  done
  for _ in $(seq 1 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  # Only remove what looks like our state dir.
  if [ -f "$s/ports" ] || [ -d "$s/pids" ] || [ -z "$(ls -A "$s")" ]; then
    rm -rf "$s"
  else
    die "$s does not look like a control plane state dir; not removing it"
  fi
  log "down: $s removed"
}

case "${1:-}" in
  build) cmd_build ;;
  up) shift; cmd_up "$@" ;;
  down) shift; cmd_down "$@" ;;
  env) shift; cmd_env "$@" ;;
  bin-dir) bin_dir ;;
  *) die "usage: $0 build | up [DIR] | env [DIR] | down [DIR] | bin-dir" ;;
esac
