#!/usr/bin/env bash
# Where one Encrypt's time goes, server side: scripts/loadtest.sh against
# a build of the proxy with the block and mutex profiles on
# (tools/profcaddy), with a CPU, block and mutex profile and an execution
# trace of the paced XKS run (10 s, 3 s of trace) and a CPU profile of the
# full-speed XKS run (3 s) saved from the admin endpoint; then the server's
# CPU per request split by component (from each CPU profile), the HSM time
# from the metrics, and what goroutines waited on
# (block and mutex profiles, the trace's scheduler, sync and syscall
# latency).
#
#   make caddy && bash scripts/profile.sh [dir]     # dir: where the profiles go (a new temporary one)
#
# The loadtest's variables apply; XKS_LOADTEST_DURATION,
# XKS_LOADTEST_PACED_DURATION, XKS_LOADTEST_ROUNDS and
# XKS_LOADTEST_PROTOCOLS default here to 5s, 20s, 1 and h2 (http1 profiles
# HTTP/1.1 instead).
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-$(mktemp -d /tmp/xks-profile.XXXXXX)}
mkdir -p "$dir"
go build -o "$dir/caddy" ./tools/profcaddy
XKS_LOADTEST_DURATION=${XKS_LOADTEST_DURATION:-5s} XKS_LOADTEST_PACED_DURATION=${XKS_LOADTEST_PACED_DURATION:-20s} \
	XKS_LOADTEST_ROUNDS=${XKS_LOADTEST_ROUNDS:-1} XKS_LOADTEST_PROTOCOLS=${XKS_LOADTEST_PROTOCOLS:-h2} \
	XKS_LOADTEST_CADDY=$dir/caddy XKS_LOADTEST_PROFILE=$dir bash scripts/loadtest.sh | tee "$dir/loadtest.txt"

pprof() { go tool pprof -nodefraction=0 -edgefraction=0 -nodecount=100000 "$@" 2>/dev/null; }
# seconds <profile> <regexp> [<ignore regexp>]: CPU seconds of the samples
# with a frame matching it.
seconds() {
	pprof -top ${2:+-focus="$2"} ${3:+-ignore="$3"} "$1" |
		awk '/^Showing nodes accounting for/ { v = $5; sub(/,$/, "", v); if (v ~ /ms$/) { sub(/ms$/, "", v); v /= 1000 } else if (v ~ /us$/) { sub(/us$/, "", v); v /= 1e6 } else sub(/s$/, "", v); print v + 0; found = 1 } END { if (!found) print 0 }'
}
# components <profile> <requests in the profile's span>: the server's CPU
# split by component, as a Markdown table.
components() {
	local profile=$1 requests=$2 total
	total=$(seconds "$profile" "")
	echo "| component | frames | share of server CPU | per request |"
	echo "|---|---|---|---|"
	row() {
		local s
		s=$(seconds "$profile" "$2" "${3:-}")
		awk -v name="$1" -v re="$2${3:+, not $3}" -v s="$s" -v t="$total" -v n="$requests" \
			'BEGIN { printf "| %s | `%s` | %.1f%% | %.1f µs |\n", name, re, 100 * s / t, 1e6 * s / n }'
	}
	awk -v s="$total" -v n="$requests" 'BEGIN { printf "| all of the server | `.` | 100.0%% | %.1f µs |\n", 1e6 * s / n }'
	row "whole XKS handler" 'xkshandler\.\(\*Handler\)\.ServeHTTP'
	row "SigV4 verification" 'sigv4auth\.'
	row "JSON decode and validation" 'xkshandler\.decodeRequest'
	row "authorization (allow-list, policy, admission)" 'xkshandler\.admitKeyCall'
	row "hsm layer, PKCS#11 calls (cgo)" 'runtime\.cgocall' 'runtime\.mstart'
	row "hsm layer, all of it" 'hsm\.\(\*Backend\)\.(Encrypt|work|run)$'
	row "JSON encode and write" 'xkshandler\.\(\*Handler\)\.respond'
	row "audit log line" 'xkshandler\.\(\*exchange\)\.log'
	row "log file: writes, rolling and gzip of rolled files" 'timberjack|lumberjack|compress/'
	row "metrics (Prometheus)" 'xkshandler\.\(\*exchange\)\.observe|prometheus'
	row "TLS (record layer, handshakes)" 'crypto/tls\.'
	row "HTTP server outside the handler" 'net/http\.\(\*conn\)\.serve|net/http\.\(\*http2serverConn\)' 'xkshandler\.\(\*Handler\)\.ServeHTTP|crypto/tls\.'
	row "garbage collector" 'runtime\.gcBgMarkWorker|runtime\.gcAssistAlloc|runtime\.bgsweep|runtime\.bgscavenge'
	row "scheduler (finding work, idle, wakeups)" 'runtime\.schedule|runtime\.findRunnable|runtime\.mcall|runtime\.park_m|runtime\.wakep|runtime\.startm|runtime\.notewakeup'
	row "network poller and syscalls" 'runtime\.netpoll|syscall\.Syscall|internal/poll'
}
rate=${XKS_LOADTEST_RATE:-1800}
cpu_per=$(awk '$1 == "server" && $2 == "cpu" { print $(NF - 2) }' "$dir/bench.txt")
full_rps=$(awk '$1 == "throughput" { print $2 }' "$dir/bench-full.txt")
full_cpu_per=$(awk '$1 == "server" && $2 == "cpu" { print $(NF - 2) }' "$dir/bench-full.txt")

