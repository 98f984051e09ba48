#!/usr/bin/env bash
# Measures the proxy under load, on loopback, as a user would compare it:
# Encrypt of a 32-byte plaintext through Caddy + TLS + SigV4 + SoftHSM2
# against a bare `respond` route of the same server over TLS, with the same
# client (`caddy xks bench`) and the same signed request, in one run:
#
#   1. XKS Encrypt, as fast as XKS_LOADTEST_CONCURRENCY requests allow
#   2. the bare route, likewise; 1 and 2 in XKS_LOADTEST_ROUNDS (3) rounds,
#      each with its XKS/bare ratio, and their median
#   3. XKS Encrypt paced at XKS_LOADTEST_RATE (KMS's quota, 1,800 req/s)
#   4. the bare route paced likewise
#
# 1 to 4 run over each protocol of XKS_LOADTEST_PROTOCOLS ("h2 http1"):
# HTTP/2, one connection with the requests multiplexed on it, then
# HTTP/1.1, a keep-alive connection per request in flight. KMS may use
# either (the spec requires HTTP/1.1 and allows HTTP/2).
#
# The server runs the production shape: the settings of Caddyfile.example
# (session pool, deadlines, server timeouts), the audit log on and written
# to a file as JSON, Caddy's HTTP metrics on. Each run prints req/s,
# p50/p99/p99.9/max (for a paced run counted from when each request was
# due, and the p99 of how late they were sent: part of every latency, the
# client's own delay unless all requests in flight wait for the server),
# the failures by XKS errorName and the server's and the client's CPU time
# per request (/proc/<pid>/stat: on shared cores, the two together are
# what bounds the throughput); a Markdown table of all runs, dated, with
# the machine, the load average before and after each run and the share of
# CPU time the hypervisor gave other guests during it (steal), ends the
# output. Uses the demo's token and key (it prepares .demo/ like `make
# demo`). Figures, not pass/fail: client and server share the cores.
#
#   make loadtest        # or: make caddy && bash scripts/loadtest.sh
#
# XKS_LOADTEST_DURATION (10s) is the length of each run 1 and 2,
# XKS_LOADTEST_PACED_DURATION (60s) that of runs 3 and 4,
# XKS_LOADTEST_CONCURRENCY (32) the requests in flight, XKS_LOADTEST_RATE
# (1800) the paced rate, XKS_LOADTEST_PORT (a free one) the HTTPS port,
# XKS_LOADTEST_CADDY (bin/caddy) the binary under test,
# XKS_LOADTEST_MAX_SESSIONS (32, Caddyfile.example's) the session pool,
# XKS_LOADTEST_PROTOCOLS (h2 http1) the protocols, in order. With
# XKS_LOADTEST_PROFILE=<dir> (scripts/profile.sh sets it) the paced XKS run
# of the first protocol also saves, from the admin endpoint, a CPU, block
# and mutex profile and an execution trace of its middle, and the metrics
# before and after it, and its first full-speed XKS run a CPU profile of
# 3 s (cpu-full.pprof).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
caddy=${XKS_LOADTEST_CADDY:-$root/bin/caddy}
duration=${XKS_LOADTEST_DURATION:-10s}
paced_duration=${XKS_LOADTEST_PACED_DURATION:-60s}
concurrency=${XKS_LOADTEST_CONCURRENCY:-32}
rounds=${XKS_LOADTEST_ROUNDS:-3}
rate=${XKS_LOADTEST_RATE:-1800}
protocols=${XKS_LOADTEST_PROTOCOLS:-h2 http1}
# The protocol whose runs XKS_LOADTEST_PROFILE profiles: the first.
profiled=${protocols%% *}
if [ -n "${XKS_LOADTEST_PORT:-}" ]; then
	port=$XKS_LOADTEST_PORT http_port=$((port + 1))
else
	{ read -r port; read -r http_port; } < <(CGO_ENABLED=0 go run ./tools/freeport 2)
fi

