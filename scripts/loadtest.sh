#!/usr/bin/env bash
# Measures the proxy under load, on loopback: Encrypt of a 32-byte plaintext
# through Caddy + TLS + SigV4 + SoftHSM2, against a bare `respond` route of
# the same server over TLS with the same client, in one run; then the
# latency at KMS's default quota of 1,800 requests/s. Uses the demo's token
# and key (it prepares .demo/ like `make demo`). Figures, not pass/fail:
# client and server share this machine's cores.
#
#   make caddy && bash scripts/loadtest.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=$root/.demo
caddy=$root/bin/caddy
port=${XKS_LOADTEST_PORT:-18543}
duration=${XKS_LOADTEST_DURATION:-10s}
concurrency=${XKS_LOADTEST_CONCURRENCY:-32}

XKS_DEMO_SETUP_ONLY=1 bash scripts/demo.sh >/dev/null
export SOFTHSM2_CONF=$demo/softhsm2.conf
akid=$(grep -o '"AccessKeyId": *"[^"]*"' "$demo/proxy-config.json" | sed 's/.*: *"\(.*\)"/\1/')
config=$(mktemp)
log=$(mktemp)
cat >"$config" <<CADDY
{
	admin unix/$demo/loadtest-admin.sock
	persist_config off
	skip_install_trust
	https_port $port
	http_port $((port + 1))
	storage file_system $demo/storage
	log {
		output discard
	}
	hsm {
		pkcs11 primary {
			module ${XKS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
			token xks-demo
			pin {file.$demo/pin}
			iv auto
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
		}
	}
}
CADDY
"$caddy" run --config "$config" --adapter caddyfile >"$log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null; rm -f "$config" "$log"' EXIT

ca=$demo/storage/pki/authorities/local/root.crt
bench=("$caddy" xks bench --proxy-config "$demo/proxy-config.json" --cacert "$ca" --key demo-key --plaintext 32)
for _ in $(seq 50); do
	"${bench[@]}" "https://localhost:$port" --duration 200ms --concurrency 1 >/dev/null 2>&1 && break
	sleep 0.2
done

echo "== XKS Encrypt (32 B), as fast as $concurrency concurrent requests allow, $duration"
"${bench[@]}" "https://localhost:$port" --duration "$duration" --concurrency "$concurrency" 2>/dev/null | tee /tmp/xks-loadtest-xks.txt
echo
echo "== bare respond route, same server, same client, same request"
"${bench[@]}" "https://localhost:$port/bare" --raw --duration "$duration" --concurrency "$concurrency" 2>/dev/null | tee /tmp/xks-loadtest-bare.txt
xks=$(awk '/^throughput/ {print $2}' /tmp/xks-loadtest-xks.txt)
bare=$(awk '/^throughput/ {print $2}' /tmp/xks-loadtest-bare.txt)
echo
echo "ratio XKS/bare: $(awk -v a="$xks" -v b="$bare" 'BEGIN { printf "%.2f", a / b }')"
echo
echo "== XKS Encrypt (32 B) at 1800 requests/s, $duration"
"${bench[@]}" "https://localhost:$port" --rate 1800 --duration "$duration" --concurrency "$concurrency" 2>/dev/null
