#!/usr/bin/env bash
# The whole test suite, as CI runs it (make test): bounded fuzzing, the demo
# end to end, then every Go test under the race detector, the fleet test
# last and alone (it runs three proxies, Redis and HAProxy, and times lock
# leases: the other packages' tests would share its two cores). Both runs go
# through tools/testreport, which prints every skipped test with its reason
# and the count, and fails on a failed test or a skip that
# scripts/allowed-skips.txt does not name.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=1
# A missing or broken component fails its tests here, whatever a
# developer's environment says (internal/testenv).
unset XKS_TEST_ALLOW_MISSING

# Caddy writes its autosave and data under the user's config and data
# directories; keep test runs out of the real ones.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export XDG_DATA_HOME=$scratch/data XDG_CONFIG_HOME=$scratch/config

bash scripts/fuzz.sh
bash scripts/demo-test.sh
# Built before the tests start, so that a report tool that does not build
# fails the run at once rather than after it.
go build -o "$scratch/testreport" ./tools/testreport
packages=$(go list ./... | grep -v '/fleet$')
# go test's own exit status is not needed: testreport fails the run on
# any failed test, package or build, from the events.
{
	go test -json -race -count=1 -timeout 45m $packages || true
	go test -json -race -count=1 -timeout 20m ./fleet/ || true
} | "$scratch/testreport" -allow scripts/allowed-skips.txt
