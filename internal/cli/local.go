package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
)

func (a *app) client() *control.Client {
	a.resolved()
	return control.NewClient(a.socket)
}

// localCommands are the commands served by the local nexd over its control socket.
func (a *app) localCommands() []*cobra.Command {
	return []*cobra.Command{
		a.statusCmd(), a.reloadCmd(), a.lameduckCmd(), a.nexletsCmd(), a.nexletCmd(),
		a.workloadsCmd(), a.logsCmd(), a.configCmd(), a.secretCmd(), a.metricsCmd(), a.credsCmd(),
	}
}

func (a *app) credsCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "creds", Short: "NATS credentials for the node's embedded server"}
	var admin bool
	var ttl time.Duration
	issue := &cobra.Command{
		Use:   "issue --admin [--ttl 24h]",
		Short: "Print an admin .creds file for the node's zero-config embedded NATS (for a remote operator)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if !admin {
				return usagef("only --admin credentials can be issued here (workloads and nexlets get theirs from the node)")
			}
			if ttl <= 0 {
				return usagef("--ttl must be positive")
			}
			c := a.client()
			defer c.Close()
			acc, err := c.NATSAccessFor(cmd.Context(), ttl)
			if err != nil {
				return err
			}
			if acc.Creds == "" {
				return errors.New("this node hands out no credentials: it does not run the zero-config embedded NATS server (use your NATS system's own tools)")
			}
			if a.json {
				return a.printJSON(acc)
			}
			_, err = io.WriteString(a.out(), acc.Creds)
			return err
		},
	}
	issue.Flags().BoolVar(&admin, "admin", false, "a credential with every permission in the node's nex account")
	issue.Flags().DurationVar(&ttl, "ttl", 24*time.Hour, "how long the credential is valid")
	cmd.AddCommand(issue)
	return cmd
}

func (a *app) metricsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "metrics",
		Short: "Print the local node's Prometheus metrics (text exposition format)",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			m, err := c.Metrics(cmd.Context())
			if err != nil {
				return err
			}
			_, err = a.out().Write(m)
			return err
		},
	}
}

func (a *app) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show the local node: identity, state, NATS, cgroups, nexlets, workloads",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			st, err := c.Status(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(st)
			}
			return renderStatus(a.out(), st, time.Now())
		},
	}
}

func (a *app) reloadCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "reload",
		Short: "Validate and apply the config on disk (as SIGHUP); non-zero exit lists every error",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			res, err := c.Reload(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				if err := a.printJSON(res); err != nil {
					return err
				}
			} else if res.OK {
				if len(res.Applied) == 0 {
					fmt.Fprintln(a.out(), "Config reloaded: nothing changed")
				} else {
					fmt.Fprintf(a.out(), "Config reloaded; applied: %s\n", strings.Join(res.Applied, ", "))
				}
			}
			if !res.OK {
				var b strings.Builder
				b.WriteString("reload rejected; the running config is unchanged:")
				for _, e := range res.Errors {
					b.WriteString("\n  - " + e)
				}
				return exitError{ExitFailed, errors.New(b.String())}
			}
			return nil
		},
	}
}

func (a *app) lameduckCmd() *cobra.Command {
	var delay time.Duration
	var wait bool
	cmd := &cobra.Command{
		Use:   "lameduck",
		Short: "Put the local node in lame duck mode: stop bidding now, stop workloads after --delay",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if delay < 0 {
				return usagef("--delay %s must not be negative", delay)
			}
			c := a.client()
			defer c.Close()
			res, err := c.Lameduck(cmd.Context(), delay)
			if err != nil {
				return err
			}
			if !a.json {
				fmt.Fprintf(a.out(), "Node is in lame duck mode. Workloads will stop at %s\n", res.Until.Format(time.RFC3339))
			}
			killed, partial := 0, ""
			if wait {
				if killed, partial, err = a.watchLocalDrain(cmd.Context(), res.Until); err != nil {
					return err
				}
			}
			if a.json {
				out := map[string]any{"until": res.Until}
				if wait {
					out["drained"], out["killed"] = partial == "", killed
				}
				if err := a.printJSON(out); err != nil {
					return err
				}
			}
			if partial != "" {
				return exitError{ExitFailed, fmt.Errorf("nexd stopped, but its last list was partial (%s): their workloads may still run", partial)}
			}
			if killed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d workload(s) ignored SIGTERM and were killed at the end of their stop grace", killed)}
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&delay, "delay", time.Minute, "how long workloads keep running before they are stopped")
	cmd.Flags().BoolVar(&wait, "wait", false, "follow the drain until the node has stopped; exit 1 if a workload had to be killed, or nexd stopped on a partial list without logging its drain done")
	return cmd
}

