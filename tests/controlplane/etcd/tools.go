//go:build tools

// Package tools pins the etcd server that backs the test control plane. It is
// never compiled; `go mod tidy` reads its imports to record the dependencies,
// and scripts/controlplane.sh builds the etcd main package
// (go.etcd.io/etcd/server/v3, whose main.go calls etcdmain.Main) with
// `go build`.
package tools

import (
	_ "go.etcd.io/etcd/server/v3"
)
