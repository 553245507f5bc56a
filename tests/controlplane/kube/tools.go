//go:build tools

// Package tools pins the Kubernetes control-plane binaries that the test
// suite builds from source. It is never compiled; `go mod tidy` reads its
// imports to record the dependencies, and scripts/controlplane.sh builds the
// named main packages with `go build`.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
)
