#!/usr/bin/env bash
# The fleet behind `make fleet`, for a person to try on one machine: Redis,
# three proxies on the demo's SoftHSM2 token and HAProxy in front of them,
# all on loopback, with the configuration the fleet test runs
# (Caddyfile.example with fleet/storage-redis.caddyfile as its storage, and
# fleet/haproxy.cfg). It prints the balancer's URL and a caddy xks bench
# command against it, runs that bench, prints how the calls spread over the
# three instances (from each instance's metrics), and keeps the fleet
# running until Ctrl-C.
#
# XKS_FLEET_DIR (default .fleet) holds Redis's data and each instance's
# directory and log; the token, keys and credentials are the demo's
# (XKS_DEMO_DIR, default .demo). XKS_FLEET_BENCH_DURATION (10s) is the
# bench's length.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
fleet=${XKS_FLEET_DIR:-$root/.fleet}
caddy=$root/bin/caddy
command -v redis-server >/dev/null || { echo "redis-server is missing: run make deps" >&2; exit 1; }
command -v haproxy >/dev/null || { echo "haproxy is missing: run make deps" >&2; exit 1; }

rm -rf "$fleet"
mkdir -p "$fleet"
chmod 700 "$fleet"
pids=()
stop() {
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
}
trap stop EXIT

# The demo's token, keys, credentials and environment (XKS_*, EKM_*).
trap 'echo "the demo setup failed; its output:" >&2; cat "$fleet/setup.log" >&2' ERR
XKS_DEMO_SETUP_ONLY=1 source scripts/demo.sh >"$fleet/setup.log" 2>&1
trap - ERR
demo=${XKS_DEMO_DIR:-$root/.demo}

# Ports the kernel picked: Redis, the balancer's HTTPS and HTTP, and each
# instance's HTTPS, HTTP and readiness.
mapfile -t ports < <(CGO_ENABLED=0 go run ./tools/freeport 12)

# Redis as production runs it: TLS only, the default user off, an ACL user
# for the proxies with a password, values encrypted by the proxies, and
# every write in its append-only file.
umask 077
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
	-keyout "$fleet/redis.key" -out "$fleet/redis.pem" -subj "/CN=127.0.0.1" -addext subjectAltName=IP:127.0.0.1 2>/dev/null
head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$fleet/redis-password"
head -c 48 /dev/urandom | base64 | tr -d '/+=' | head -c 32 >"$fleet/redis-encryption-key"
cat >"$fleet/redis.conf" <<EOF
bind 127.0.0.1
port 0
tls-port ${ports[0]}
tls-cert-file $fleet/redis.pem
tls-key-file $fleet/redis.key
tls-ca-cert-file $fleet/redis.pem
tls-auth-clients no
dir $fleet
save ""
appendonly yes
protected-mode yes
user default off
user caddy-xks on #$(sha256sum <"$fleet/redis-password" | cut -d' ' -f1) ~caddy-xks ~caddy-xks/* &* +@all -@dangerous
EOF
redis-server "$fleet/redis.conf" >"$fleet/redis.log" 2>&1 &
pids+=($!)
export XKS_REDIS_ADDRESS=127.0.0.1:${ports[0]} XKS_REDIS_USER=caddy-xks XKS_REDIS_CA=$fleet/redis.pem
export XKS_REDIS_PASSWORD_FILE=$fleet/redis-password XKS_REDIS_KEY_FILE=$fleet/redis-encryption-key

# Caddyfile.example with its storage line replaced by the fleet's, as
# docs/operations.md says.
storage_line='	storage file_system {$XKS_STORAGE:/var/lib/caddy}'
grep -qxF "$storage_line" Caddyfile.example || { echo "Caddyfile.example has no storage line to replace" >&2; exit 1; }
awk -v line="$storage_line" -v file=fleet/storage-redis.caddyfile \
	'$0 == line { while ((getline l < file) > 0) print l; next } { print }' Caddyfile.example >"$fleet/Caddyfile"

