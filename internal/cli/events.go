package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/nats-io/nats.go"
	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// eventTypes are the event types nodes and nexlets publish.
var eventTypes = []string{
	protocol.EventNodeStarted, protocol.EventNodeStopped, protocol.EventNodeLameduckSet,
	protocol.EventAgentStarted, protocol.EventAgentStopped, protocol.EventAgentLameduckSet,
	protocol.EventAgentHealthChanged, protocol.EventWorkloadStarted, protocol.EventWorkloadStopped,
}

// eventLine is one event as `events --json` prints it.
type eventLine struct {
	Time    time.Time       `json:"time"` // when nexctl received it
	Type    string          `json:"type"`
	From    string          `json:"from"` // node id, or namespace for workload events
	Subject string          `json:"subject"`
	Event   json.RawMessage `json:"event"`
}

// eventsSubject is the feed subject for the filters: a node's events, one namespace's
// workload events, or everything.
func eventsSubject(nodeID, namespace, typ string) string {
	from := "*"
	switch {
	case nodeID != "":
		from = nodeID
	case namespace != "" && namespace != protocol.SystemNamespace:
		from = namespace
	}
	if typ == "" {
		typ = "*"
	}
	return protocol.EventSubject(from, typ)
}

// describeEvent is the human summary of one event.
func describeEvent(typ string, data []byte) string {
	var m map[string]any
	_ = json.Unmarshal(data, &m)
	str := func(k string) string { s, _ := m[k].(string); return s }
	switch typ {
	case protocol.EventWorkloadStarted:
		return fmt.Sprintf("workload %s started (%s, namespace %s)", str("id"), str("workload_type"), str("namespace"))
	case protocol.EventWorkloadStopped:
		var ev protocol.WorkloadStoppedEvent
		_ = json.Unmarshal(data, &ev)
		s := fmt.Sprintf("workload %s stopped (%s, namespace %s)", ev.ID, ev.WorkloadType, ev.Namespace)
		if ev.Error != nil {
			if ev.Error.Code != "" {
				s += ": exit code " + ev.Error.Code
			}
			if ev.Error.Message != "" {
				s += ": " + ev.Error.Message
			}
		}
		return s
	case protocol.EventNodeStarted:
		return fmt.Sprintf("node %s started (%s, nexus %s)", str("id"), str("name"), str("nexus"))
	case protocol.EventNodeStopped:
		return fmt.Sprintf("node %s stopped", str("id"))
	case protocol.EventNodeLameduckSet:
		return fmt.Sprintf("node %s in lame duck mode; workloads stop at %s", str("id"), str("time"))
	case protocol.EventAgentStarted:
		return fmt.Sprintf("nexlet %s registered (%s)", str("name"), str("register_type"))
	case protocol.EventAgentStopped:
		return fmt.Sprintf("nexlet %s stopped: %s", str("name"), str("reason"))
	case protocol.EventAgentLameduckSet:
		return fmt.Sprintf("nexlets in lame duck mode (success %v)", m["success"])
	case protocol.EventAgentHealthChanged:
		return fmt.Sprintf("nexlet %s health %s -> %s", str("name"), orDash(str("from")), str("to"))
	}
	return string(data)
}

