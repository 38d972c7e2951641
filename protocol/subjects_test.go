package protocol

import (
	"regexp"
	"testing"
)

// TestIsToken checks the loop against the rule it replaced, ^[A-Za-z0-9_-]+$.
func TestIsToken(t *testing.T) {
	re := regexp.MustCompile(`^[A-Za-z0-9_-]+$`)
	for _, s := range []string{"", "a", "default", "Ns_1-2", "a.b", "a b", "a/b", "*", ">", "ü", "a\n", "-", "_", "0"} {
		if got, want := IsToken(s), re.MatchString(s); got != want {
			t.Errorf("IsToken(%q) = %v, want %v", s, got, want)
		}
	}
}
