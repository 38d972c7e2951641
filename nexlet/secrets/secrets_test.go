package secrets

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestFileStore(t *testing.T) {
	st := FileStore{Dir: filepath.Join(t.TempDir(), "secrets")}
	if err := st.Set("ns1", "DB_PASS", "hunter2"); err != nil {
		t.Fatal(err)
	}
	if err := st.Set("ns1", "API", "x"); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(st.Dir, "ns1", "DB_PASS"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v, want 0600", fi.Mode().Perm())
	}
	if v, err := st.Get("ns1", "DB_PASS"); err != nil || v != "hunter2" {
		t.Errorf("Get = %q, %v", v, err)
	}
	if _, err := st.Get("ns2", "DB_PASS"); !errors.Is(err, ErrNotFound) {
		t.Errorf("other namespace: %v, want ErrNotFound", err)
	}
	keys, err := st.List("ns1")
	if err != nil || !slices.Equal(keys, []string{"API", "DB_PASS"}) {
		t.Errorf("List = %v, %v", keys, err)
	}
	if err := st.Delete("ns1", "API"); err != nil {
		t.Fatal(err)
	}
	if err := st.Delete("ns1", "API"); !errors.Is(err, ErrNotFound) {
		t.Errorf("second delete: %v", err)
	}
}

func TestNamesAndResolve(t *testing.T) {
	st := FileStore{Dir: t.TempDir()}
	if err := st.Set("ns", "K", "v"); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, ns, in, want string
		wantErr            bool
	}{
		{"plain value", "ns", "hello", "hello", false},
		{"secret", "ns", "secret://K", "v", false},
		{"missing", "ns", "secret://NOPE", "", true},
		{"traversal key", "ns", "secret://../../etc/passwd", "", true},
		{"traversal ns", "..", "secret://K", "", true},
		{"empty key", "ns", "secret://", "", true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Resolve(st, tc.ns, tc.in)
			if (err != nil) != tc.wantErr || got != tc.want {
				t.Errorf("Resolve(%q) = %q, %v", tc.in, got, err)
			}
		})
	}
}
