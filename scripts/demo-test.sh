#!/usr/bin/env bash
# Runs `make demo` in the background as a new user would, waits until the key
# store answers GetHealthStatus, does an Encrypt/Decrypt round trip with the
# credentials from $XKS_DEMO_DIR/proxy-config.json (signed by curl --aws-sigv4),
# then calls the Azure EKM front end of the same proxy over mutual TLS (info,
# metadata, RSA-OAEP and A256KWP round trips, a call without a client
# certificate), and stops the demo. Exits non-zero if any step fails.
#
# It must hold on a busy machine and beside a running demo: the demo's
# directory is a temporary one, its ports are ones the kernel picked (Caddy
# binds with SO_REUSEPORT, so a fixed port could be shared with another
# run), and the HSM timeouts are seconds instead of the production 200 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
log=$(mktemp)
export XKS_DEMO_DIR
XKS_DEMO_DIR=$(mktemp -d)
if [ -n "${XKS_DEMO_PORT:-}" ]; then
	port=$XKS_DEMO_PORT http_port=${XKS_DEMO_HTTP_PORT:-$((port + 1))} ready_port=${XKS_DEMO_READY_PORT:-$((port + 2))}
else
	{ read -r port; read -r http_port; read -r ready_port; } < <(go run ./tools/freeport 3)
fi
export XKS_DEMO_PORT=$port XKS_DEMO_HTTP_PORT=$http_port XKS_DEMO_READY_PORT=$ready_port
export XKS_HSM_CALL_TIMEOUT=30s XKS_HSM_SESSION_WAIT=10s XKS_DEADLINE=30s
base=https://localhost:$port/demo/kms/xks/v1
ca=$XKS_DEMO_DIR/storage/pki/authorities/local/root.crt

setsid make demo >"$log" 2>&1 &
demo=$!
stop() {
	kill -TERM -- "-$demo" 2>/dev/null || true
	wait "$demo" 2>/dev/null || true
}
trap 'stop; rm -rf "$log" "$XKS_DEMO_DIR"' EXIT
fail() {
	echo "demo test: $*" >&2
	echo "--- make demo output (last 60 lines) ---" >&2
	tail -n 60 "$log" >&2
	exit 1
}

field() { # field NAME JSON: the string value of a top-level JSON field
	grep -o "\"$1\" *: *\"[^\"]*\"" <<<"$2" | head -n 1 | sed 's/.*: *"\(.*\)"/\1/'
}

# xks CALL BODY: one signed XKS call; prints the body, then the status.
xks() {
	# The credential goes to curl through a pipe, not its arguments (ps).
	curl -sS --max-time 60 --cacert "$ca" \
		--aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" -K <(printf 'user = "%s:%s"\n' "$akid" "$secret") \
		-H 'Content-Type: application/json' -d "$2" -w '\n%{http_code}' "$base/$1"
}

# The first run builds the binary with xcaddy, so allow several minutes.
deadline=$((SECONDS + 600))
status=""
while ((SECONDS < deadline)); do
	kill -0 "$demo" 2>/dev/null || fail "make demo exited early"
	if [ -s $XKS_DEMO_DIR/proxy-config.json ] && [ -s "$ca" ]; then
		config=$(cat $XKS_DEMO_DIR/proxy-config.json)
		akid=$(field AccessKeyId "$config")
		secret=$(field RawSecretAccessKey "$config")
		if out=$(xks health '{"requestMetadata":{"kmsRequestId":"demo-test-1","kmsOperation":"KmsHealthCheck"}}' 2>/dev/null); then
			status=$(tail -n 1 <<<"$out")
			[ "$status" = 200 ] && break
		fi
	fi
	sleep 2
done
[ "$status" = 200 ] || fail "GetHealthStatus never answered 200 (last status: ${status:-none})"
# The load balancer's probe of Caddyfile.example, as the demo prints it.
ready=$(curl -sS --max-time 60 -o /dev/null -w '%{http_code}' "http://localhost:$ready_port/ready") || fail "the readiness probe did not answer"
[ "$ready" = 200 ] || fail "the readiness probe answered $ready, want 200"
grep -q '"healthStatus":"ACTIVE"' <<<"$out" || fail "health is not ACTIVE: $out"
[ "$(field XksProxyUriPath "$config")" = /demo/kms/xks/v1 ] || fail "proxy-config.json has the wrong XksProxyUriPath"

meta='"requestMetadata":{"awsPrincipalArn":"arn:aws:iam::111122223333:user/demo","kmsKeyArn":"arn:aws:kms:us-east-1:111122223333:key/demo","kmsOperation":"Encrypt","kmsRequestId":"demo-test-2"}'
plaintext=$(head -c 32 /dev/urandom | base64)
aad=$(printf 'demo=1' | base64)
out=$(xks keys/demo-key/encrypt "{$meta,\"plaintext\":\"$plaintext\",\"encryptionAlgorithm\":\"AES_GCM\",\"additionalAuthenticatedData\":\"$aad\",\"ciphertextDataIntegrityValueAlgorithm\":\"SHA_256\"}")
[ "$(tail -n 1 <<<"$out")" = 200 ] || fail "Encrypt failed: $out"
body=$(head -n 1 <<<"$out")
ciphertext=$(field ciphertext "$body")
iv=$(field initializationVector "$body")
tag=$(field authenticationTag "$body")
md=$(field ciphertextMetadata "$body")
[ -n "$ciphertext" ] && [ -n "$iv" ] && [ -n "$tag" ] || fail "Encrypt response is incomplete: $body"

