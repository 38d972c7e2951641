// Package cli is the nexctl command tree: local commands over nexd's control socket and
// fleet commands over the $NEX NATS API, with tables for people and --json for scripts.
package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/protocol"
)

// Exit codes.
const (
	ExitOK     = 0
	ExitFailed = 1
	ExitUsage  = 2
	// ExitUnknown: the outcome is unknown (a deploy whose node went silent mid-request:
	// the workload may be running there; a gather cut short by nexctl's connection).
	ExitUnknown = 3
	// defaultStop ends a scatter-gather once answers stop: nodes on one NATS system
	// answer within a few ms of each other; raise --gather-stall across slow links.
	defaultStop = 25 * time.Millisecond
)

// IO is what a nexctl run reads and writes; tests supply buffers.
type IO struct {
	Stdin  io.Reader
	Stdout io.Writer
	Stderr io.Writer
	Env    func(string) string
	// Environ is the whole environment ("K=V"), for NEX_* settings; nil means none.
	Environ []string
	Version string
}

// usageError marks a command-line mistake (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// exitError carries an exit code for a failure that already explained itself.
type exitError struct {
	code int
	err  error
}

func (e exitError) Error() string { return e.err.Error() }
func (e exitError) Unwrap() error { return e.err }

// app holds the global flags and streams of one run.
type app struct {
	io         IO
	socket     string
	json       bool
	namespace  string
	nats       natsFlags
	stall      time.Duration
	configFile string
	check      bool
	// verbose: say on stderr what nexctl waits for and why, as answers come (debugf).
	verbose bool
	// allowUnsigned lets an environment be sealed to a bid that is not signed by the
	// node it names (upstream nodes do not sign).
	allowUnsigned bool
	pflags        *pflag.FlagSet
	res           *resolution // resolved once, on first use
	// cut is the first gather this run's NATS connection cut short by closing
	// (fleet.scatterGather): the command printed what came, and ends outcome unknown.
	cutMu sync.Mutex
	cut   error
}

// noteCut keeps the first gather cut short by the connection's close.
func (a *app) noteCut(err error) {
	a.cutMu.Lock()
	defer a.cutMu.Unlock()
	if a.cut == nil {
		a.cut = err
	}
}

// withCut is the run's error once a gather was cut short: outcome unknown (exit 3),
// whatever the command made of the answers that came (a lookup that found nothing
// among them failed for want of the others). An error that already says the link
// closed stands.
func (a *app) withCut(err error) error {
	a.cutMu.Lock()
	cut := a.cut
	a.cutMu.Unlock()
	switch {
	case cut == nil || errors.Is(err, errLinkClosed) || errors.Is(err, errCheckDone):
		return err
	case err == nil:
		return exitError{ExitUnknown, cut}
	}
	return exitError{ExitUnknown, fmt.Errorf("%w; then: %w", cut, err)}
}

// errCheckDone ends a run after --check printed the resolution.
var errCheckDone = errors.New("check done")

// resolved merges flags, environment and config files once per run and fills in the
// namespace and control socket they select.
func (a *app) resolved() *resolution {
	if a.res == nil {
		a.res = resolve(resolveInputs{flags: a.pflags, nats: &a.nats, env: a.io.Env, environ: a.io.Environ,
			load: defaultLoadOptions(a.configFile, a.io.Environ, a.io.Env), selected: func() string { return selectedContext(a.io.Env) }})
		a.namespace, a.socket = a.res.Namespace, a.res.ControlSocket
	}
	return a.res
}

// runCheck prints what nexctl resolved and where from (--check).
func (a *app) runCheck(cmd *cobra.Command) error {
	r := a.resolved()
	if err := r.useLocalNode(cmd.Context()); err != nil && r.Err == nil {
		r.Err = err
	}
	if a.json {
		if err := a.printJSON(r.checkJSON()); err != nil {
			return err
		}
	} else {
		r.render(a.out())
	}
	if r.Err != nil {
		return exitError{ExitUsage, r.Err}
	}
	return errCheckDone
}

