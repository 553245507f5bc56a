//go:build tools

// Package tools pins kwok, which simulates kubelets for fake Nodes in the
// test control plane. It is never compiled; `go mod tidy` reads its imports
// to record the dependencies, and scripts/controlplane.sh builds the kwok
// main package with `go build`.
package tools

import (
	_ "sigs.k8s.io/kwok/cmd/kwok"
)