func (a *app) eventsCmd() *cobra.Command {
	var follow bool
	var typ, node string
	var wait time.Duration
	cmd := &cobra.Command{
		Use:   "events",
		Short: "Show node, nexlet and workload events from the event feed; -f follows them",
		Long: `Show events as nodes publish them on $NEX.FEED.<node id|namespace>.events.<TYPE>
(nodes need events = "nats"): node started, stopped and lame duck; nexlet registered,
stopped, health changes and lame duck; workload started and stopped (with the exit code
and reason). Node and nexlet events are keyed by node id, workload events by namespace:
--node shows one node's, --namespace (other than system) one namespace's workloads'.
The feed is live: without -f, events arriving within --wait are shown.

Types: ` + strings.Join(eventTypes, ", "),
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			typ = strings.ToUpper(strings.TrimSpace(typ))
			if typ != "" && !slices.Contains(eventTypes, typ) {
				return usagef("--type %q is not one of %s", typ, strings.Join(eventTypes, ", "))
			}
			f, done, err := a.connectFleet(cmd.Context())
			if err != nil {
				return err
			}
			defer done()
			if node != "" {
				if node, err = f.resolveNode(cmd.Context(), node); err != nil {
					return err
				}
			}
			subject := eventsSubject(node, a.namespace, typ)
			before := f.nc.LastError()
			sub, err := scatter.Stream(f.nc, subject)
			if err != nil {
				return fmt.Errorf("subscribe to %s: %w", subject, err)
			}
			defer sub.Close()
			if err := f.nc.Flush(); err != nil {
				return fmt.Errorf("subscribe to %s: %w", subject, err)
			}
			if err := scatter.Refused(f.nc, before, subject); err != nil {
				return err
			}
			if follow {
				// Said once the subscription is in place, so a script can act on it.
				if a.json {
					b, _ := json.Marshal(map[string]string{"following": subject})
					fmt.Fprintln(a.io.Stderr, string(b))
				} else {
					fmt.Fprintf(a.io.Stderr, "nexctl: following %s (Ctrl-C to stop)\n", subject)
				}
			}
			ctx := cmd.Context()
			if !follow {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, wait)
				defer cancel()
			}
			n, err := a.readStream(ctx, sub, "events", func(m *nats.Msg) error { return a.printEvent(a.out(), m, time.Now()) })
			if err != nil {
				return err
			}
			if !follow && n == 0 {
				a.warnf("no events arrived within %s on %s; the feed is live, use -f to follow it (a node publishes events only with events = \"nats\" in its config)", wait, subject)
			}
			return nil
		},
	}
	fl := cmd.Flags()
	fl.BoolVarP(&follow, "follow", "f", false, "keep printing events until interrupted")
	fl.StringVar(&typ, "type", "", "only events of this type (e.g. WORKLOADSTOPPED)")
	fl.StringVar(&node, "node", "", "only this node's node and nexlet events (id, name or id prefix)")
	fl.DurationVar(&wait, "wait", 2*time.Second, "without -f, how long to collect events")
	_ = cmd.RegisterFlagCompletionFunc("type", cobra.FixedCompletions(eventTypes, cobra.ShellCompDirectiveNoFileComp))
	_ = cmd.RegisterFlagCompletionFunc("node", a.completeNodes())
	return cmd
}

// readStream prints what stream brings with print until ctx ends, and returns how many
// it printed. Messages dropped for being past the stream's bound (the output fell that
// far behind) are warned of as they are noticed, and the stream goes on; a closed
// connection ends it with an error. what names the messages.
func (a *app) readStream(ctx context.Context, stream *scatter.Replies, what string, print func(*nats.Msg) error) (int, error) {
	n, lost := 0, 0
	for {
		m, err := stream.Next(ctx)
		switch {
		case errors.Is(err, scatter.ErrClosed):
			return n, fmt.Errorf("%s: nexctl's NATS connection closed: %w", what, nats.ErrConnectionClosed)
		case err != nil:
			return n, nil // the wait is over, or interrupted
		}
		if d := stream.Dropped(); d > lost {
			a.warnf("%d %s dropped: their output fell %d MiB or %d of them behind", d-lost, what, scatter.StreamPendingBytes>>20, scatter.StreamPendingMsgs)
			lost = d
		}
		n++
		if err := print(m); err != nil {
			return n, err
		}
	}
}

func (a *app) printEvent(w io.Writer, m *nats.Msg, now time.Time) error {
	typ := protocol.LastToken(m.Subject)
	from := protocol.Token(m.Subject, 2)
	if a.json {
		raw := json.RawMessage(m.Data)
		if !utf8.Valid(raw) {
			// json.Valid takes bytes that are not UTF-8, and they went out as they
			// came (a lone 0x9b is CSI to a terminal in an 8-bit locale): decoded and
			// encoded again, they are U+FFFD.
			var v any
			d := json.NewDecoder(bytes.NewReader(raw))
			d.UseNumber()
			if d.Decode(&v) == nil && !d.More() {
				raw, _ = json.Marshal(v)
			}
		}
		if !json.Valid(raw) || !utf8.Valid(raw) {
			b, _ := json.Marshal(string(m.Data))
			raw = b
		}
		b, err := json.Marshal(eventLine{Time: now.UTC(), Type: typ, From: from, Subject: m.Subject, Event: raw})
		if err != nil {
			return err
		}
		_, err = fmt.Fprintln(w, string(b))
		return err
	}
	_, err := fmt.Fprintf(w, "%s  %-18s %s\n", now.Format(time.RFC3339), typ, describeEvent(typ, m.Data))
	return err
}
