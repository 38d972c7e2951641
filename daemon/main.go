package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/internal/version"
)

// Exit codes.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// Main is nexd's entry point. args excludes the program name. It returns the exit code.
//
//	nexd [flags]             run the node
//	nexd node up [flags]     the same, in upstream's words
//	nexd nexlet native       the native nexlet (started by nexd itself)
func Main(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "nexlet" {
		return runNexlet(ctx, args[1:], stderr)
	}
	if len(args) >= 2 && args[0] == "node" && args[1] == "up" {
		args = args[2:]
	}
	if len(args) > 0 && args[0] == "version" {
		fmt.Fprintln(stdout, version.String("nexd"))
		return ExitOK
	}
	loaded, err := config.Load(config.DefaultLoadOptions(args))
	if loaded != nil && loaded.Help {
		fmt.Fprint(stdout, config.Usage())
		return ExitOK
	}
	if loaded != nil && loaded.Version {
		fmt.Fprintln(stdout, version.String("nexd"))
		return ExitOK
	}
	if err != nil {
		if loaded != nil && loaded.Check && loaded.Config != nil {
			fmt.Fprint(stdout, loaded.Render())
		}
		var errs config.Errors
		if errors.As(err, &errs) {
			fmt.Fprintf(stderr, "nexd: configuration is invalid (%d errors):\n", len(errs))
			for _, e := range errs {
				fmt.Fprintf(stderr, "  %s\n", e.Error())
			}
		} else {
			fmt.Fprintf(stderr, "nexd: %v\n", err)
		}
		return ExitUsage
	}
	if loaded.Check {
		fmt.Fprint(stdout, loaded.Render())
		fmt.Fprintln(stdout, "configuration is valid")
		return ExitOK
	}
	d, err := newDaemon(loaded, args, os.Environ(), stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nexd: %v\n", err)
		return ExitFailure
	}
	if err := d.run(ctx); err != nil {
		d.log.Error("nexd failed", "err", err)
		fmt.Fprintf(stderr, "nexd: %v\n", err)
		return ExitFailure
	}
	return ExitOK
}
