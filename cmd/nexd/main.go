// Command nexd is a Nex node as a systemd-native daemon. See README.md.
package main

import (
	"context"
	"os"

	"github.com/nexd-project/nexd/daemon"
	"github.com/nexd-project/nexd/internal/earlynexlet/atinit"
)

func main() {
	// The native nexlet atinit may have exec'd already, before the packages below
	// were initialised; daemon takes it over or discards it.
	early, err := atinit.Take()
	os.Exit(daemon.Main(context.Background(), os.Args[1:], os.Stdout, os.Stderr, daemon.Early{Nexlet: early, Err: err}))
}