out=$(xks keys/demo-key/decrypt "{$meta,\"ciphertext\":\"$ciphertext\",\"ciphertextMetadata\":\"$md\",\"initializationVector\":\"$iv\",\"authenticationTag\":\"$tag\",\"encryptionAlgorithm\":\"AES_GCM\",\"additionalAuthenticatedData\":\"$aad\"}")
[ "$(tail -n 1 <<<"$out")" = 200 ] || fail "Decrypt failed: $out"
[ "$(field plaintext "$(head -n 1 <<<"$out")")" = "$plaintext" ] || fail "Decrypt returned another plaintext"

out=$(xks keys/demo-encrypt-only/decrypt "{$meta,\"ciphertext\":\"$ciphertext\",\"initializationVector\":\"$iv\",\"authenticationTag\":\"$tag\",\"encryptionAlgorithm\":\"AES_GCM\"}")
grep -q InvalidKeyUsageException <<<"$out" || fail "decrypt with demo-encrypt-only was not InvalidKeyUsageException: $out"

# The Azure EKM front end of the same proxy, with the demo's client
# certificate, as Managed HSM calls it.
ekm_base=https://ekm.localhost:$port/demo-ekm
ekm() { # ekm PATH BODY [curl options]: one EKM call; prints the body, then the status.
	local path=$1 body=$2
	shift 2
	curl -sS --max-time 60 --cacert "$ca" --resolve "ekm.localhost:$port:127.0.0.1" \
		-H 'Content-Type: application/json' -d "$body" -w '\n%{http_code}' "$@" "$ekm_base/$path?api-version=0.1-preview"
}
client=(--cert "$XKS_DEMO_DIR/mhsm-client.pem" --key "$XKS_DEMO_DIR/mhsm-client.key")
context='"request_context":{"request_id":"demo-test-3","correlation_id":"demo-test-4","pool_name":"demo"}'
b64url() { base64 -w0 | tr '+/' '-_' | tr -d '='; }
out=$(ekm info "{$context}" "${client[@]}")
[ "$(tail -n 1 <<<"$out")" = 200 ] && grep -q '"api_version":"0.1-preview"' <<<"$out" || fail "EKM info failed: $out"
out=$(ekm demo-kek-rsa/metadata "{$context}" "${client[@]}")
grep -q '"key_type":"RSA","key_size":2048' <<<"$out" && grep -q '"e":"AQAB"' <<<"$out" || fail "EKM metadata failed: $out"
dek=$(head -c 32 /dev/urandom | b64url)
for spec in demo-kek-rsa:RSA-OAEP demo-kek-aes:A256KWP; do
	key=${spec%%:*} alg=${spec#*:}
	out=$(ekm "$key/wrapkey" "{$context,\"alg\":\"$alg\",\"value\":\"$dek\"}" "${client[@]}")
	[ "$(tail -n 1 <<<"$out")" = 200 ] || fail "EKM wrapkey with $key failed: $out"
	wrapped=$(field value "$(head -n 1 <<<"$out")")
	out=$(ekm "$key/unwrapkey" "{$context,\"alg\":\"$alg\",\"value\":\"$wrapped\"}" "${client[@]}")
	[ "$(tail -n 1 <<<"$out")" = 200 ] || fail "EKM unwrapkey with $key failed: $out"
	[ "$(field value "$(head -n 1 <<<"$out")")" = "$dek" ] || fail "EKM unwrapkey with $key returned another key"
done
out=$(ekm info "{$context}")
[ "$(tail -n 1 <<<"$out")" = 401 ] || fail "EKM info without a client certificate was not 401: $out"

# The operator's own check and a short load, as the README shows them.
bin/caddy xks check "https://localhost:$port" --proxy-config "$XKS_DEMO_DIR/proxy-config.json" --cacert "$ca" \
	--key demo-key --encrypt-only-key demo-encrypt-only --max-p99 1m || fail "caddy xks check failed against the demo"
bin/caddy xks bench "https://localhost:$port" --proxy-config "$XKS_DEMO_DIR/proxy-config.json" --cacert "$ca" \
	--key demo-key --duration 2s --concurrency 8 --mix encrypt=3,decrypt=1 || fail "caddy xks bench failed against the demo"

# The binary built from xcaddy.json carries every module of the plugin.
modules=$(bin/caddy list-modules)
for m in hsm http.handlers.xks http.handlers.azure_ekm tls.client_auth.verifier.xks_subject; do
	grep -qx "$m" <<<"$modules" || fail "caddy list-modules does not show $m"
done

# Running the demo again reuses its token and keys.
stop
XKS_DEMO_SETUP_ONLY=1 bash scripts/demo.sh >>"$log" 2>&1 || fail "second demo setup failed"
tokens=$(SOFTHSM2_CONF=$XKS_DEMO_DIR/softhsm2.conf softhsm2-util --show-slots | grep -Ec 'Label: *xks-demo *$' || true)
[ "$tokens" = 1 ] || fail "a second run left $tokens tokens labelled xks-demo"
keys=$(SOFTHSM2_CONF=$XKS_DEMO_DIR/softhsm2.conf pkcs11-tool --module "${XKS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}" --token-label xks-demo \
	--login --pin "$(cat "$XKS_DEMO_DIR/pin")" --list-objects --type secrkey 2>/dev/null | grep -c 'label:' || true)
# The four XKS keys and the EKM front end's AES key (its RSA key pair is
# no secret key).
[ "$keys" = 5 ] || fail "a second run left $keys secret keys on the demo token, want 5"

echo "demo test: health ACTIVE, Encrypt/Decrypt round trip, key usage check, EKM over mutual TLS and re-run passed"