// Main runs nexctl with args (without the program name) and returns the exit code.
func Main(ctx context.Context, args []string, stdio IO) int {
	if stdio.Env == nil {
		stdio.Env = func(string) string { return "" }
	}
	if stdio.Stdin == nil {
		stdio.Stdin = strings.NewReader("")
	}
	// Everything printed may carry strings from the network: no terminal control.
	stdio.Stdout, stdio.Stderr = sanitizer{stdio.Stdout}, sanitizer{stdio.Stderr}
	root, a := newRoot(stdio)
	root.SetArgs(args)
	failed, err := root.ExecuteContextC(ctx)
	err = a.withCut(err)
	if err == nil || errors.Is(err, errCheckDone) {
		return ExitOK
	}
	// A usage error may stop parsing before --json is seen.
	asJSON := a.json || slices.Contains(args, "--json") || slices.Contains(args, "--json=true")
	code, kind, msg := ExitFailed, "failed", err.Error()
	if errors.Is(err, nats.ErrPermissionViolation) {
		msg += refusedHint(msg)
	}
	var ue usageError
	var ee exitError
	switch {
	case errors.As(err, &ee):
		code, msg = ee.code, ""
		if ee.err != nil {
			msg = ee.err.Error()
		}
		switch code {
		case ExitUsage:
			kind = "usage"
		case ExitUnknown:
			kind = "unknown"
		}
	case errors.As(err, &ue) || isCobraUsage(err):
		code, kind = ExitUsage, "usage"
	case errors.Is(err, context.Canceled):
		kind, msg = "interrupted", "interrupted"
	}
	msg = clipMessage(msg, maxError)
	if asJSON {
		writeJSONError(stdio.Stderr, code, kind, msg, err)
		return code
	}
	switch {
	case msg == "":
	case kind == "usage" && ee.err == nil:
		// The help of the command that failed: its flags and arguments.
		help := "nexctl"
		if failed != nil {
			help = failed.CommandPath()
		}
		fmt.Fprintf(stdio.Stderr, "nexctl: %s\nRun '%s --help' for usage.\n", msg, help)
	default:
		fmt.Fprintf(stdio.Stderr, "nexctl: %s\n", msg)
	}
	return code
}

// jsonError is what --json prints on stderr for a failed command.
type jsonError struct {
	Error struct {
		Message  string `json:"message"`
		Kind     string `json:"kind"` // usage, failed, unknown or interrupted
		ExitCode int    `json:"exit_code"`
		// NodeCode is the $NEX micro error code, HTTPStatus the control socket's status.
		NodeCode   int `json:"node_code,omitempty"`
		HTTPStatus int `json:"http_status,omitempty"`
	} `json:"error"`
}

func writeJSONError(w io.Writer, code int, kind, msg string, err error) {
	var je jsonError
	je.Error.Message, je.Error.Kind, je.Error.ExitCode = msg, kind, code
	var ne *nodeError
	if errors.As(err, &ne) {
		je.Error.NodeCode = ne.Code
	}
	var ae *control.APIError
	if errors.As(err, &ae) {
		je.Error.HTTPStatus = ae.Status
	}
	b, _ := json.Marshal(je)
	fmt.Fprintln(w, string(b))
}

// isCobraUsage recognises cobra's own argument errors, which are not typed.
func isCobraUsage(err error) bool {
	s := err.Error()
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand flag", "flag needs an argument", "invalid argument", "required flag", "accepts ", "requires at least", "if any flags in the group"} {
		if strings.HasPrefix(s, p) || strings.Contains(s, " "+p) {
			return true
		}
	}
	return false
}

// NewRootCommand builds the whole command tree.
func NewRootCommand(stdio IO) *cobra.Command {
	root, _ := newRoot(stdio)
	return root
}

