# caddy-xks: build, test and demo targets. PKCS#11 needs cgo, always.
export CGO_ENABLED := 1

GO       ?= go
FUZZEXECS ?=
export FUZZEXECS
# The module path is not published; GOPRIVATE makes xcaddy's `go get` use the
# local replacement from xcaddy.json instead of asking the module proxy.
XCADDY_ENV := GOPRIVATE=github.com/caddy-xks GOFLAGS=-mod=mod
# scripts/install-deps.sh installs the pinned golangci-lint here.
GOLANGCI_LINT ?= $(shell $(GO) env GOPATH)/bin/golangci-lint

.DEFAULT_GOAL := help

.PHONY: deps build caddy test vet lint fuzz bench loadtest demo fleet clean help

## deps: install the system packages (softhsm2, opensc, gcc, curl), Go modules and golangci-lint
# make test installs once and tells the scripts it runs (the demo test runs
# make demo) through XKS_DEPS_DONE.
deps:
	@if [ "$${XKS_DEPS_DONE:-}" = 1 ]; then echo "deps: installed earlier in this run"; else bash scripts/install-deps.sh; fi

## build: plain `go build` of caddy with the plugin into bin/caddy
build:
	$(GO) build -o bin/caddy ./cmd/caddy

## caddy: build bin/caddy from the xcaddy manifest (xcaddy.json), when a source changed
caddy: bin/caddy

bin/caddy: xcaddy.json go.mod go.sum $(shell git ls-files '*.go' 2>/dev/null)
	$(XCADDY_ENV) $(GO) -C tools/xcaddyjson run . -f ../../xcaddy.json

## test: everything CI runs: formatting, vet, unit/integration/e2e tests under -race, bounded fuzzing
test: deps vet lint
	XKS_DEPS_DONE=1 bash scripts/test.sh

## vet: gofmt check and go vet
vet:
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed on: $$unformatted"; exit 1; fi
	$(GO) vet ./...

## lint: golangci-lint with .golangci.yml (installed by `make deps`)
# Another checkout's make test may lint at the same time: golangci-lint
# refuses a second run unless told to wait for the first.
lint:
	@test -x $(GOLANGCI_LINT) || { echo "$(GOLANGCI_LINT) missing: run make deps" >&2; exit 1; }
	$(GOLANGCI_LINT) run --allow-serial-runners ./...

## fuzz: every fuzz target for a bounded budget (scripts/fuzz.sh)
fuzz:
	FUZZEXECS=$(FUZZEXECS) bash scripts/fuzz.sh

## bench: the Go benchmarks (figures, not pass/fail)
bench:
	$(GO) test -run='^$$' -bench=. -benchmem ./...

## loadtest: Encrypt through Caddy+TLS+SigV4+SoftHSM2 against a bare route, and latency at 1,800 req/s
loadtest: deps caddy
	bash scripts/loadtest.sh

## demo: set up a SoftHSM2 token, credentials and run the proxy on https://localhost:$${XKS_DEMO_PORT:-8443}/demo/kms/xks/v1
demo: deps caddy
	bash scripts/demo.sh

## fleet: three proxies on the demo's token behind HAProxy, sharing Redis, on loopback; a bench through the balancer
fleet: deps caddy
	bash scripts/fleet.sh

## clean: remove bin/
clean:
	rm -rf bin

## help: this list
help:
	@sed -n 's/^## //p' $(firstword $(MAKEFILE_LIST)) | sed 's/\$$\$$/$$/g' | awk -F': ' '{ n = $$1; sub(/^[^:]*: /, ""); printf "  %-9s %s\n", n, $$0 }'
