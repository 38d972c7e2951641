package metrics

import (
	"strings"
	"testing"
)

// TestEscape checks the written-out escaping against the text format's rules as
// strings.Replacer states them.
func TestEscape(t *testing.T) {
	label := strings.NewReplacer(`\`, `\\`, "\n", `\n`, `"`, `\"`)
	help := strings.NewReplacer(`\`, `\\`, "\n", `\n`)
	for _, s := range []string{"", "plain", `a "quoted" \ name` + "\nwith a newline", `\\`, "\n\n", `"`, "ünïcode \"x\"\\"} {
		if got, want := escapeLabel(s), label.Replace(s); got != want {
			t.Errorf("escapeLabel(%q) = %q, want %q", s, got, want)
		}
		if got, want := escapeHelp(s), help.Replace(s); got != want {
			t.Errorf("escapeHelp(%q) = %q, want %q", s, got, want)
		}
	}
}
