#!/usr/bin/env bash
# Installs the system packages caddy-xks needs to build, test and run its demo
# on Debian: SoftHSM2 (the development HSM), OpenSC's pkcs11-tool, a C compiler
# for cgo, and curl (its --aws-sigv4 signer is one of the test clients).
# Go itself (1.26 or later) must already be on PATH.
set -euo pipefail

need=()
for pkg in softhsm2 opensc gcc libc6-dev curl ca-certificates make; do
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
