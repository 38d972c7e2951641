package daemon

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/daemon/config"
)

// TestManPageFlags: every flag nexd(8) names (written by hand) is one nexd takes; a
// renamed or removed flag fails here rather than in an operator's shell.
func TestManPageFlags(t *testing.T) {
	b, err := os.ReadFile("../contrib/man/nexd.8")
	if err != nil {
		t.Fatal(err)
	}
	fs := config.NewFlagSet()
	// troff writes a hyphen as \-; a flag is a run of them before a name.
	page := strings.ReplaceAll(string(b), `\-`, "-")
	// EXAMPLES shows other programs' flags too (systemctl --now, journalctl -u).
	if i, j := strings.Index(page, ".SH EXAMPLES"), strings.Index(page, ".SH SEE ALSO"); i >= 0 && j > i {
		page = page[:i] + page[j:]
	}
	seen := 0
	for _, m := range regexp.MustCompile(`(?:^|[\s"(])(--?)([a-z][a-z0-9.-]*)`).FindAllStringSubmatch(page, -1) {
		dashes, name := m[1], strings.TrimRight(m[2], ".-")
		if dashes == "-" && len(name) != 1 {
			continue // a hyphenated word, not a short flag
		}
		seen++
		var found bool
		if dashes == "-" {
			found = fs.ShorthandLookup(name) != nil
		} else {
			found = fs.Lookup(name) != nil
		}
		if !found {
			t.Errorf("nexd(8) names %s%s, which nexd does not take", dashes, name)
		}
	}
	if seen < 5 {
		t.Fatalf("found only %d flags in nexd(8): is the pattern still right?", seen)
	}
}
