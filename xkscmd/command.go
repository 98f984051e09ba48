package xkscmd

import (
	"io"

	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// subcommand is one `caddy xks` command. Its flags are defined by a
// function so that the registration and the tests build the very same set.
type subcommand struct {
	name  string
	use   string
	short string
	long  string
	flags func(*pflag.FlagSet)
	// run writes its results to out (standard output when run by caddy).
	run func(fl caddycmd.Flags, out io.Writer) (int, error)
}

// configFlags are the flags of commands that read the proxy's config.
func configFlags(fs *pflag.FlagSet) {
	fs.StringP("config", "c", "", "Configuration file (default: ./Caddyfile)")
	fs.StringP("adapter", "a", "", "Name of config adapter to apply")
}

// clientFlags are the flags of commands that call a running proxy.
func clientFlags(fs *pflag.FlagSet) {
	fs.String("proxy-config", "", "KMS console proxy configuration file with the key store path and credential")
	fs.String("access-key-id", "", "SigV4 access key id (without --proxy-config)")
	fs.String("secret-file", "", "File holding the SigV4 secret access key (without --proxy-config)")
	fs.String("region", "us-east-1", "AWS region the key store is configured with")
	fs.String("cacert", "", "Trust this CA (PEM) for the proxy's certificate, for local use")
	fs.String("client-cert", "", "Client certificate (PEM) to present to a proxy that requires mTLS")
	fs.String("client-key", "", "Private key (PEM) of --client-cert")
	fs.Bool("http1", false, "Speak HTTP/1.1 (one keep-alive connection per request in flight), not HTTP/2")
}

var subcommands = []subcommand{
	{
		name:  "keygen",
		use:   "keygen --label <external key id> [--backend <name>] [--config <file>]",
		short: "Creates an AES-256 key in an HSM backend and proves it works",
		long: `
Creates a token AES-256 key labelled with the external key id, with the
secure template: sensitive, never extractable, not modifiable, usable for
encrypt and decrypt only (CKA_PRIVATE as the backend's private_keys says).
With private_keys false it makes a key that is not private only on a token
that cannot hold private keys (nShield's accelerator slot), or with
--allow-non-private, and says what such a key means on the token: anywhere
else it is usable without a login, and SoftHSM2 writes it unencrypted.
It refuses a label that already exists. It then reads the key back (it must
be AES_256 with ENCRYPT and DECRYPT) and runs an encrypt/decrypt round trip.

--usage limits what the key may do (encrypt, decrypt or none); it exists to
make keys for conformance tests and should not be used for production keys.`,
		flags: func(fs *pflag.FlagSet) {
			configFlags(fs)
			fs.StringP("label", "l", "", "External key id: the key's CKA_LABEL and CKA_ID (required)")
			fs.StringP("backend", "b", "", "HSM backend name from the config (default: the only one)")
			fs.String("usage", "encrypt,decrypt", "What the key may do: encrypt, decrypt, both, or none")
			fs.Bool("allow-non-private", false, "With private_keys false, make the key on a token that can hold private keys too")
		},
		run: cmdKeygen,
	},
	{
		name:  "ekm-keygen",
		use:   "ekm-keygen --name <key name> --type aes|rsa [--bits <n>] [--backend <name>] [--config <file>]",
		short: "Creates a key-encryption key for Azure Managed HSM external keys and proves it works",
		long: `
Creates, for the Azure Managed HSM EKM front end, a key-encryption key that
never leaves the HSM: an AES-256 key (--type aes; A256KW and A256KWP) or an
RSA key pair of 2048, 3072 (the default) or 4096 bits with public exponent
65537 (--type rsa; RSA-OAEP and RSA-OAEP-256). The private or secret key is
sensitive, never extractable and not modifiable, and may do only what key
wrap does on this token, by the path its start-up known-answer test proved
(C_Encrypt or C_WrapKey); where the token takes it, CKA_ALLOWED_MECHANISMS
restricts it to the key wrap mechanisms. Its label and CKA_ID are --name,
the key's external key id in Azure: 1 to 64 characters of a-z, A-Z, 0-9
and -, case-sensitive. It refuses a name any key already has, and with
private_keys false a token that can hold private keys, as keygen does,
unless --allow-non-private.

It then wraps and unwraps a random data key with each algorithm of the
key's kind, says which this backend serves and which its HSM cannot do
(SoftHSM2 has no RSA-OAEP-256), prints an RSA key's n and e as the proxy's
/metadata gives them, and the az command that makes it an external key of
the Managed HSM (--hsm-name fills it in).`,
		flags: func(fs *pflag.FlagSet) {
			configFlags(fs)
			fs.StringP("name", "n", "", "Key name: the external key id in Azure, and the key's CKA_LABEL and CKA_ID (required)")
			fs.String("type", "rsa", "Key type: aes or rsa")
			fs.Int("bits", 0, "Key size: 256 for aes; 2048, 3072 or 4096 for rsa (default 3072)")
			fs.StringP("backend", "b", "", "HSM backend name from the config (default: the only one)")
			fs.String("hsm-name", "<your Managed HSM>", "Name of the Managed HSM, for the az command printed")
			fs.Bool("allow-non-private", false, "With private_keys false, make the key on a token that can hold private keys too")
		},
		run: cmdEKMKeygen,
	},
	{
		name:  "keys",
		use:   "keys [--backend <name>] [--config <file>] [--labels]",
		short: "Lists the keys in an HSM backend with their metadata and protection",
		long: `
Lists every secret key of the backend's token: its label (the external key
id), key spec, usage and status as GetKeyMetadata reports them, and the
attributes that say who can obtain its value: SENSITIVE, EXTRACTABLE,
ALWAYS_SENSITIVE, NEVER_EXTRACTABLE and PRIVATE (CKA_ omitted; ? when the
token does not report one). Notes below the table name the keys the backend
refuses because their value can leave the HSM, keys whose value existed
outside it once (imported), and what a key that is not private means on
this token.

Then, for each key store on the backend, each version of each key (version
1 is the key labelled as the external key id; see the key store's versions)
with its state (current, retired, disabled), the Encrypts the fleet counted
with it in Caddy's storage, the key store's encrypt_limit, the share used,
and the day the limit is reached at the fleet's current rate.`,
		flags: func(fs *pflag.FlagSet) {
			configFlags(fs)
			fs.StringP("backend", "b", "", "HSM backend name from the config (default: the only one)")
			fs.Bool("labels", false, "Print only the labels, one per line")
		},
		run: cmdKeys,
	},
	{
		name:  "credential",
		use:   "credential [--secret-file <file>]",
		short: "Makes a new SigV4 credential for a key store",
		long: `
Prints a new access key id (24 characters of A-Z and 2-7) and secret access
key (44 characters of Base64, 264 bits from the system's CSPRNG) that meet
AWS KMS's rules for external key store credentials. With --secret-file the
secret is written to that file (mode 0600) and only the access key id is
printed, ready for a {file.*} placeholder in the config.`,
		flags: func(fs *pflag.FlagSet) {
			fs.String("secret-file", "", "Write the secret access key to this file instead of printing it")
		},
		run: cmdCredential,
	},
	{
		name:  "proxy-config",
		use:   "proxy-config [--key-store <uri path>] [--access-key-id <id>] [--output <file>] [--config <file>]",
		short: "Writes the proxy configuration file the KMS console imports",
		long: `
Writes, for one key store of the config, the JSON file that the AWS KMS
console accepts when an external key store is created or edited:
its XksProxyUriPath and one SigV4 credential (the first one, or the one
named by --access-key-id). The file holds the raw secret: it is written with
mode 0600; hand it only to those who administer the key store in AWS.`,
		flags: func(fs *pflag.FlagSet) {
			configFlags(fs)
			fs.String("key-store", "", "URI path of the key store (default: the only one)")
			fs.String("access-key-id", "", "Credential to export (default: the key store's first)")
			fs.StringP("output", "o", "", "Write to this file (mode 0600) instead of standard output")
		},
		run: cmdProxyConfig,
	},
	{
		name:  "bench",
		use:   "bench <key store URL> [--proxy-config <file>] [--rate <req/s>] [--concurrency <n>] [--duration <d>] [--mix encrypt=1,decrypt=1] [--plaintext <bytes>]",
		short: "Loads a running proxy with signed XKS calls and reports latency",
		long: `
Sends SigV4-signed XKS calls to a running proxy, at a fixed rate (--rate,
latency counted from when each request was due, and how late they were
sent shown apart: the client's own delay, or the server's once every
request in flight waits for an answer) or as fast as
--concurrency allows (--rate 0), for --duration, with a mix of operations
(--mix encrypt=3,decrypt=1,metadata=0,health=0) on one key (--key). It shows
progress every second, then prints the calls sent (paced: how many were due,
and how many the end of the run left unsent), how many were answered ok and
how many failed, throughput, p50/p90/p99/p99.9/max latency of the
successful calls, the failures by errorName and the HTTP version the proxy
answered with, and exits non-zero if any call failed. It speaks
HTTP/2 over one connection, or with --http1 HTTP/1.1 over a keep-alive
connection per request in flight. With --server-pid (a server on the same
Linux machine) it also prints the server process's CPU time per request,
and its own, from /proc: on shared cores the two together are what a
request costs.

The URL is the key store's endpoint plus its URI path, e.g.
https://xks.example.com/prod/kms/xks/v1; with --proxy-config (the KMS
console file) the path and credential come from the file and the URL may be
just https://xks.example.com. --raw sends the Encrypt request to the URL as
given, to measure a plain route of the same server as a baseline.`,
		flags: func(fs *pflag.FlagSet) {
			clientFlags(fs)
			fs.String("key", "demo-key", "External key id to use")
			fs.Float64("rate", 0, "Requests per second; 0 sends as fast as possible")
			fs.Int("concurrency", 16, "Requests in flight at most")
			fs.String("duration", "10s", "How long to send")
			fs.String("mix", "encrypt=1", "Operations and their weights")
			fs.Int("plaintext", 32, "Plaintext size in bytes")
			fs.Bool("raw", false, "Send the Encrypt request to the URL as given (baseline)")
			fs.Int("server-pid", 0, "Process id of the server, on this machine: report its CPU time per request (Linux)")
		},
		run: cmdBench,
	},
	{
		name:  "drain",
		use:   "drain [--off] [--config <file>] [--address <admin address>]",
		short: "Has a running proxy ask its clients to move their connections",
		long: `
Asks the running proxy, through its admin endpoint (found in the config as
'caddy reload' finds it, or given with --address), to answer every XKS call
with Connection: close (HTTP/1.1) or GOAWAY (HTTP/2): each client then opens
a new connection for its next call, which the load balancer sends to
another instance once it drains this one. It is the step between taking an
instance out of the load balancer and reloading or restarting it: when the
balancer shows no connection to the instance, nothing is cut. The next
config load ends it (a reload is the end of the maintenance), and so does
--off. Readiness (ready_path) is not changed: a balancer that cuts the
connections of an instance it finds unhealthy would cut these.`,
		flags: func(fs *pflag.FlagSet) {
			configFlags(fs)
			fs.String("address", "", "Admin endpoint of the proxy (default: from the config)")
			fs.Bool("off", false, "Stop draining")
		},
		run: cmdDrain,
	},
	{
		name:  "check",
		use:   "check <key store URL> [--proxy-config <file>] [--key <id>] [--encrypt-only-key <id>] [--samples <n>] [--max-p99 <duration>]",
		short: "Checks a running proxy against the XKS API as KMS would call it",
		long: `
Calls a running proxy as AWS KMS does (SigV4-signed POSTs, TLS verified
against the system roots or --cacert) and checks each answer against the
XKS Proxy API specification. Each check is a row of the table it prints,
PASS or FAIL with a short detail:

  health               GetHealthStatus answers 200 with a fleet size above 0,
                       vendor and model strings and 1 to 10 HSMs, each
                       ACTIVE, DEGRADED or UNAVAILABLE, not all UNAVAILABLE
  metadata             --key is AES_256, ENCRYPT and DECRYPT, ENABLED: what
                       KMS's CreateKey requires
  round trip           Encrypt then Decrypt without AAD, with AAD, with a
  round trip with AAD  CDIV (recomputed as SHA-256 of AAD, ciphertext
  CDIV                 metadata, IV, ciphertext and tag), and with a
  largest request      4300-byte plaintext and 8192-byte AAD; the ciphertext
                       is as long as the plaintext, the IV 12 or 16 bytes
                       and the tag 16
  unknown key          404 KeyNotFoundException
  wrong secret         401 AuthenticationFailedException (signed with a
                       random secret and the right access key id)
  wrong URI prefix     404 InvalidUriPathException ("/invalid" inserted
                       before /kms/xks/v1)
  tampered ciphertext  400 InvalidCiphertextException
  wrong AAD            400 InvalidCiphertextException
  GET method           405 for a GET of the health URI
  malformed body       400 ValidationException for a health request of {}
  encrypt-only CDIV    400 InvalidKeyUsageException for a CDIV Encrypt with
                       --encrypt-only-key (skipped without it)
  latency              --samples Encrypt calls one after the other; fails if
                       their p99 is --max-p99 (default 250 ms, KMS's
                       timeout) or more

It then prints the HTTP version the proxy answered with and the p50 and
p99 latency, and exits non-zero if any check failed. The spec requires a
proxy to fall back to HTTP/1.1: --http1 runs every check over it. The URL
and credential are given as for 'caddy xks bench': the key store's
endpoint plus its URI path, e.g. https://xks.example.com/prod/kms/xks/v1,
with --access-key-id and --secret-file, or the KMS console file with
--proxy-config.`,
		flags: func(fs *pflag.FlagSet) {
			clientFlags(fs)
			fs.String("key", "demo-key", "External key id to check, which must be usable by KMS")
			fs.String("encrypt-only-key", "", "External key id of a key that can encrypt but not decrypt (default: skip that check)")
			fs.Int("samples", 50, "Encrypt calls to measure latency with")
			fs.Duration("max-p99", kmsTimeout, "Latency check fails at this p99 or more")
		},
		run: cmdCheck,
	},
}

func init() {
	caddycmd.RegisterCommand(caddycmd.Command{
		Name:  "xks",
		Short: "Operates the AWS KMS external key store proxy",
		Long: `
Commands for operating caddy-xks with the same config as 'caddy run':
generate and list HSM keys, make SigV4 credentials, write the proxy
configuration file that the AWS KMS console imports, and check or load a
running proxy as KMS would call it.

Secrets are never taken as flags (they would show in ps and shell history):
the HSM PIN and SigV4 secrets are read through the config's {env.*} and
{file.*} placeholders, or from files.`,
		CobraFunc: func(cmd *cobra.Command) {
			for _, sc := range subcommands {
				c := &cobra.Command{
					Use:   sc.use,
					Short: sc.short,
					Long:  sc.long,
				}
				c.RunE = func(c *cobra.Command, args []string) error {
					run := func(fl caddycmd.Flags) (int, error) { return sc.run(fl, c.OutOrStdout()) }
					return caddycmd.WrapCommandFuncForCobra(run)(c, args)
				}
				sc.flags(c.Flags())
				cmd.AddCommand(c)
			}
		},
	})
}