func newRoot(stdio IO) (*cobra.Command, *app) {
	a := &app{io: stdio}
	version := stdio.Version
	if version == "" {
		version = "dev"
	}
	root := &cobra.Command{
		Use:   "nexctl",
		Short: "Control a nexd node and a Nex fleet",
		Long: `nexctl controls the local nexd node through its control socket (status, reload,
lameduck, nexlets, workloads, logs, config, secrets) and the whole Nex fleet through
the $NEX NATS API (node and workload commands), which also works against upstream
Nex nodes.

Output is a table for people; --json prints JSON for scripts. Errors go to stderr.
Exit codes: 0 success, 1 failure (also a partial result: a list, top or drain that may
lack some nexlets' workloads, or a list a node answered with an error), 2 usage error, 3 outcome unknown (a deploy whose node
went silent mid-request: the workload may be running there; a stop the node holding the
workload answered with an error of its own (5xx): the stop may have gone on there; a list
or lookup cut short by nexctl's own NATS connection closing: what came is printed, the
rest is unknown).

Fleet requests carry a fresh random nonce (header Nex-Nonce); a nexd node signs each
reply with its node key over the nonce, the subject, the headers and the body. nexctl
refuses a reply whose signature does not verify, an unsigned reply in the name of a node
that signed in this run, a second copy of a signed reply (taken once per request) or of
a bid (each bidder and each signing node once per auction) or of a deploy's numbered
keep-alive or progress report, and,
for a node's info or lame duck, a deploy to a signed bid or the stop or clone of a
workload a signing node listed, every reply but that node's signed ones: whoever else
sees a request cannot answer it in a nexd node's name. Unsigned replies (upstream nodes,
older nexd nodes) are used as before; rows and answers from them are noted on stderr as
not verified, and with --trusted-node they are refused unless --allow-unsigned-bids.`,
		Version:       version,
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetOut(stdio.Stdout)
	root.SetErr(stdio.Stderr)
	root.SetIn(stdio.Stdin)
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })

	pf := root.PersistentFlags()
	pf.StringVar(&a.socket, "control-socket", control.DefaultSocketPath(stdio.Env), "nexd control socket (env NEX_CONTROL_SOCKET, or control_socket in the config)")
	pf.BoolVar(&a.json, "json", false, "print JSON instead of tables")
	pf.StringVar(&a.namespace, "namespace", protocol.SystemNamespace, "namespace for fleet commands (env NEX_NAMESPACE, or namespace in the config)")
	pf.DurationVar(&a.stall, "gather-stall", defaultStop, "scatter-gather ends this long after the last reply")
	pf.StringVar(&a.configFile, "config", "", "config file read after nexd's (/etc/nex/config.json, ~/.config/nex/config.json, ./config.json)")
	pf.BoolVar(&a.check, "check", false, "print the resolved settings and where each came from, then exit")
	pf.BoolVar(&a.verbose, "verbose", false, "say on stderr, as nodes answer, what a workload stop waits for and why (other nodes' answers while it waits for the node that holds the workload, that node's word)")
	pf.StringArray("trusted-node", nil, "a node id whose signed bids and answers are accepted (repeatable; trusted_nodes in the config); a bid or answer signed by any other node, or not signed (unless --allow-unsigned-bids), is refused before anything is sent")
	pf.BoolVar(&a.allowUnsigned, "allow-unsigned-bids", false, "seal environments to bids not signed by their node, and with --trusted-node take unsigned bids and answers (upstream nodes; anyone on the bus could pose as one)")
	a.nats.register(pf)
	a.pflags = pf
	root.RunE = groupRun
	root.Args = cobra.ArbitraryArgs
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		if a.check {
			return a.runCheck(cmd)
		}
		return nil
	}

	root.AddGroup(&cobra.Group{ID: "local", Title: "Local node (control socket):"},
		&cobra.Group{ID: "fleet", Title: "Fleet (NATS):"})
	for _, c := range a.localCommands() {
		c.GroupID = "local"
		root.AddCommand(c)
	}
	for _, c := range []*cobra.Command{a.nodeCommand(), a.workloadCommand(), a.eventsCmd(), a.doctorCmd(), a.topCmd()} {
		c.GroupID = "fleet"
		root.AddCommand(c)
	}
	root.AddCommand(genDocsCommand(root))
	return root, a
}

