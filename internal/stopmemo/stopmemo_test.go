package stopmemo

import (
	"fmt"
	"testing"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// The memo is bounded in count and age, and a namespace sees only its own stops.
func TestBoundsAndNamespaces(t *testing.T) {
	m := New(3, time.Minute)
	t0 := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	for i := range 5 {
		m.Add(fmt.Sprintf("w%d", i), Entry{Namespace: "a", At: t0.Add(time.Duration(i) * time.Second)})
	}
	if len(m.m) != 3 || len(m.order) != 3 {
		t.Fatalf("%d ids kept (%d in order), want 3", len(m.m), len(m.order))
	}
	if _, ok := m.Get("w1", "a", t0); ok {
		t.Fatal("w1 kept beyond the count")
	}
	if _, ok := m.Get("w4", "b", t0); ok {
		t.Fatal("namespace b sees namespace a's stop")
	}
	if _, ok := m.Get("w4", protocol.SystemNamespace, t0); !ok {
		t.Fatal("system does not see w4")
	}
	m.Add("w4", Entry{Namespace: "a", At: t0.Add(10 * time.Second)}) // again: one place
	if len(m.order) != 3 {
		t.Fatalf("order %v after a repeat", m.order)
	}
	if _, ok := m.Get("w4", "a", t0.Add(2*time.Minute)); ok {
		t.Fatal("w4 seen past its age")
	}
	m.Add("w9", Entry{Namespace: "a", At: t0.Add(2 * time.Minute)})
	if len(m.m) != 1 {
		t.Fatalf("%d ids kept after two minutes, want only the new one", len(m.m))
	}
	a := Entry{Type: "native", How: "exited after SIGTERM (exit code 0)", At: t0}.Answer("w9")
	if !a.Stopped || a.AlreadyStoppedAt != "2026-12-02T12:00:00Z" || a.Message != "already stopped at 2026-12-02T12:00:00Z (exited after SIGTERM (exit code 0))" {
		t.Fatalf("answer %+v", a)
	}
}

// Find matches a reference by id, name or id prefix, newest first, within the caller's
// namespace only (system sees all), and not past the memo's age.
func TestFindByNameAndPrefix(t *testing.T) {
	m := New(10, time.Minute)
	t0 := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	m.Add("AAA111", Entry{Namespace: "a", Name: "web", At: t0})
	m.Add("AAB222", Entry{Namespace: "a", Name: "db", At: t0.Add(time.Second)})
	m.Add("BBB333", Entry{Namespace: "b", Name: "web", At: t0.Add(2 * time.Second)})
	ids := func(ms []Match) string {
		var out []string
		for _, x := range ms {
			out = append(out, x.ID)
		}
		return fmt.Sprint(out)
	}
	now := t0.Add(3 * time.Second)
	for _, c := range []struct{ ref, ns, want string }{
		{"web", "a", "[AAA111]"},
		{"web", "b", "[BBB333]"},
		{"web", protocol.SystemNamespace, "[BBB333 AAA111]"},
		{"AA", "a", "[AAB222 AAA111]"},
		{"AA", "b", "[]"},
		{"BBB333", "a", "[]"}, // another namespace's id
		{"db", "c", "[]"},
		{"", "a", "[]"},
	} {
		if got := ids(m.Find(c.ref, c.ns, now, 10)); got != c.want {
			t.Errorf("Find(%q, %q) = %s, want %s", c.ref, c.ns, got, c.want)
		}
	}
	if got := ids(m.Find("web", "a", t0.Add(2*time.Minute), 10)); got != "[]" {
		t.Errorf("found past the age: %s", got)
	}
	if got := ids(m.Find("AA", "a", now, 1)); got != "[AAB222]" {
		t.Errorf("max 1: %s", got)
	}
}
