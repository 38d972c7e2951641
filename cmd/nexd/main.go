// Command nexd is a Nex node as a systemd-native daemon. See README.md.
package main

import (
	"context"
	"os"

	"github.com/nexd-project/nexd/daemon"
)

func main() {
	os.Exit(daemon.Main(context.Background(), os.Args[1:], os.Stdout, os.Stderr))
}
