#!/usr/bin/env bash
# Runs `make demo` in the background as a new user would, waits until the key
# store answers GetHealthStatus, does an Encrypt/Decrypt round trip with the
# credentials from .demo/proxy-config.json (signed by curl --aws-sigv4), and
# stops the demo. Exits non-zero if any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
port=${XKS_DEMO_PORT:-18443}
log=$(mktemp)
base=https://localhost:$port/demo/kms/xks/v1
ca=$root/.demo/storage/pki/authorities/local/root.crt

XKS_DEMO_PORT=$port setsid make demo >"$log" 2>&1 &
demo=$!
stop() {
	kill -TERM -- "-$demo" 2>/dev/null || true
	wait "$demo" 2>/dev/null || true
}
trap 'stop; rm -f "$log"' EXIT
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
	curl -sS --max-time 5 --cacert "$ca" \
		--aws-sigv4 "aws:amz:us-east-1:kms-xks-proxy" --user "$akid:$secret" \
		-H 'Content-Type: application/json' -d "$2" -w '\n%{http_code}' "$base/$1"
}

# The first run builds the binary with xcaddy, so allow several minutes.
deadline=$((SECONDS + 600))
status=""
while ((SECONDS < deadline)); do
	kill -0 "$demo" 2>/dev/null || fail "make demo exited early"
	if [ -s .demo/proxy-config.json ] && [ -s "$ca" ]; then
		config=$(cat .demo/proxy-config.json)
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

# The operator's own check and a short load, as the README shows them.
bin/caddy xks check "https://localhost:$port" --proxy-config .demo/proxy-config.json --cacert "$ca" \
	--key demo-key --encrypt-only-key demo-encrypt-only || fail "caddy xks check failed against the demo"
bin/caddy xks bench "https://localhost:$port" --proxy-config .demo/proxy-config.json --cacert "$ca" \
	--key demo-key --duration 2s --concurrency 8 --mix encrypt=3,decrypt=1 || fail "caddy xks bench failed against the demo"

# The binary built from xcaddy.json carries every module of the plugin.
modules=$(bin/caddy list-modules)
for m in hsm http.handlers.xks tls.client_auth.verifier.xks_subject; do
	grep -qx "$m" <<<"$modules" || fail "caddy list-modules does not show $m"
done

# Running the demo again reuses its token and keys.
stop
XKS_DEMO_SETUP_ONLY=1 XKS_DEMO_PORT=$port bash scripts/demo.sh >>"$log" 2>&1 || fail "second demo setup failed"
tokens=$(SOFTHSM2_CONF=.demo/softhsm2.conf softhsm2-util --show-slots | grep -Ec 'Label: *xks-demo *$' || true)
[ "$tokens" = 1 ] || fail "a second run left $tokens tokens labelled xks-demo"
keys=$(SOFTHSM2_CONF=.demo/softhsm2.conf pkcs11-tool --module "${XKS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}" --token-label xks-demo \
	--login --pin "$(cat .demo/pin)" --list-objects --type secrkey 2>/dev/null | grep -c 'label:' || true)
[ "$keys" = 4 ] || fail "a second run left $keys keys on the demo token, want 4"

echo "demo test: health ACTIVE, Encrypt/Decrypt round trip, key usage check and re-run passed"
