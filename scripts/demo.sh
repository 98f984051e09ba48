#!/usr/bin/env bash
# The demo behind `make demo`: a SoftHSM2 token under .demo/ with four AES-256
# keys, fresh SigV4 credentials, the KMS console's proxy configuration file,
# and Caddy in the foreground serving the external key store at
# https://localhost:${XKS_DEMO_PORT:-8443}/demo/kms/xks/v1 (region us-east-1)
# with a certificate from Caddy's local CA; and beside it, on the same port,
# the Azure Managed HSM EKM front end at
# https://ekm.localhost:${XKS_DEMO_PORT:-8443}/demo-ekm/ with two
# key-encryption keys (RSA-2048 and AES-256), over mutual TLS with a client
# certificate made here in the place of Managed HSM's.
#
# It runs Caddyfile.example itself; the variables below are the only
# differences from production. Running it again reuses the token and keys.
# XKS_DEMO_DIR (default .demo) is where the token, secrets and storage live,
# so that a test run can have its own beside a running demo.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
demo=${XKS_DEMO_DIR:-$root/.demo}
caddy=$root/bin/caddy
port=${XKS_DEMO_PORT:-8443}
region=us-east-1
uri_path=/demo/kms/xks/v1
token=xks-demo

[ -x "$caddy" ] || { echo "bin/caddy is missing: run 'make demo' (or 'make caddy') first" >&2; exit 1; }
mkdir -p "$demo/tokens" "$demo/storage"
chmod 700 "$demo"

# SoftHSM2 reads its configuration from SOFTHSM2_CONF when the library is
# initialized; the token lives under .demo/tokens.
export SOFTHSM2_CONF=$demo/softhsm2.conf
cat >"$SOFTHSM2_CONF" <<EOF
directories.tokendir = $demo/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF

umask 077
if [ ! -s "$demo/pin" ]; then
	head -c 12 /dev/urandom | base64 | tr -d '/+=' >"$demo/pin"
fi
if ! softhsm2-util --show-slots 2>/dev/null | grep -Eq "Label: *$token *\$"; then
	echo "creating SoftHSM2 token $token"
	# softhsm2-util reads PINs from its arguments or the terminal only, so
	# they are visible in ps for the instant it runs: the demo token's own,
	# throw-away PINs; a production HSM is initialized with its vendor's
	# tools.
	softhsm2-util --init-token --free --label "$token" --pin "$(cat "$demo/pin")" \
		--so-pin "$(head -c 12 /dev/urandom | base64 | tr -d '/+=')" >/dev/null
fi

# Fresh credentials on every run: two, as in production during a rotation.
# The secrets go straight to files; only the access key ids are printed.
akid1=$("$caddy" xks credential --secret-file "$demo/sigv4-secret-1")
akid2=$("$caddy" xks credential --secret-file "$demo/sigv4-secret-2")

export XKS_ADMIN="unix/$demo/admin.sock"
export XKS_HTTPS_PORT=$port
export XKS_HTTP_PORT=${XKS_DEMO_HTTP_PORT:-$((port + 1))}
export XKS_READY_PORT=${XKS_DEMO_READY_PORT:-$((port + 2))}
# No load balancer waits for the demo to leave it: stop at once.
export XKS_SHUTDOWN_DELAY=0s
export XKS_STORAGE=$demo/storage
export XKS_HSM_MODULE=${XKS_HSM_MODULE:-/usr/lib/softhsm/libsofthsm2.so}
export XKS_HSM_TOKEN=$token
export XKS_HSM_PIN_FILE=$demo/pin
export XKS_HSM_IV=auto
export XKS_HSM_PRIVATE_KEYS=true
export XKS_FQDN=localhost
export XKS_TLS=internal
export XKS_URI_PATH=$uri_path
export XKS_REGION=$region
export XKS_AKID_1=$akid1 XKS_SECRET_FILE_1=$demo/sigv4-secret-1
export XKS_AKID_2=$akid2 XKS_SECRET_FILE_2=$demo/sigv4-secret-2
export XKS_KEYS="demo-key demo-encrypt-only demo-decrypt-only demo-no-usage"
export XKS_FLEET_SIZE=1

