package procid

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse reads arbitrary pid records: no panic, an error quotes the record, and a
// record accepted names a pid other than 0 and 1 and reads back the same from Format.
func FuzzParse(f *testing.F) {
	for _, s := range []string{"1234 5678", " 2 0\n", "1 5", "0 0", "-5 1", "12 -1", "12 3 4", "+12 3", "99999999999999999999 1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		id, err := Parse(s)
		if err != nil {
			if !strings.Contains(err.Error(), "process id ") {
				t.Fatalf("%q: error %q does not say what it read", s, err)
			}
			return
		}
		if id.PID <= 1 {
			t.Fatalf("%q read as pid %d", s, id.PID)
		}
		if back, err := Parse(id.Format()); err != nil || back != id {
			t.Fatalf("%q: %+v formatted as %q reads back as %+v, %v", s, id, id.Format(), back, err)
		}
	})
}

// FuzzParseStat reads arbitrary /proc/<pid>/stat contents (a process's name, between
// the parentheses, is its own choice): no panic, and the fields after the last ')'
// are the ones read, whatever the name holds.
func FuzzParseStat(f *testing.F) {
	const tail = " S 1 1234 1234 0 -1 4194560 100 0 0 0 0 0 0 0 20 0 3 0 987654 0 0\n"
	f.Add([]byte("1234 (sh)"+tail), "sh")
	f.Add([]byte("1234 (a) b)"+tail), ") R 9 9 9")
	f.Add([]byte("1 (x) Z 0 1"), "")
	f.Add([]byte("1 (x) Z 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 99999999999999999999 1 1"), "x")
	f.Fuzz(func(t *testing.T, b []byte, name string) {
		_, _ = parseStat(b)
		st, err := parseStat([]byte("1234 (" + name + ")" + tail))
		if err != nil || st.State != 'S' || st.PPID != 1 || st.PGRP != 1234 || st.Threads != 3 || st.Start != 987654 {
			t.Fatalf("name %q: read %+v, %v", name, st, err)
		}
	})
}

// FuzzReadExit reads arbitrary exit records (nexd's reaper writes them; a crash or a
// full disk may leave anything): no panic, an error names the record, and the records
// WriteExit writes read back the same.
func FuzzReadExit(f *testing.F) {
	f.Add([]byte("0 exited"), 1, "signal: killed", uint32(61184), true)
	f.Add([]byte("137 signal: killed\nuid=61184"), -1, "", uint32(0), false)
	f.Add([]byte("x\nuid=1"), 255, "a\tb", uint32(4294967295), true)
	dir := f.TempDir()
	id := ID{PID: 4242, Start: 99}
	f.Fuzz(func(t *testing.T, rec []byte, code int, reason string, uid uint32, hasUID bool) {
		if err := os.WriteFile(filepath.Join(dir, id.String()), rec, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadExit(dir, id); err != nil && !strings.Contains(err.Error(), "exit record "+id.String()) {
			t.Fatalf("%q: error %q does not name the record", rec, err)
		}
		if strings.Contains(reason, "\n") {
			return // reasons are one line (ExitOf)
		}
		e := Exit{Code: code, Reason: reason, UID: uid, HasUID: hasUID}
		if !hasUID {
			e.UID = 0
		}
		if err := WriteExit(dir, id, e); err != nil {
			t.Fatal(err)
		}
		if got, err := ReadExit(dir, id); err != nil || got != e {
			t.Fatalf("%+v read back as %+v, %v", e, got, err)
		}
	})
}
