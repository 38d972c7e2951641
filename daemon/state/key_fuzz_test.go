package state

import (
	"fmt"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/protocol"
)

// FuzzStateKeys: the key layouts <type>.<id> (StoredKey) and an older nexd's
// <type>_<id> (Key) name one workload each, and are read back as written. For any type
// and id, Key and StoredKey agree on taking them; a key they make splits back into the
// same type and id (SplitKey) and is one DecodeRecord's key check takes, so nothing
// written under it is skipped at the next replay; and for any key a bucket may hold,
// one the check takes is one of the two keys of the type and id it splits into.
func FuzzStateKeys(f *testing.F) {
	for _, s := range [][2]string{
		{"native", "GOOD1"}, {"native_x", "A-1"}, {"_", "x"}, {"a.b", "c"}, {"a", "b_c"},
		{"a", "b.c"}, {"", "x"}, {"x", ""}, {"*", "x"}, {"native", ">"},
		{"native", strings.Repeat("A", MaxWorkloadIDLen+1)},
	} {
		f.Add(s[0], s[1], s[0]+"."+s[1])
	}
	f.Add("t", "i", "native_a_b")
	f.Add("t", "i", "_x")
	f.Add("t", "i", "x_")
	f.Add("t", "i", "a.b.c")
	f.Add("t", "i", probeKey)
	f.Fuzz(func(t *testing.T, typ, id, key string) {
		old, errOld := Key(typ, id)
		stored, errStored := StoredKey(typ, id)
		if (errOld == nil) != (errStored == nil) {
			t.Fatalf("Key(%q, %q) = %q, %v but StoredKey = %q, %v", typ, id, old, errOld, stored, errStored)
		}
		if errOld == nil {
			for _, k := range []string{old, stored} {
				gotTyp, gotID, ok := SplitKey(k)
				if !ok || gotTyp != typ || gotID != id {
					t.Fatalf("key %q of (%q, %q) splits into (%q, %q, %v)", k, typ, id, gotTyp, gotID, ok)
				}
				if err := checkKey(k); err != nil {
					t.Fatalf("key %q of (%q, %q) is refused when read back: %v", k, typ, id, err)
				}
			}
			if stored == old || IsProbeKey(stored) || IsProbeKey(old) {
				t.Fatalf("(%q, %q): keys %q and %q", typ, id, stored, old)
			}
			if strings.Count(stored, ".") != 1 || strings.ContainsAny(stored, "*> \t\r\n") || strings.Contains(old, ".") {
				t.Fatalf("(%q, %q): stored key %q is not two subject tokens, or old key %q not one", typ, id, stored, old)
			}
		} else if !strings.Contains(errOld.Error(), "workload type") && !strings.Contains(errOld.Error(), "workload id") {
			t.Fatalf("Key(%q, %q): error does not say which part is wrong: %v", typ, id, errOld)
		}

		err := checkKey(key)
		gotTyp, gotID, ok := SplitKey(key)
		if err != nil {
			if !strings.Contains(err.Error(), fmt.Sprintf("record %q", key)) {
				t.Fatalf("key %q refused without naming it: %v", key, err)
			}
			return
		}
		if !ok || !protocol.IsToken(gotTyp) {
			t.Fatalf("key %q taken but splits into (%q, %q, %v)", key, gotTyp, gotID, ok)
		}
		o, err1 := Key(gotTyp, gotID)
		s, err2 := StoredKey(gotTyp, gotID)
		if err1 != nil || err2 != nil || key != o && key != s {
			t.Fatalf("key %q taken, but the keys of (%q, %q) are %q, %v and %q, %v", key, gotTyp, gotID, o, err1, s, err2)
		}
	})
}
