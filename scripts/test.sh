#!/usr/bin/env bash
# The whole test suite, as CI runs it (make test): bounded fuzzing, the demo
# end to end, then every Go test under the race detector.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=1

# Caddy writes its autosave and data under the user's config and data
# directories; keep test runs out of the real ones.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
export XDG_DATA_HOME=$scratch/data XDG_CONFIG_HOME=$scratch/config

bash scripts/fuzz.sh
bash scripts/demo-test.sh
go test -race -count=1 -timeout 45m ./...
