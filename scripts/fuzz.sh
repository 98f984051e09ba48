#!/usr/bin/env bash
# Runs every fuzz target of the module for a bounded number of executions.
# The seed corpora also run as plain tests in `go test`.
#
# The budget is a count, never a duration: with a duration, Go's fuzz
# coordinator can fail a starved worker at the deadline with "context
# deadline exceeded" and no crasher (golang/go#75804, fixed in Go 1.27), so
# a busy machine would turn red for nothing. Each target's count below is
# what 15 s of fuzzing did on a busy 2-core machine (load average 6 to 11),
# so a quieter machine takes less.
#
# FUZZEXECS=N runs every target N executions instead (FUZZEXECS=0 skips
# fuzzing). A crasher is written under the package's testdata/fuzz and fails
# the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export CGO_ENABLED=1

# Executions per target; a target missing here gets the default.
declare -A execs=(
	[FuzzGlob]=150000
	[FuzzParseARN]=300000
	[FuzzParseAuthorization]=350000
	[FuzzParseAmzDate]=250000
	[FuzzVerify]=350000
	[FuzzDecodeRequest]=50000
	[FuzzDecodeEKMRequest]=15000
	[FuzzDecodeStrict]=50000
	[FuzzMetadataVersion]=25000
)
default_execs=50000

for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for target in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		n=${FUZZEXECS:-${execs[$target]:-$default_execs}}
		[ "$n" -gt 0 ] || continue
		echo "fuzzing $pkg $target for $n executions"
		go test -run='^$' -fuzz="^${target}\$" -fuzztime="${n}x" "$pkg"
	done
done
