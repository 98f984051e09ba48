#!/usr/bin/env bash
# Capacity at network-HSM latency: `caddy xks bench` at a paced 1,800 req/s
# (KMS's default request quota per external key store) for 60 s, against the
# proxy in front of the nShield personality of the vendor shim
# (internal/vendorshim), which adds a fixed latency to every C_Encrypt and
# C_Decrypt (1, 5 and 20 ms) over SoftHSM2, the time a network HSM's
# client library spends blocked in C. The proxy runs as users run it, the
# audit log written to a file as JSON. Each latency runs with the defaults
# (max_sessions, session_wait, call_timeout; GOMAXPROCS as Caddy sets it,
# the CPU count) and, where the default pool is too small, with the
# recommended one (max_sessions >= 2 x rate x latency; docs/operations.md).
# A benchmark, not a test: the figures depend on the machine, and client and
# server share its cores. It prints one markdown table row per run and the
# load average around each, with the share of CPU time the hypervisor gave
# other guests during it (steal), and the emulated latency as the shim
# actually slept it during the run (VENDORSHIM_LATENCY_LOG): a virtual
# machine's timers wake late, so a "5 ms" HSM call takes longer, and the
# proxy's own share of the p99 is what is left above that, and above how
# late the calls were sent (bench's "sent late": the client's own timers
# wake late too, and every call also waits once all in flight wait for the
# proxy).
#
#   make caddy && bash scripts/capacity.sh
#
# XKS_CAPACITY_DURATION (default 60s), XKS_CAPACITY_WARMUP (5s, at the rate,
# not measured), XKS_CAPACITY_RATE (1800),
# XKS_CAPACITY_LATENCIES (ms, default "1 5 20"), XKS_CAPACITY_PORT (a free
# port the kernel picks), XKS_CAPACITY_GOMAXPROCS (the server's, for every
# run; default Caddy's) and XKS_CADDY (default bin/caddy) change the runs.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
caddy=${XKS_CADDY:-$root/bin/caddy}
duration=${XKS_CAPACITY_DURATION:-60s}
rate=${XKS_CAPACITY_RATE:-1800}
latencies=${XKS_CAPACITY_LATENCIES:-1 5 20}
if [ -n "${XKS_CAPACITY_PORT:-}" ]; then
	port=$XKS_CAPACITY_PORT http_port=$((port + 1))
else
	{ read -r port; read -r http_port; } < <(CGO_ENABLED=0 go run ./tools/freeport 2)
fi
warmup=${XKS_CAPACITY_WARMUP:-5s}
softhsm=${XKS_SOFTHSM2:-/usr/lib/softhsm/libsofthsm2.so}
# shellcheck source=scripts/machine.sh
source "$root/scripts/machine.sh"
[ -x "$caddy" ] || { echo "$caddy is missing: run 'make caddy' first" >&2; exit 1; }

work=$(mktemp -d)
server=
stop() {
	if [ -n "$server" ]; then
		kill "$server" 2>/dev/null || true
		wait "$server" 2>/dev/null || true
		server=
	fi
}
trap 'stop; rm -rf "$work"' EXIT
umask 077

# A SoftHSM2 token of its own under the shim, which shows it as nShield's
# "loadshared accelerator" slot: module protection, no login.
mkdir -p "$work/tokens"
export SOFTHSM2_CONF=$work/softhsm2.conf
printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n' "$work/tokens" >"$SOFTHSM2_CONF"
softhsm2-util --init-token --free --label capacity --pin 1234-capacity --so-pin 5678-capacity >/dev/null
cc -shared -fPIC -O2 -o "$work/vendorshim.so" internal/vendorshim/csrc/vendorshim.c -ldl -lpthread
export VENDORSHIM_TARGET=$softhsm VENDORSHIM_PERSONALITY=nshield VENDORSHIM_TOKEN=capacity

akid=$("$caddy" xks credential --secret-file "$work/secret")

config() { # max_sessions session_wait call_timeout
	cat <<CADDY
{
	admin unix/$work/admin.sock
	persist_config off
	skip_install_trust
	https_port $port
	http_port $http_port
	storage file_system $work/storage
	log {
		output file $work/audit.log
		format json
	}
	hsm {
		pkcs11 primary {
			module $work/vendorshim.so
			token "loadshared accelerator"
			no_login
			iv hsm
			private_keys false
$( [ "$1" = default ] || printf '\t\t\tmax_sessions %s\n\t\t\tsession_wait %s\n\t\t\tcall_timeout %s\n' "$1" "$2" "$3")
		}
	}
}

localhost:$port {
	tls internal
	xks {
		key_store /capacity {
			hsm primary
			region us-east-1
			credential $akid {file.$work/secret}
			keys capacity-key
		}
	}
}
CADDY
}

config default >"$work/Caddyfile"
VENDORSHIM_LATENCY_US=0 "$caddy" xks keygen --config "$work/Caddyfile" --adapter caddyfile --label capacity-key >/dev/null

