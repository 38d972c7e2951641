# Benchmarks. `make bench` runs the Go micro-benchmarks of the hot paths and every
# nexbench scenario at the issue's sizes (500 placements, 1,000 workloads, 50-node
# fleet: about 4 minutes on 2 cores); `make bench-quick` is the smoke version.
# nexbench starts its own nexd processes and loopback NATS servers and removes them.
BENCHTIME ?= 1s
BENCH_PKGS := ./protocol ./daemon/node ./daemon/state ./nexlet
BENCH_ARGS ?=

.PHONY: bench bench-go bench-nexbench bench-quick

bench: bench-go bench-nexbench

bench-go:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) $(BENCH_PKGS)

bench-nexbench: build
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl $(BENCH_ARGS) all

bench-quick: build
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 100x $(BENCH_PKGS)
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl --quick $(BENCH_ARGS) all