export XKS_FLEET_SIZE=3 XKS_SHUTDOWN_DELAY=2s XKS_USAGE_FLUSH_INTERVAL=1s
ready() { curl -sf -o /dev/null "http://127.0.0.1:$1/ready"; }
for i in 1 2 3; do
	dir=$fleet/p$i
	mkdir -p "$dir"
	https=${ports[$((3 * i))]} http=${ports[$((3 * i + 1))]} readyp=${ports[$((3 * i + 2))]}
	(
		export HOME=$dir XDG_DATA_HOME=$dir XDG_CONFIG_HOME=$dir XKS_ADMIN=unix/$dir/admin.sock
		export XKS_HTTPS_PORT=$https XKS_HTTP_PORT=$http XKS_READY_PORT=$readyp
		exec "$caddy" run --config "$fleet/Caddyfile" --adapter caddyfile
	) >"$dir/caddy.log" 2>&1 &
	pids+=($!)
	export "XKS_P${i}_HTTPS=127.0.0.1:$https" "XKS_P${i}_HTTP=127.0.0.1:$http" "XKS_P${i}_READY_PORT=$readyp"
	# One at a time: the first makes the local CA the others then share.
	for _ in $(seq 600); do
		ready "$readyp" && break
		kill -0 "${pids[-1]}" 2>/dev/null || { echo "p$i exited; its log: $dir/caddy.log" >&2; tail -n 20 "$dir/caddy.log" >&2; exit 1; }
		sleep 0.2
	done
	ready "$readyp" || { echo "p$i is not ready; its log: $dir/caddy.log" >&2; exit 1; }
done

export XKS_LB_SOCKET=$fleet/haproxy.sock XKS_LB_HTTPS=127.0.0.1:${ports[1]} XKS_LB_HTTP=127.0.0.1:${ports[2]}
haproxy -W -db -f fleet/haproxy.cfg >"$fleet/haproxy.log" 2>&1 &
pids+=($!)

# The instances' local CA, from the shared storage, through p1's admin API.
curl -sS --unix-socket "$fleet/p1/admin.sock" http://localhost/pki/ca/local |
	sed -n 's/.*"root_certificate":"\([^"]*\)".*/\1/p' | sed 's/\\n/\n/g' >"$fleet/root.pem"
url=https://localhost:${ports[1]}
# HTTP/1.1 with 16 keep-alive connections: a TCP balancer spreads
# connections, not calls, so one HTTP/2 connection would meet one instance.
bench=("$caddy" xks bench "$url" --proxy-config "$demo/proxy-config.json" --cacert "$fleet/root.pem"
	--key demo-key --mix encrypt=1,decrypt=1 --rate 300 --http1 --concurrency 16 --duration "${XKS_FLEET_BENCH_DURATION:-10s}")
cat <<EOF

caddy-xks fleet: three proxies behind HAProxy, sharing Redis
  balancer:    $url$uri_path  (region $region)
  instances:   $XKS_P1_HTTPS $XKS_P2_HTTPS $XKS_P3_HTTPS  (readiness on ports ${ports[5]} ${ports[8]} ${ports[11]})
  logs:        $fleet/p1/caddy.log, p2, p3, redis.log, haproxy.log

The bench, through the balancer (HTTP/1.1, 16 connections: the balancer
spreads connections, not calls):

  ${bench[*]}

EOF
requests() { # requests N: the XKS calls instance N has answered
	curl -sS --unix-socket "$fleet/p$1/admin.sock" http://localhost/metrics |
		awk '/^caddy_xks_requests_total\{/ { n += $2 } END { printf "%d", n }'
}
before=()
for i in 1 2 3; do before+=("$(requests "$i")"); done
"${bench[@]}" || true
echo
echo "How the balancer spread the calls (each instance's caddy_xks_requests_total):"
for i in 1 2 3; do
	echo "  p$i: $(($(requests "$i") - before[i - 1]))"
done
echo
echo "The fleet keeps running; Ctrl-C stops it."
wait