ca=$work/storage/pki/authorities/local/root.crt
url=https://localhost:$port/capacity/kms/xks/v1
bench=("$caddy" xks bench --access-key-id "$akid" --secret-file "$work/secret" --cacert "$ca" --key capacity-key
	--mix encrypt=1,decrypt=1 --plaintext 32 --concurrency 512)

# run <latency ms> <label> <GOMAXPROCS|default> <max_sessions|default> [session_wait call_timeout]
run() {
	local ms=$1 label=$2 procs=$3 sessions=$4 wait=${5:-} timeout=${6:-}
	config "$sessions" "$wait" "$timeout" >"$work/Caddyfile"
	rm -f "$work"/audit*.log "$work/slept"
	local env=(VENDORSHIM_LATENCY_US=$((ms * 1000)) VENDORSHIM_LATENCY_LOG="$work/slept")
	[ "$procs" = default ] || env+=(GOMAXPROCS="$procs")
	env "${env[@]}" "$caddy" run --config "$work/Caddyfile" --adapter caddyfile >"$work/caddy.log" 2>&1 &
	server=$!
	for _ in $(seq 100); do
		[ -s "$ca" ] && "${bench[@]}" "$url" --duration 200ms --concurrency 1 >/dev/null 2>&1 && break
		sleep 0.2
	done
	# Warm up at the rate, unmeasured: the pool opens its sessions and the
	# key handle is cached, as on a proxy that has been serving (a cold
	# start at full rate is another matter; docs/operations.md).
	"${bench[@]}" "$url" --rate "$rate" --duration "$warmup" >/dev/null 2>&1 || true
	local before after out ticks steal slept
	cp "$work/slept" "$work/slept-before"
	before=$(loadavg)
	ticks=$(cpu_ticks)
	out=$("${bench[@]}" "$url" --rate "$rate" --duration "$duration" 2>/dev/null || true)
	after=$(loadavg)
	steal=$(steal_since "$ticks")
	slept=$(slept_percentiles "$work/slept-before" "$work/slept")
	stop
	printf '%s\n' "$out" >"$work/bench-$ms-$label.txt"
	local thr p50 p99 max late n429 n503 other settings
	thr=$(awk '/^throughput/ {print $2}' <<<"$out")
	p50=$(awk '/^p50/ {print $2}' <<<"$out")
	p99=$(awk '$1 == "p99" {print $2}' <<<"$out")
	max=$(awk '/^max/ {print $2}' <<<"$out")
	late=$(awk '$1 == "sent" && $2 == "late" { l = $6; sub(/,$/, "", l); print l }' <<<"$out")
	n429=$(awk '/ThrottlingException/ {s += $NF} END {print s + 0}' <<<"$out")
	n503=$(awk '/DependencyTimeoutException/ {s += $NF} END {print s + 0}' <<<"$out")
	other=$(awk '/^error/ && !/ThrottlingException|DependencyTimeoutException/ {s += $NF} END {print s + 0}' <<<"$out")
	settings="$sessions, $wait, $timeout"
	[ "$sessions" = default ] && settings="32, 50ms, 200ms"
	[ "$procs" = default ] && procs="$(nproc)"
	printf '| %s ms | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s → %s | %s |\n' \
		"$ms" "$slept" "$label" "$settings" "$procs" "$thr" "$p50" "$p99" "$max" "${late:-n/a}" "$n429" "$n503" "$other" "$before" "$after" "$steal"
}

# slept_percentiles <histogram before> <after>: p50 and p99 of the delays
# the shim slept between the two (VENDORSHIM_LATENCY_LOG's buckets of 50 µs;
# a bucket's upper bound is reported).
slept_percentiles() {
	paste <(od -An -v -tu8 -w8 "$1") <(od -An -v -tu8 -w8 "$2") | awk -v step=50 '
		{ n[NR] = $2 - $1; total += n[NR] }
		END {
			if (total == 0) { print "n/a"; exit }
			for (i = 1; i <= NR; i++) {
				seen += n[i]
				if (!p50 && seen >= 0.5 * total) p50 = i * step
				if (!p99 && seen >= 0.99 * total) p99 = i * step
			}
			printf "%.2f / %.2f ms\n", p50 / 1000, p99 / 1000
		}'
}

echo "caddy xks bench --rate $rate --duration $duration --mix encrypt=1,decrypt=1 --plaintext 32 --concurrency 512 (after $warmup at the rate)"
echo "$(nproc) cores; load average before the runs: $(loadavg)"
echo
echo '| HSM latency | as slept, p50 / p99 | settings | max_sessions, session_wait, call_timeout | GOMAXPROCS | throughput (req/s) | p50 | p99 | max | sent late, p99 | 429 | 503 | other errors | load average (1, 5, 15 min) before → after | CPU stolen |'
echo '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|'
procs=${XKS_CAPACITY_GOMAXPROCS:-default}
for ms in $latencies; do
	run "$ms" default "$procs" default
	# max_sessions >= 2 x rate x latency, in multiples of 8; the default 32
	# where that is enough.
	need=$(((2 * rate * ms + 999) / 1000))
	sessions=$(((need + 7) / 8 * 8))
	[ "$sessions" -le 32 ] || run "$ms" recommended "$procs" "$sessions" 50ms 200ms
done
