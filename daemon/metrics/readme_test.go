package metrics

import (
	"os"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEListsEveryMetric: every nexd_ family this package serves is named in the
// README's list of metrics (the `nexctl metrics` row), by name or by a listed prefix
// (`nexd_state_*`): that list is where an operator looks for what to scrape and alert
// on. nexd_auctions_dropped_total and nexd_nexlet_socket_refused_total were served and
// not listed.
func TestREADMEListsEveryMetric(t *testing.T) {
	src, err := os.ReadFile("metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var row string
	for l := range strings.SplitSeq(string(readme), "\n") {
		if strings.HasPrefix(l, "| `nexctl metrics` |") {
			row = l
		}
	}
	if row == "" {
		t.Fatal("no `nexctl metrics` row in README.md")
	}
	listed := map[string]bool{}
	var prefixes []string
	for _, m := range regexp.MustCompile("`(nexd_[a-z_]+)(\\*)?").FindAllStringSubmatch(row, -1) {
		if m[2] != "" {
			prefixes = append(prefixes, m[1])
		} else {
			listed[m[1]] = true
		}
	}
	served := regexp.MustCompile(`"(nexd_[a-z_]+)"`).FindAllStringSubmatch(string(src), -1)
	if len(served) < 10 {
		t.Fatalf("found %d nexd_ families in metrics.go; the pattern no longer matches how they are registered", len(served))
	}
	for _, m := range served {
		name := m[1]
		ok := listed[name]
		for _, p := range prefixes {
			ok = ok || strings.HasPrefix(name, p)
		}
		if !ok {
			t.Errorf("%s is served but not listed in README.md's `nexctl metrics` row", name)
		}
	}
}
