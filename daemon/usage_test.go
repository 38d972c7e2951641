package daemon

import (
	"io"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/cli"
)

// TestNexctlHintCoversNexctl: every nexctl top-level command (and alias) typed to nexd
// gets the `did you mean nexctl …` hint, not a bare "see nexd --help". The list in
// isNexctlCommand is kept by hand (nexd does not link nexctl's command tree); before,
// it lacked creds, doctor, events and top.
func TestNexctlHintCoversNexctl(t *testing.T) {
	root := cli.NewRootCommand(cli.IO{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard,
		Env: func(string) string { return "" }})
	for _, c := range root.Commands() {
		if c.Hidden || c.Name() == "help" || c.Name() == "completion" {
			continue
		}
		for _, name := range append([]string{c.Name()}, c.Aliases...) {
			if !isNexctlCommand(name) {
				t.Errorf("nexctl command %q is not in isNexctlCommand", name)
			}
			if msg := unknownArgs([]string{name, "x"}); !strings.Contains(msg, "did you mean `nexctl "+name+" x`?") {
				t.Errorf("nexd %s x: %q", name, msg)
			}
		}
	}
	for _, own := range []string{"up", "nexd", "bogus"} {
		if isNexctlCommand(own) {
			t.Errorf("%q is taken for a nexctl command", own)
		}
	}
}

// TestInvalidConfigHeader: the heading of nexd's configuration errors counts them in
// English ("1 error", "2 errors"; before, "1 errors") and each error names its source.
func TestInvalidConfigHeader(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--bogus"}, "nexd: configuration is invalid (1 error):\n  command line: unknown flag --bogus\n"},
		{[]string{"--auction-ttl", "5", "--logger.level", "loud"}, "nexd: configuration is invalid (2 errors):\n"},
	} {
		var out, errb strings.Builder
		code := Main(t.Context(), tc.args, &out, &errb, Early{})
		if code != ExitUsage || !strings.HasPrefix(errb.String(), tc.want) {
			t.Errorf("nexd %v: exit %d, stderr %q, want it to begin %q", tc.args, code, errb.String(), tc.want)
		}
	}
}
