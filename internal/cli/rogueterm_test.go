package cli

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// hostileLine is output a workload (or a rogue node publishing its feed) writes to
// reach the operator's terminal through nexctl: DEL, a lone C1 byte (CSI, 0x9b, which a
// terminal in an 8-bit locale obeys as ESC [), the same as UTF-8 (U+009B), ESC, and a
// right-to-left override (U+202E: a terminal that does bidi shows "exe.jpg" after it).
const hostileLine = "a\x7fb\x9b2Jc\u009b2Jd\x1b[2Je\u202egpj.exe"

// followFeed runs nexctl args (a -f follow of a feed) in-process on s and publishes
// marker on subject until nexctl printed it (its subscription is in place), then
// payload and a last marker, and returns what it printed once that one came.
func followFeed(t *testing.T, url string, publish func([]byte) error, args ...string) string {
	t.Helper()
	var out, errb testkit.Buffer
	ctx, cancel := context.WithCancel(t.Context())
	exited := make(chan int, 1)
	go func() {
		exited <- Main(ctx, natsArgs(url, args...), IO{Stdout: &out, Stderr: &errb, Env: func(string) string { return "" }})
	}()
	defer func() { cancel(); <-exited }()
	seen := func(marker string) bool {
		return testkit.WaitFor(30*time.Second, func() bool {
			select {
			case code := <-exited:
				exited <- code
				return true
			default:
			}
			if strings.Contains(out.String(), marker) {
				return true
			}
			_ = publish([]byte(marker))
			return false
		}) && strings.Contains(out.String(), marker)
	}
	if !seen("ready-marker") {
		t.Fatalf("nexctl %v printed no line of the feed:\n%s\n%s", args, out.String(), errb.String())
	}
	if err := publish([]byte(hostileLine)); err != nil {
		t.Fatal(err)
	}
	if !seen("end-marker") {
		t.Fatalf("nexctl %v did not print the line after the hostile one:\n%s\n%s", args, out.String(), errb.String())
	}
	return out.String()
}

// rawTerminalControl is the first byte of s a terminal may obey as a control: C0 but
// newline and tab, DEL, a C1 control in UTF-8, a byte 0x80-0x9f that is no part of a
// UTF-8 sequence (a C1 control to a terminal in an 8-bit locale), or a bidi control.
// -1 for none.
func rawTerminalControl(s string) int {
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n == 1 && s[i] >= 0x80 && s[i] <= 0x9f:
			return i
		case r < 0x20 && r != '\n' && r != '\t', r >= 0x7f && r <= 0x9f, isBidiControl(r):
			return i
		}
		i += n
	}
	return -1
}

// TestAttackHostileOutputReachesTerminal: a workload's output (here published on its
// log feed, as its node forwards it) and a rogue node's event carry DEL and C1
// controls. Before, nexctl's escaping missed a C1 byte that is not UTF-8 (0x9b went to
// the terminal as it came: CSI in an 8-bit locale), and wrote DEL as \x7f, which made
// `logs --json` print lines that are not JSON (the operator's jq stopped there), and
// `events --json` passed an event's bytes through whole, the lone 0x9b too. Now every
// such byte is shown escaped in text, and --json lines are JSON whose strings say what
// came (DEL as \u007f, a byte that is not UTF-8 as U+FFFD).
func TestAttackHostileOutputReachesTerminal(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	def := "default"
	node := newFakeNode(t, testnats.Connect(t, s), "NODE", nil)
	node.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, WorkloadType: "native"}}
	node.start()
	pub := testnats.Connect(t, s)
	logs := func(b []byte) error { return pub.Publish(protocol.LogSubject(def, "W1", "stdout"), b) }
	events := func(b []byte) error {
		name := string(b)
		if name == hostileLine {
			// JSON as a rogue node may write it: DEL and the bytes that are not UTF-8
			// as they are (json.Valid takes both), ESC escaped (a raw one is not JSON).
			name = strings.ReplaceAll(hostileLine, "\x1b", `\u001b`)
		}
		return pub.Publish(protocol.EventSubject(def, "WORKLOADSTARTED"), []byte(`{"id":"W1","workload_type":"native","namespace":"`+name+`"}`))
	}

	for name, args := range map[string][]string{
		"logs -f":   {"--namespace", def, "workload", "logs", "W1", "-f"},
		"events -f": {"--namespace", def, "events", "-f"},
	} {
		publish := logs
		if name == "events -f" {
			publish = events
		}
		text := followFeed(t, s.ClientURL(), publish, args...)
		if i := rawTerminalControl(text); i >= 0 {
			t.Errorf("%s wrote byte %#x of hostile output to the terminal as it came: %q", name, text[i], text)
		}
	}

	for name, run := range map[string]struct {
		publish func([]byte) error
		args    []string
	}{
		"logs --json":   {logs, []string{"--namespace", def, "--json", "workload", "logs", "W1", "-f"}},
		"events --json": {events, []string{"--namespace", def, "--json", "events", "-f"}},
	} {
		out := followFeed(t, s.ClientURL(), run.publish, run.args...)
		if i := rawTerminalControl(out); i >= 0 {
			t.Errorf("%s wrote byte %#x as it came: %q", name, out[i], out)
		}
		found := false
		for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
			var v any
			if err := json.Unmarshal([]byte(line), &v); err != nil {
				t.Errorf("%s printed a line that is not JSON (%v): %q", name, err, line)
				continue
			}
			if strings.Contains(fmtJSON(v), "a\u007fb\ufffd2Jc\u009b2Jd\x1b[2Je\u202egpj.exe") {
				found = true
			}
		}
		if !found {
			t.Errorf("%s: no JSON line says what the hostile line said:\n%q", name, out)
		}
	}
}

// fmtJSON is every string in v, joined.
func fmtJSON(v any) string {
	var b strings.Builder
	var walk func(any)
	walk = func(v any) {
		switch v := v.(type) {
		case string:
			b.WriteString(v + "\n")
		case map[string]any:
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(v)
	return b.String()
}