# The EKM front end. Managed HSM's client certificate and its root are
# Microsoft's; the demo makes a root and a client certificate of its own
# with the same shape (a CN of the pool, client authentication).
ekm_subject=demo.managedhsmclient.azure.net
if [ ! -s "$demo/mhsm-client.pem" ]; then
	openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
		-keyout "$demo/mhsm-client-root.key" -out "$demo/mhsm-client-root.pem" \
		-subj "/CN=caddy-xks demo Managed HSM client root" \
		-addext basicConstraints=critical,CA:true -addext keyUsage=critical,keyCertSign 2>/dev/null
	openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
		-keyout "$demo/mhsm-client.key" -out "$demo/mhsm-client.csr" -subj "/CN=$ekm_subject" 2>/dev/null
	openssl x509 -req -in "$demo/mhsm-client.csr" -CA "$demo/mhsm-client-root.pem" -CAkey "$demo/mhsm-client-root.key" \
		-set_serial 2 -days 825 -out "$demo/mhsm-client.pem" \
		-extfile <(printf 'extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n') 2>/dev/null
	rm -f "$demo/mhsm-client.csr"
fi
export EKM_FQDN=ekm.localhost
export EKM_PATH_PREFIX=/demo-ekm
export EKM_CLIENT_SUBJECT=$ekm_subject
export EKM_CLIENT_ROOTS=$demo/mhsm-client-root.pem
export EKM_KEYS="demo-kek-rsa demo-kek-aes"
config=(--config "$root/Caddyfile.example" --adapter caddyfile)

# The four demo keys: one for normal use, and three whose usage is limited,
# for conformance tests of InvalidKeyUsageException.
existing=$("$caddy" xks keys "${config[@]}" --backend primary --labels)
for spec in demo-key:encrypt,decrypt demo-encrypt-only:encrypt demo-decrypt-only:decrypt demo-no-usage:none; do
	label=${spec%%:*}
	if ! grep -qx "$label" <<<"$existing"; then
		"$caddy" xks keygen "${config[@]}" --backend primary --label "$label" --usage "${spec#*:}"
	fi
done

# The EKM front end's keys; ekm-keygen refuses a name in use, which on a
# second run is the key made on the first.
for spec in demo-kek-rsa:rsa demo-kek-aes:aes; do
	if ! out=$("$caddy" xks ekm-keygen "${config[@]}" --backend primary --name "${spec%%:*}" --type "${spec#*:}" --bits "$([ "${spec#*:}" = rsa ] && echo 2048 || echo 256)" 2>&1); then
		grep -q "key label already exists" <<<"$out" || { echo "$out" >&2; exit 1; }
	fi
done

"$caddy" xks proxy-config "${config[@]}" --key-store "$uri_path" --access-key-id "$akid1" --output "$demo/proxy-config.json"

# XKS_DEMO_SETUP_ONLY=1 prepares .demo/ and the environment Caddyfile.example
# reads, without running the proxy: scripts/loadtest.sh runs this so, and
# scripts/fleet.sh sources it.
if [ "${XKS_DEMO_SETUP_ONLY:-}" = 1 ]; then
	return 0 2>/dev/null || exit 0
fi

ca=$demo/storage/pki/authorities/local/root.crt
# curl reads the credential from a file (-K), not from its arguments, where
# any local user could see it in ps. printf is a shell builtin: no process
# carries the secret either.
curl_config=$demo/curl-credential.conf
printf 'user = "%s:%s"\n' "$akid1" "$(cat "$demo/sigv4-secret-1")" >"$curl_config"
cat <<EOF

caddy-xks demo
  key store:   https://localhost:$port$uri_path  (region $region)
  keys:        $XKS_KEYS
  credentials: $demo/proxy-config.json  (the KMS console's import format)
  local CA:    $ca  (written once Caddy has started)
  readiness:   http://localhost:$XKS_READY_PORT/ready  (a load balancer's health check)

Try it from another terminal:

  curl --cacert $ca \\
    --aws-sigv4 "aws:amz:$region:kms-xks-proxy" -K $curl_config \\
    -H 'Content-Type: application/json' \\
    -d '{"requestMetadata":{"kmsRequestId":"demo-1","kmsOperation":"KmsHealthCheck"}}' \\
    https://localhost:$port$uri_path/health

The Azure Managed HSM EKM front end, over mutual TLS (the demo's client
certificate stands in for Managed HSM's):

  curl --cacert $ca --resolve ekm.localhost:$port:127.0.0.1 \
    --cert $demo/mhsm-client.pem --key $demo/mhsm-client.key \
    -H 'Content-Type: application/json' \
    -d '{"request_context":{"correlation_id":"demo-1","pool_name":"demo"}}' \
    'https://ekm.localhost:$port/demo-ekm/demo-kek-rsa/metadata?api-version=0.1-preview'

EOF

exec "$caddy" run "${config[@]}"
