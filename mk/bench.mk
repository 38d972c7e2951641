# Benchmarks. `make bench` runs the Go micro-benchmarks of the hot paths and every
# nexbench scenario at the issue's sizes (500 placements, 1,000 workloads, 50-node
# fleet: about 4 minutes on 2 cores); `make bench-quick` is the smoke version.
# nexbench starts its own nexd processes and loopback NATS servers and removes them.
BENCHTIME ?= 1s
BENCH_PKGS := ./protocol ./daemon/node ./daemon/state ./nexlet ./nexlet/native
BENCH_ARGS ?=

.PHONY: bench bench-go bench-nexbench bench-quick bench-compare

bench: bench-go bench-nexbench

bench-go:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) $(BENCH_PKGS)

bench-nexbench: build
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl $(BENCH_ARGS) all

bench-quick: build
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 100x $(BENCH_PKGS)
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl --quick $(BENCH_ARGS) all

# Side by side with upstream Nex: UPSTREAM_NEX is upstream's nex binary, built outside
# this repository (see the README's performance section).
bench-compare: build
	@test -n "$(UPSTREAM_NEX)" || { echo "bench-compare: set UPSTREAM_NEX=/path/to/upstream/nex"; exit 2; }
	$(BIN)/nexbench --nexd $(BIN)/nexd compare --upstream-nex $(UPSTREAM_NEX) -n 100 --compare-workloads 100,1000 $(BENCH_ARGS)
