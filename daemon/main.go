package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/natsembed"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/profdump"
	"github.com/nexd-project/nexd/internal/sdscope"
	"github.com/nexd-project/nexd/internal/version"
	"github.com/nexd-project/nexd/nexlet/native"
)

// Exit codes.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// Early is what nexd's main package started before main: the native nexlet exec'd at
// package init (internal/earlynexlet/atinit), or why it was not. Main owns it.
type Early struct {
	Nexlet *earlynexlet.Process
	Err    error
}

// Main is nexd's entry point. args excludes the program name. It returns the exit code.
//
//	nexd [flags]             run the node
//	nexd node up [flags]     the same, in upstream's words
//	nexd nexlet native       the native nexlet (started by nexd itself)
func Main(ctx context.Context, args []string, stdout, stderr io.Writer, early Early) int {
	// Every return before prestartNexlet took it kills the process started at init.
	defer func() { early.Nexlet.Discard() }()
	if len(args) > 0 && args[0] == "nexlet" {
		var ahead *native.Ahead
		if _, pre := os.LookupEnv(supervise.EnvHandoff); pre {
			// Pre-started at nexd's main: wait for the start's environment and
			// descriptors (docs/performance-notes.md, Ready), building meanwhile what needs neither.
			ahead = native.BuildAhead()
			if code, ok := supervise.AwaitHandoff(ahead.Preview); !ok {
				ahead.Wait()
				return code
			}
		}
		return native.Command(ctx, args[1:], stderr, ahead)
	}
	if len(args) >= 2 && args[0] == "node" && args[1] == "up" {
		args = args[2:]
	}
	if len(args) > 0 && args[0] == "version" {
		fmt.Fprintln(stdout, version.String("nexd"))
		return ExitOK
	}
	if len(args) > 0 && args[0] == "help" {
		fmt.Fprint(stdout, config.Usage())
		return ExitOK
	}
	// A node's start: its signals are caught before the configuration is read (the
	// nexlet exec'd at init began its cgroup warm-up there: earlynexlet.WarmAttach).
	var sigs *signals
	if early.Nexlet != nil {
		sigs = catchSignals()
	}
	defer sigs.stop()
	lo := config.DefaultLoadOptions(args)
	lo.CheckInats = natsembed.CheckServerConfig
	lo.CheckCgroupDriver = sdscope.CheckDriver
	loaded, err := config.Load(lo)
	if loaded != nil {
		// Flags may come before "node up"; anything else positional is a mistake, most
		// often a nexctl command typed to nexd, and must not start a node.
		rest := loaded.Args
		if len(rest) >= 2 && rest[0] == "node" && rest[1] == "up" {
			rest = rest[2:]
		}
		if len(rest) > 0 {
			fmt.Fprintln(stderr, unknownArgs(rest))
			return ExitUsage
		}
	}
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
			fmt.Fprintf(stderr, "nexd: configuration is invalid (%s):\n", countErrors(len(errs)))
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
		lines, problems := checkCredsFiles(loaded.Config, time.Now())
		more, problem := checkStateReplicas(ctx, loaded.Config)
		lines = append(lines, more...)
		if problem != nil {
			problems = append(problems, problem)
		}
		for _, l := range lines {
			fmt.Fprintln(stdout, l)
		}
		if len(problems) > 0 {
			fmt.Fprintf(stderr, "nexd: configuration is invalid (%s):\n", countErrors(len(problems)))
			for _, p := range problems {
				fmt.Fprintf(stderr, "  %v\n", p)
			}
			return ExitUsage
		}
		fmt.Fprintln(stdout, "configuration is valid")
		return ExitOK
	}
	d, err := newDaemon(loaded, args, stderr)
	if err != nil {
		fmt.Fprintf(stderr, "nexd: %v\n", err)
		return ExitFailure
	}
	d.sigs = sigs
	d.prestartNexlet(loaded.Config, early)
	early = Early{}
	pctx, stopProf := context.WithCancel(ctx)
	defer stopProf()
	waitProf := profdump.Start(pctx, os.Getenv, "nexd", d.log)
	err = d.run(ctx)
	stopProf()
	waitProf()
	if err != nil {
		d.log.Error("nexd failed", "err", err)
		fmt.Fprintf(stderr, "nexd: %v\n", err)
		return ExitFailure
	}
	return ExitOK
}

// countErrors is "1 error" or "N errors".
func countErrors(n int) string {
	if n == 1 {
		return "1 error"
	}
	return fmt.Sprintf("%d errors", n)
}

// isNexctlCommand says whether s is one of nexctl's top-level commands, for the hint
// when one is typed to nexd. Kept by hand (nexd does not link nexctl's command tree);
// TestNexctlHintCoversNexctl checks it against that tree.
func isNexctlCommand(s string) bool {
	switch s {
	case "node", "nodes", "workload", "workloads", "status", "reload", "lameduck", "nexlet",
		"nexlets", "logs", "config", "secret", "metrics", "creds", "doctor", "events", "top":
		return true
	}
	return false
}

// unknownArgs is the usage error for positional arguments nexd does not take.
func unknownArgs(rest []string) string {
	msg := fmt.Sprintf("nexd: unknown argument %q (nexd takes only flags, \"node up\", \"nexlet\", \"version\" and \"help\")", rest[0])
	if isNexctlCommand(rest[0]) {
		msg += fmt.Sprintf("; did you mean `nexctl %s`?", strings.Join(rest, " "))
	} else {
		msg += "; see nexd --help"
	}
	return msg
}
