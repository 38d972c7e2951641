# Benchmarks. `make bench` runs the Go micro-benchmarks of the hot paths and a quick
# nexbench pass over every scenario (a few minutes on 2 cores); `make bench-full` runs
# nexbench at the issue's sizes (500 placements, 1,000 workloads, 50-node fleet).
# nexbench starts its own nexd processes and loopback NATS servers and removes them.
BENCHTIME ?= 1s
BENCH_PKGS := ./protocol ./daemon/node ./daemon/state ./nexlet
BENCH_ARGS ?= --quick
BENCH_FULL_ARGS ?=

.PHONY: bench bench-go bench-nexbench bench-full

bench: bench-go bench-nexbench

bench-go:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) $(BENCH_PKGS)

bench-nexbench: build
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl $(BENCH_ARGS) all

bench-full: build
	$(BIN)/nexbench --nexd $(BIN)/nexd --nexctl $(BIN)/nexctl $(BENCH_FULL_ARGS) all
