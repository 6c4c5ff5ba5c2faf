# Tulle: the two commands a newcomer needs are `make demo` and `make test`
# (both as root: they create network namespaces and TUN devices).
GO        ?= go
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
REVISION  ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
LDFLAGS   := -s -w -X github.com/tulle-net/tulle/daemon/buildinfo.version=$(VERSION) -X github.com/tulle-net/tulle/daemon/buildinfo.revision=$(REVISION)
# Unit tests of the control plane run with the race detector; the namespace
# tests refuse to skip when TULLE_REQUIRE_ROOT_TESTS=1.
UNIT_PKGS := ./subnet/... ./proto/... ./backend/... ./daemon/... ./cmd/... ./policy/...

.PHONY: all build deps vet test unit alloc e2e bench-smoke bench scale demo fuzz clean

all: build

build:
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/tulled ./cmd/tulled
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o bin/tulle-cni ./cmd/tulle-cni

# Installs the programs of tests/tools/tools.list that are missing (Debian
# packages, promtool out of Debian's prometheus package); quiet unless it
# installs something or fails.
deps:
	@scripts/deps.sh

# gofmt, go vet, and the check that every program the code runs goes
# through tests/tools and is on its list (which deps.sh installs).
vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) vet ./...
	$(GO) test -count=1 ./tests/tools

unit:
	TULLE_REQUIRE_ROOT_TESTS=1 $(GO) test -race -count=1 -timeout 15m $(UNIT_PKGS)

# The zero-allocation proofs again without -race: the build that ships.
alloc:
	TULLE_REQUIRE_ROOT_TESTS=1 $(GO) test -count=1 -run 'Allocat|AllocsNothing|DoesNotAllocate' -v ./backend/... ./proto/...

e2e:
	TULLE_REQUIRE_ROOT_TESTS=1 $(GO) test -p 1 -count=1 -timeout 20m ./tests/...

bench-smoke:
	$(GO) run ./tests/bench -smoke

# The whole suite: what CI runs (.ci/run calls `make test`).
test: deps build vet unit alloc e2e bench-smoke

bench: deps
	$(GO) run ./tests/bench

# Many leases: start-up, churn, a burst of deletions, memory (~4 minutes;
# `make test` runs a small version of it as a test in ./tests/scale).
scale: deps
	$(GO) run ./tests/scale

demo: deps
	$(GO) run ./tests/demo

clean:
	rm -rf bin results

# Coverage-guided fuzzing, FUZZTIME per target (the seed corpora already run
# in `make test`).
FUZZTIME ?= 30s
fuzz:
	for t in FuzzParseConfig FuzzParseLeaseKey FuzzLeaseAttrs; do $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./subnet/ || exit 1; done
	for t in FuzzCheckIPv4 FuzzDecrementTTL FuzzICMPv4Error FuzzCheckIPv6; do $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./proto/ || exit 1; done
	for t in FuzzReceiveTrustBoundary FuzzReceiveTrustBoundaryIPv6; do $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./backend/udp/ || exit 1; done
	$(GO) test -run '^$$' -fuzz '^FuzzParseDocuments$$' -fuzztime $(FUZZTIME) ./policy/
	for t in FuzzSplit FuzzCoalesce; do $(GO) test -run '^$$' -fuzz "^$$t$$" -fuzztime $(FUZZTIME) ./backend/tundev/ || exit 1; done
