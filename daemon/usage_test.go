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