// groupRun is the RunE of a command that only groups subcommands: help without
// arguments, a usage error for an unknown subcommand.
func groupRun(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		// As cobra's own unknown-command error would (this RunE takes its place), at
		// cobra's default distance.
		if cmd.SuggestionsMinimumDistance <= 0 {
			cmd.SuggestionsMinimumDistance = 2
		}
		if sug := cmd.SuggestionsFor(args[0]); len(sug) > 0 {
			return usagef("unknown command %q for %q; did you mean %s?", args[0], cmd.CommandPath(), strings.Join(sug, " or "))
		}
		return usagef("unknown command %q for %q", args[0], cmd.CommandPath())
	}
	return cmd.Help()
}

// noArgs is cobra.NoArgs with a usage error.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

func exactArgs(n int, names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s needs %d argument(s) (%s), got %d", cmd.CommandPath(), n, strings.Join(names, " "), len(args))
		}
		return nil
	}
}

func rangeArgs(min, max int, names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < min || len(args) > max {
			return usagef("%s needs %d to %d argument(s) (%s), got %d", cmd.CommandPath(), min, max, strings.Join(names, " "), len(args))
		}
		return nil
	}
}

func (a *app) out() io.Writer { return a.io.Stdout }

// printJSON writes v as indented JSON.
func (a *app) printJSON(v any) error {
	enc := json.NewEncoder(a.io.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// kvFlag parses repeated k=v flags into a map.
type kvFlag struct {
	m    map[string]string
	name string
}

func newKV(name string) *kvFlag { return &kvFlag{name: name} }

func (f *kvFlag) String() string {
	var parts []string
	for k, v := range f.m {
		parts = append(parts, k+"="+v)
	}
	return strings.Join(parts, ",")
}

func (f *kvFlag) Set(s string) error {
	// Upstream separates pairs with ';' (kong's map syntax); commas work too.
	for _, part := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ';' }) {
		k, v, ok := strings.Cut(part, "=")
		if !ok || strings.TrimSpace(k) == "" {
			return fmt.Errorf("%q is not key=value", part)
		}
		if f.m == nil {
			f.m = map[string]string{}
		}
		f.m[strings.TrimSpace(k)] = v
	}
	return nil
}

func (f *kvFlag) Type() string { return "key=value" }

var _ pflag.Value = (*kvFlag)(nil)

// envFlag is like kvFlag but never splits on commas: values are arbitrary.
type envFlag struct{ m map[string]string }

// String is "" when none is set, so help shows no default ("0 variables" before).
func (f *envFlag) String() string {
	if len(f.m) == 0 {
		return ""
	}
	return fmt.Sprint(len(f.m), " variables")
}
func (f *envFlag) Set(s string) error {
	k, v, ok := strings.Cut(s, "=")
	if !ok || k == "" {
		return fmt.Errorf("%q is not KEY=VALUE", s)
	}
	if f.m == nil {
		f.m = map[string]string{}
	}
	f.m[k] = v
	return nil
}
func (f *envFlag) Type() string { return "KEY=VALUE" }

// refusedHint says what to do about a request the NATS server refused.
func refusedHint(msg string) string {
	if strings.Contains(msg, `Subscription to "_INBOX.`) {
		return " (this user may not receive replies on _INBOX.>: connect with its own inbox prefix, inbox_prefix in its NATS context, e.g. _INBOX_tenant-<namespace>)"
	}
	return " (this user's NATS permissions do not allow it; a tenant's user has only its own namespace: --namespace; 'nexctl doctor' shows what it may use)"
}