func (a *app) nodeReexecCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "reexec",
		Short: "Re-execute the local nexd's installed binary in place (same pid, workloads keep running)",
		Long: `Re-execute the local nexd in place, as systemctl daemon-reexec does for systemd: nexd
lets go of its workloads, stops its nexlets, NATS and sockets, and execve()s the binary
installed at its path (after a package upgrade: the new version) with the same pid. The
new nexd adopts every running workload. The same as sending nexd SIGUSR2.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			if err := c.Reexec(cmd.Context()); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]string{"status": "re-executing"})
			}
			fmt.Fprintln(a.out(), "nexd is re-executing; `nexctl status` answers again once it is ready.")
			return nil
		},
	}
}

func (a *app) nexletsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "nexlets",
		Short: "List the local node's nexlets",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			ns, err := c.Nexlets(cmd.Context())
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(ns)
			}
			return renderNexlets(a.out(), ns, time.Now())
		},
	}
}

func (a *app) nexletCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "nexlet",
		Short: "Act on one nexlet of the local node",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "restart NAME",
		Short: "Reset a nexlet's restart count and restart it (also one that gave up)",
		Long: `Reset a nexlet's restart count and restart it: a failed nexlet (one that gave up
after agent_restart_limit restarts) is started again. A running one is stopped first
(SIGTERM, then SIGKILL after stop_grace), and its workloads stop with it; the node starts
them again, with the same ids, once the nexlet has registered again.`,
		Args:              exactArgs(1, "NAME"),
		ValidArgsFunction: a.completeNexlets,
		RunE: func(cmd *cobra.Command, args []string) error {
			c := a.client()
			defer c.Close()
			if err := c.RestartNexlet(cmd.Context(), args[0]); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(map[string]string{"restarted": args[0]})
			}
			fmt.Fprintf(a.out(), "Nexlet %s restarted\n", args[0])
			return nil
		},
	})
	return cmd
}

func (a *app) workloadsCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "workloads",
		Short: "List what the local node runs, with cgroup stats",
		Long: `List what the local node runs, with cgroup stats. When a nexlet missed the node's
fan-out (busy, restarting) or answered with an error, nexctl prints the rows that came,
warns on stderr naming the nexlet, and exits 1.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			ws, err := c.Workloads(cmd.Context())
			var partial *control.PartialList
			if errors.As(err, &partial) {
				a.warnf("%v", partial)
			} else if err != nil {
				return err
			}
			if a.json {
				if ws == nil {
					ws = []control.Workload{}
				}
				err = a.printJSON(ws)
			} else {
				err = renderLocalWorkloads(a.out(), ws, time.Now())
			}
			if err == nil && partial != nil {
				// The rows above are all that came, as for workload list.
				return exitError{ExitFailed, errors.New("the list is partial: some nexlets' workloads are missing (see the warning)")}
			}
			return err
		},
	}
}

func (a *app) logsCmd() *cobra.Command {
	var q control.LogQuery
	cmd := &cobra.Command{
		Use:   "logs",
		Short: "Show recent log lines of the local node; -f follows new ones",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if q.Nexlet != "" && q.Workload != "" {
				return usagef("--nexlet and --workload are mutually exclusive")
			}
			if q.Lines < 0 {
				return usagef("--lines must not be negative")
			}
			c := a.client()
			defer c.Close()
			emit := func(l control.LogLine) error {
				if a.json {
					b, err := json.Marshal(l)
					if err != nil {
						return err
					}
					_, err = fmt.Fprintln(a.out(), string(b))
					return err
				}
				_, err := fmt.Fprintln(a.out(), formatLogLine(l))
				return err
			}
			lines, err := c.Logs(cmd.Context(), q)
			if err != nil {
				return err
			}
			for _, l := range lines {
				if err := emit(l); err != nil {
					return err
				}
			}
			if !q.Follow {
				return nil
			}
			err = c.FollowLogs(cmd.Context(), q, emit)
			if errors.Is(err, context.Canceled) || cmd.Context().Err() != nil {
				return nil // Ctrl-C ends a follow normally
			}
			return err
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&q.Follow, "follow", "f", false, "keep printing new lines until interrupted")
	f.StringVar(&q.Nexlet, "nexlet", "", "only lines of this nexlet")
	f.StringVar(&q.Workload, "workload", "", "only lines of this workload id")
	f.IntVarP(&q.Lines, "lines", "n", 0, "how many recent lines (0: the node's default)")
	_ = cmd.RegisterFlagCompletionFunc("nexlet", a.completeNexlets)
	_ = cmd.RegisterFlagCompletionFunc("workload", a.completeLocalWorkloads)
	return cmd
}

