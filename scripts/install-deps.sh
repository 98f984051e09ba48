#!/usr/bin/env bash
# Installs what caddy-xks needs to build, test and run its demo
# on Debian: SoftHSM2 (the development HSM), OpenSC's pkcs11-tool, NSS softokn and
# opencryptoki (independent PKCS#11 implementations the tests run; the tests
# start opencryptoki's pkcsslotd themselves), a C compiler
# for cgo, curl (its --aws-sigv4 signer is one of the test clients), openssl
# (the demo makes a stand-in for Managed HSM's client certificate with it),
# Redis, HAProxy and iproute2 (the fleet test and make fleet run a fleet
# sharing Redis behind HAProxy, the test on network namespaces it makes with
# ip), and the pinned golangci-lint.
# Go itself (1.26 or later) must already be on PATH.
set -euo pipefail

need=()
for pkg in softhsm2 opensc libnss3 opencryptoki gcc libc6-dev curl openssl ca-certificates make redis-server haproxy iproute2; do
	dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || need+=("$pkg")
done

if ((${#need[@]})); then
	echo "installing: ${need[*]}"
	sudo=""
	[ "$(id -u)" -eq 0 ] || sudo="sudo"
	$sudo apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

command -v go >/dev/null || { echo "go 1.26 or later is required on PATH" >&2; exit 1; }
go mod download

# golangci-lint at a pinned version (make lint); the Makefile looks for it in
# $(go env GOPATH)/bin, so it is installed there whatever GOBIN says.
golangci_lint_version=2.15.0
golangci_lint="$(go env GOPATH)/bin/golangci-lint"
if ! "$golangci_lint" version --short 2>/dev/null | grep -qx "v\{0,1\}$golangci_lint_version"; then
	echo "installing golangci-lint v$golangci_lint_version"
	GOBIN="$(go env GOPATH)/bin" go install "github.com/golangci/golangci-lint/v2/cmd/golangci-lint@v$golangci_lint_version"
fi
