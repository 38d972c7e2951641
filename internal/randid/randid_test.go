package randid

import (
	"strings"
	"testing"
)

// TestShape: ids keep a nuid's shape (upstream Nex and nexd's checks take them) and do
// not repeat.
func TestShape(t *testing.T) {
	seen := map[string]bool{}
	for range 10000 {
		id := New()
		if len(id) != Len || strings.Trim(id, digits) != "" {
			t.Fatalf("id %q: want %d of [0-9A-Za-z]", id, Len)
		}
		if seen[id] {
			t.Fatalf("id %q twice", id)
		}
		seen[id] = true
	}
}
