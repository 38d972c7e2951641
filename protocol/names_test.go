package protocol

import (
	"strings"
	"testing"
)

func TestCheckNamespace(t *testing.T) {
	for _, c := range []struct {
		ns, err string
	}{
		{"system", ""},
		{"a", ""},
		{"tenant-A_1", ""},
		{strings.Repeat("n", MaxNamespaceLen), ""},
		{strings.Repeat("n", MaxNamespaceLen+1), "65 characters long, more than 64"},
		{strings.Repeat("n", 4096), "4096 characters long, more than 64"},
		{"", "must be one subject token"},
		{"a.b", "must be one subject token"},
		{"*", "must be one subject token"},
		{">", "must be one subject token"},
		{"$KV", "must be one subject token"},
		{"a b", "must be one subject token"},
		{"ns\n", `"ns\n" must be one subject token`},
		{"é", `"\u00e9" must be one subject token`},
	} {
		err := CheckNamespace(c.ns)
		if (err == nil) != (c.err == "") || err != nil && !strings.Contains(err.Error(), c.err) {
			t.Errorf("CheckNamespace(%.20q): %v, want %q", c.ns, err, c.err)
		}
		if IsNamespace(c.ns) != (err == nil) {
			t.Errorf("IsNamespace(%.20q) = %v, CheckNamespace says %v", c.ns, IsNamespace(c.ns), err)
		}
	}
}

// FuzzCheckNamespace: IsNamespace and CheckNamespace agree, accept exactly one token of
// [A-Za-z0-9_-] of 1-MaxNamespaceLen bytes, and a refusal quotes at most the bound.
func FuzzCheckNamespace(f *testing.F) {
	for _, s := range []string{"system", "", "a.b", strings.Repeat("x", MaxNamespaceLen+1), "\xff", "ns\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, ns string) {
		err := CheckNamespace(ns)
		want := ns != "" && len(ns) <= MaxNamespaceLen && strings.Trim(ns, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-") == ""
		if (err == nil) != want || IsNamespace(ns) != want {
			t.Fatalf("%q: CheckNamespace %v, IsNamespace %v, want valid %v", ns, err, IsNamespace(ns), want)
		}
		if err != nil && len(err.Error()) > 8*MaxNamespaceLen+200 {
			t.Fatalf("refusal of a %d-byte namespace is %d bytes", len(ns), len(err.Error()))
		}
	})
}
