# nexd — build, run and test. `make run` needs no root and no set-up; `make test` is
# what CI runs.
SHELL := /bin/bash
GO ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
BUILD_DATE ?= $(shell date -u +%Y-%m-%dT%H:%M:%SZ)
LDFLAGS := -X github.com/nexd-project/nexd/internal/version.Version=$(VERSION) \
           -X github.com/nexd-project/nexd/internal/version.Commit=$(COMMIT) \
           -X github.com/nexd-project/nexd/internal/version.BuildDate=$(BUILD_DATE)
BIN := bin
RUN := $(CURDIR)/run
STATICCHECK_VERSION := v0.8.2

.PHONY: all build run test test-short lint fuzz clean

all: build

# Packaging, the real-systemd test and benchmarks live in their own fragments.
-include $(wildcard mk/*.mk)

# Static, as the packages build them: the same binary `make run` and nexbench run as
# the one installed (no libc or NSS libraries mapped: idle nexd + native nexlet RSS
# about 5.8 MB and PSS 1 MB lower than a cgo build).
build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

# A single node on this machine: embedded NATS on 127.0.0.1:4222, the native nexlet,
# state and control socket under ./run/. Stop with Ctrl+C. The state directory is made
# 0700 (it holds the node's seeds): a 0755 one is fixed by nexd with a warning, which a
# first `make run` showed.
run: build
	mkdir -p -m 0700 $(RUN)/state
	$(BIN)/nexd --state-dir $(RUN)/state --control-socket $(RUN)/nexd.sock \
		--node-name $$(hostname) $(ARGS)

# Unit, integration and end-to-end tests (the e2e tests build and run the real binaries).
# Four test binaries at once even on 2 cores: most of their time is spent waiting on
# child processes, NATS round trips and timers, not on the CPU.
TEST_PACKAGES ?= 4
test:
	$(GO) test -race -count=1 -p $(TEST_PACKAGES) -timeout 25m ./...

test-short:
	$(GO) test -short -count=1 ./...

# gofmt, go vet, staticcheck with every check (staticcheck.conf) and the source checks
# in internal/lint (log attributes holding an error are keyed "err"). CI runs it first.
lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	$(GO) run honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION) ./...
	$(GO) test -count=1 ./internal/lint

# Short fuzz runs of every parser of outside input, one target at a time (package:Target;
# internal/lint TestFuzzTargetsListed fails for a fuzz target missing here). Minimisation
# is bounded: coverage inside encoding/json depends on sync.Pool state, so it never
# settles and would eat the budget. FUZZ=Pattern runs only the matching ones.
FUZZTIME ?= 20s
FUZZ_TARGETS = \
	control:FuzzRequests \
	daemon:FuzzReadHandover \
	daemon/config:FuzzFlagsAndEnv \
	daemon/config:FuzzLoad \
	daemon/natsembed:FuzzTrustFile \
	daemon/node:FuzzDrainOutcome \
	daemon/node:FuzzEventWorkloadID \
	daemon/node:FuzzHandlers \
	daemon/node:FuzzListParts \
	daemon/node:FuzzListPartsJoin \
	daemon/node:FuzzRegistrationAndRenewal \
	daemon/state:FuzzStateKeys \
	daemon/state:FuzzStateRecord \
	daemon/supervise:FuzzParseLine \
	internal/cli:FuzzParseNexfile \
	internal/cli:FuzzSignedAnswers \
	internal/names:FuzzValidMatchesTheRegexps \
	internal/procid:FuzzParse \
	internal/procid:FuzzParseStat \
	internal/procid:FuzzReadExit \
	nexlet:FuzzRunnerHandlers \
	nexlet/localchan:FuzzClientStream \
	nexlet/localchan:FuzzDecodeFeeds \
	nexlet/localchan:FuzzReadFrame \
	nexlet/native:FuzzParseStartRequest \
	nexlet/native:FuzzParseStatusUIDs \
	nexlet/native:FuzzParseUIDRange \
	nexlet/native:FuzzRecords \
	protocol:FuzzCheckNamespace \
	protocol:FuzzDecode
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t#*:}; \
		case "$$name" in *$(FUZZ)*) ;; *) continue ;; esac; \
		echo "fuzz $$pkg $$name"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) -fuzzminimizetime 1s ./$$pkg; \
	done

clean:
	rm -rf $(BIN) $(RUN) dist
