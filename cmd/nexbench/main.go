// Command nexbench benchmarks Nex nodes over the $NEX protocol: time to ready,
// placement latency, throughput, footprint, recovery, fleet scale and the control
// socket. See internal/bench.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nexd-project/nexd/internal/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := bench.Main(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