func (a *app) configCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "config",
		Short: "Print the local node's resolved config and where each value came from, secrets redacted",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c := a.client()
			defer c.Close()
			raw, err := c.Config(cmd.Context())
			if err != nil {
				return err
			}
			if !a.json {
				if ok, err := renderConfig(a.out(), raw); ok || err != nil {
					return err
				}
			}
			var buf bytes.Buffer
			if err := json.Indent(&buf, raw, "", "  "); err != nil {
				return fmt.Errorf("node sent invalid config JSON: %w", err)
			}
			buf.WriteByte('\n')
			_, err = a.out().Write(buf.Bytes())
			return err
		},
	}
}

func (a *app) secretCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "secret",
		Short: "Manage workload secrets (secret://KEY values) on the local node",
		Args:  cobra.ArbitraryArgs,
		RunE:  groupRun,
	}
	var inArgv bool
	set := &cobra.Command{
		Use:   "set NAMESPACE KEY [-]",
		Short: "Set a secret; its value is asked for (no echo) on a terminal, else read from stdin (one trailing newline is dropped)",
		Long: `Set a secret. The value is read from stdin: at a prompt without echo when stdin is a
terminal, else all of it, one trailing newline dropped ('-' as the third argument says the
same). A value given as the third argument is refused unless --insecure-argv: every local
user can read a process's command line in /proc/PID/cmdline, and the shell keeps it in its
history.`,
		Args: rangeArgs(2, 3, "NAMESPACE", "KEY", "[-]"),
		RunE: func(cmd *cobra.Command, args []string) error {
			value, err := a.secretValue(cmd.Context(), args[0], args[1], args, inArgv)
			if err != nil {
				return err
			}
			c := a.client()
			defer c.Close()
			if err := c.SetSecret(cmd.Context(), args[0], args[1], value); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(control.SecretInfo{Namespace: args[0], Key: args[1]})
			}
			fmt.Fprintf(a.out(), "Secret %s/%s set\n", args[0], args[1])
			return nil
		},
	}
	set.Flags().BoolVar(&inArgv, "insecure-argv", false, "take the value from the third argument, where every local user can read it (/proc/PID/cmdline) while nexctl runs")
	cmd.AddCommand(set)
	cmd.AddCommand(&cobra.Command{
		Use:     "list NAMESPACE",
		Aliases: []string{"ls"},
		Short:   "List the names of a namespace's secrets (never their values)",
		Args:    exactArgs(1, "NAMESPACE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := a.client()
			defer c.Close()
			keys, err := c.ListSecrets(cmd.Context(), args[0])
			if err != nil {
				return err
			}
			if a.json {
				return a.printJSON(keys)
			}
			if len(keys) == 0 {
				fmt.Fprintf(a.out(), "No secrets in namespace %s\n", args[0])
				return nil
			}
			for _, k := range keys {
				fmt.Fprintln(a.out(), k)
			}
			return nil
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:     "rm NAMESPACE KEY",
		Aliases: []string{"delete"},
		Short:   "Remove a secret",
		Args:    exactArgs(2, "NAMESPACE", "KEY"),
		RunE: func(cmd *cobra.Command, args []string) error {
			c := a.client()
			defer c.Close()
			if err := c.DeleteSecret(cmd.Context(), args[0], args[1]); err != nil {
				return err
			}
			if a.json {
				return a.printJSON(control.SecretInfo{Namespace: args[0], Key: args[1]})
			}
			fmt.Fprintf(a.out(), "Secret %s/%s removed\n", args[0], args[1])
			return nil
		},
	})
	return cmd
}

// renderConfig prints the node's config answer ({"files", "settings": {key: {value,
// origin}}, "warnings"}) as a table; ok is false when raw has another shape.
func renderConfig(w io.Writer, raw []byte) (bool, error) {
	var cfg struct {
		Files    []string `json:"files"`
		Settings map[string]struct {
			Value  any    `json:"value"`
			Origin string `json:"origin"`
		} `json:"settings"`
		Warnings []string `json:"warnings"`
	}
	if json.Unmarshal(raw, &cfg) != nil || len(cfg.Settings) == 0 {
		return false, nil
	}
	keys := make([]string, 0, len(cfg.Settings))
	for k := range cfg.Settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	rows := make([][]string, 0, len(keys))
	for _, k := range keys {
		st := cfg.Settings[k]
		v, ok := st.Value.(string)
		if !ok {
			b, _ := json.Marshal(st.Value)
			v = string(b)
		}
		rows = append(rows, []string{k, orDash(v), st.Origin})
	}
	if err := table(w, "", []string{"Setting", "Value", "From"}, rows); err != nil {
		return true, err
	}
	files := "none"
	if len(cfg.Files) > 0 {
		files = strings.Join(cfg.Files, ", ")
	}
	fmt.Fprintf(w, "Config files read: %s\n", files)
	for _, warn := range cfg.Warnings {
		fmt.Fprintf(w, "Warning: %s\n", warn)
	}
	return true, nil
}