echo
echo "== server CPU by component, full-speed XKS run ($full_rps req/s; profile of 3 s; $full_cpu_per of CPU per request over the run)"
echo
components "$dir/cpu-full.pprof" "$((full_rps * 3))"
echo
echo "== server CPU by component, paced XKS run ($rate req/s; profile of 10 s; $cpu_per of CPU per request over the run)"
echo
components "$dir/cpu.pprof" "$((rate * 10))"

echo
echo "== HSM time per request (caddy_xks_hsm_duration_seconds over the paced run)"
awk '
	FNR == 1 { f++ }
	/^caddy_xks_hsm_duration_seconds_(sum|count)\{.*operation="Encrypt"/ { split($1, n, "{"); v[f, n[1]] = $2 }
	/^caddy_xks_hsm_duration_seconds_bucket\{.*operation="Encrypt".*le="0.005"/ { v[f, "le5ms"] = $2 }
	/^caddy_xks_hsm_duration_seconds_bucket\{.*operation="Encrypt".*le="0.0005"/ { v[f, "le500us"] = $2 }
	END {
		c = v[2, "caddy_xks_hsm_duration_seconds_count"] - v[1, "caddy_xks_hsm_duration_seconds_count"]
		s = v[2, "caddy_xks_hsm_duration_seconds_sum"] - v[1, "caddy_xks_hsm_duration_seconds_sum"]
		if (c > 0) printf "%d calls, mean %.0f µs, %.2f%% over 0.5 ms, %.3f%% over 5 ms\n", c, 1e6 * s / c,
			100 * (c - (v[2, "le500us"] - v[1, "le500us"])) / c, 100 * (c - (v[2, "le5ms"] - v[1, "le5ms"])) / c
	}' "$dir/metrics-before.txt" "$dir/metrics-after.txt"

echo
echo "== blocking (block profile, 10 s): top 15 by delay"
go tool pprof -top -nodecount=15 "$dir/block.pprof" 2>/dev/null | sed -n '/ flat /,$p'
echo
echo "== lock contention (mutex profile, 10 s): top 15 by delay"
go tool pprof -top -nodecount=15 "$dir/mutex.pprof" 2>/dev/null | sed -n '/ flat /,$p'
for kind in sched sync syscall; do
	go tool trace -pprof="$kind" "$dir/trace.out" >"$dir/trace-$kind.pprof" 2>/dev/null || continue
	echo
	echo "== execution trace (3 s): $kind latency, top 15"
	go tool pprof -top -nodecount=15 "$dir/trace-$kind.pprof" 2>/dev/null | sed -n '/ flat /,$p'
done
echo
echo "profiles, trace and metrics: $dir"