XKS_DEMO_SETUP_ONLY=1 bash scripts/demo.sh >/dev/null
export SOFTHSM2_CONF=$demo/softhsm2.conf
akid=$(grep -o '"AccessKeyId": *"[^"]*"' "$demo/proxy-config.json" | sed 's/.*: *"\(.*\)"/\1/')
work=$(mktemp -d)
config=$work/Caddyfile
cat >"$config" <<CADDY
{
	admin unix/$work/admin.sock
	persist_config off
	skip_install_trust
	https_port $port
	http_port $http_port
	storage file_system $demo/storage
	metrics
	log {
		output file $work/caddy.log
		format json
	}
	servers {
		timeouts {
			read_header 5s
			read_body 5s
			idle 5m
		}
	}
	hsm {
		pkcs11 primary {
			module ${XKS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
			token xks-demo
			pin {file.$demo/pin}
			iv auto
			private_keys true
			max_sessions ${XKS_LOADTEST_MAX_SESSIONS:-32}
			session_wait 50ms
			call_timeout 200ms
		}
	}
}

localhost:$port {
	tls internal
	handle /bare {
		respond \`{"ok":true}\` 200
	}
	xks {
		key_store /demo {
			hsm primary
			region us-east-1
			credential $akid {file.$demo/sigv4-secret-1}
			keys demo-key
			ciphertext_metadata eGtzMQ==
			deadline 200ms
		}
	}
}
CADDY
"$caddy" run --config "$config" --adapter caddyfile >"$work/stdout" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT

ca=$demo/storage/pki/authorities/local/root.crt
bench=("$caddy" xks bench --proxy-config "$demo/proxy-config.json" --cacert "$ca" --key demo-key --plaintext 32 --concurrency "$concurrency" --server-pid "$server")
for _ in $(seq 50); do
	"${bench[@]}" "https://localhost:$port" --duration 200ms >/dev/null 2>&1 && break
	kill -0 $server 2>/dev/null || { cat "$work/stdout" >&2; exit 1; }
	sleep 0.2
done
# Warm-up: TLS session and key handle caches, the Go heap, SoftHSM2.
"${bench[@]}" "https://localhost:$port" --duration 2s >/dev/null 2>&1 || true

# shellcheck source=scripts/machine.sh
source "$root/scripts/machine.sh"
admin() { curl -sS --unix-socket "$work/admin.sock" "http://localhost/$1"; }
rows=()
# run <title> <name> <bench args...>: one run, printed, and its table row.
run() {
	local title=$1 name=$2 out before after ticks steal
	shift 2
	echo "== $title"
	before=$(loadavg)
	ticks=$(cpu_ticks)
	local profiling=
	if [ -n "${XKS_LOADTEST_PROFILE:-}" ] && [ "$name" = "$profiled-xks-paced" ]; then
		profiling=1
		admin metrics >"$XKS_LOADTEST_PROFILE/metrics-before.txt"
		(
			sleep 5
			admin "debug/pprof/profile?seconds=10" >"$XKS_LOADTEST_PROFILE/cpu.pprof" &
			admin "debug/pprof/block?seconds=10" >"$XKS_LOADTEST_PROFILE/block.pprof" &
			admin "debug/pprof/mutex?seconds=10" >"$XKS_LOADTEST_PROFILE/mutex.pprof" &
			wait
			admin "debug/pprof/trace?seconds=3" >"$XKS_LOADTEST_PROFILE/trace.out"
		) &
		profiling=$!
	elif [ -n "${XKS_LOADTEST_PROFILE:-}" ] && [ "$name" = "$profiled-xks-1" ]; then
		# The full-speed run: a CPU profile of 3 s after the first.
		(
			sleep 1
			admin "debug/pprof/profile?seconds=3" >"$XKS_LOADTEST_PROFILE/cpu-full.pprof"
		) &
		profiling=$!
	fi
	out=$("${bench[@]}" "$@" 2>/dev/null) || true
	after=$(loadavg)
	steal=$(steal_since "$ticks")
	if [ -n "$profiling" ]; then
		wait "$profiling"
		if [ "$name" = "$profiled-xks-paced" ]; then
			admin metrics >"$XKS_LOADTEST_PROFILE/metrics-after.txt"
			printf '%s\n' "$out" >"$XKS_LOADTEST_PROFILE/bench.txt"
		else
			printf '%s\n' "$out" >"$XKS_LOADTEST_PROFILE/bench-full.txt"
		fi
	fi
	echo "$out"
	echo "load average $before → $after; CPU time stolen by the hypervisor: $steal"
	echo
	printf '%s\n' "$out" >"$work/$name.txt"
	local errors
	errors=$(awk '$1 == "error" { $1 = ""; sub(/^ /, ""); printf "%s%s", sep, $0; sep = "; " }' <<<"$out")
	rows+=("$(awk -v title="$title" -v errors="${errors:-none}" -v load="$before → $after" -v steal="$steal" '
		$1 == "throughput" { rps = $2 }
		$1 == "p50" { p50 = $2 } $1 == "p99" { p99 = $2 } $1 == "p99.9" { p999 = $2 } $1 == "max" { mx = $2 }
		$1 == "server" && $2 == "cpu" { cpu = $(NF - 2) }
		$1 == "client" && $2 == "cpu" { client = $(NF - 2) }
		$1 == "sent" && $2 == "late" { late = $6; sub(/,$/, "", late) }
		END { printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |", title, rps, p50, p99, p999, mx, late ? late : "–", errors, cpu, client, load, steal }' <<<"$out")")
}

# Each protocol in turn: HTTP/2 over one connection, and HTTP/1.1 over a
# keep-alive connection per request in flight (--http1), the shape of the
# client that issue 14's figures came from. The full-speed pair runs in
# rounds, XKS then bare, so that both meet the same moments of a shared
# machine; each round's ratio is reported.
ratio_lines=()
for proto in $protocols; do
	case $proto in
	h2) label=HTTP/2 args=() ;;
	http1) label=HTTP/1.1 args=(--http1) ;;
	*) echo "XKS_LOADTEST_PROTOCOLS: unknown protocol $proto (h2, http1)" >&2; exit 1 ;;
	esac
	for r in $(seq "$rounds"); do
		run "$label, XKS Encrypt 32 B, $concurrency concurrent, as fast as possible, $duration, round $r" "$proto-xks-$r" \
			"https://localhost:$port" "${args[@]}" --duration "$duration"
		run "$label, bare route, same server, same request, as fast as possible, $duration, round $r" "$proto-bare-$r" \
			"https://localhost:$port/bare" "${args[@]}" --raw --duration "$duration"
	done
	run "$label, XKS Encrypt 32 B at $rate req/s, $paced_duration" "$proto-xks-paced" \
		"https://localhost:$port" "${args[@]}" --rate "$rate" --duration "$paced_duration"
	run "$label, bare route at $rate req/s, $paced_duration" "$proto-bare-paced" \
		"https://localhost:$port/bare" "${args[@]}" --raw --rate "$rate" --duration "$paced_duration"

	[ "$rounds" -gt 0 ] || continue
	ratios=()
	for r in $(seq "$rounds"); do
		ratios+=("$(awk '$1 == "throughput" { t[FILENAME] = $2 } END { printf "%.2f", t[ARGV[1]] / t[ARGV[2]] }' "$work/$proto-xks-$r.txt" "$work/$proto-bare-$r.txt")")
	done
	median=$(printf '%s\n' "${ratios[@]}" | sort -n | awk '{ v[NR] = $1 } END { printf "%.2f", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }')
	ratio_lines+=("$label, XKS/bare, as fast as possible, by round: ${ratios[*]}; median $median")
done
# Caddy rolls the log at 100 MB and gzips the rolled file; count them all.
audit=$(for f in "$work"/caddy*.log*; do zcat -f "$f"; done | grep -c '"logger":"http.handlers.xks.audit"' || true)
cpu=$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)

echo "== summary"
echo
echo "$(date -u +%Y-%m-%d), $(nproc) CPUs ($cpu), Linux $(uname -r), $(softhsm2-util --version 2>/dev/null | sed 's/^/SoftHSM2 /'), $("$caddy" version | cut -d' ' -f1),"
echo "client and server on the same cores; audit log on ($audit lines written to a file), metrics on"
echo
echo "| run | req/s | p50 | p99 | p99.9 | max | sent late, p99 | errors | server CPU per request | client CPU per request | load average before → after | CPU stolen |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if ((${#ratio_lines[@]})); then
	echo
	printf '%s\n' "${ratio_lines[@]}"
fi
