package state

import (
	"encoding/json"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// goodRecord is a record as nexd writes it.
func goodRecord(t testing.TB) []byte {
	t.Helper()
	req := request("web", "tenant-a", "native", `{"uri":"file:///bin/true"}`)
	req.Owner = "native-1"
	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// badRecords are records of node state that must not be replayed, by key, with the
// field the error must name ("" for the key or the value as a whole).
func badRecords(t testing.TB) []struct{ key, value, field, says string } {
	good := string(goodRecord(t))
	set := func(field, raw string) string {
		var m map[string]json.RawMessage
		if err := json.Unmarshal([]byte(good), &m); err != nil {
			t.Fatal(err)
		}
		if raw == "" {
			delete(m, field)
		} else {
			m[field] = json.RawMessage(raw)
		}
		b, _ := json.Marshal(m)
		return string(b)
	}
	return []struct{ key, value, field, says string }{
		{"native_NONAMESPACE", set("namespace", ""), "namespace", "missing"},
		{"native_NOTYPE", set("workload_type", ""), "workload_type", "missing"},
		{"native_NOLIFECYCLE", set("workload_lifecycle", ""), "workload_lifecycle", "missing"},
		{"native_EMPTYNS", set("namespace", `""`), "namespace", "token"},
		{"native_DOTNS", set("namespace", `"a.b"`), "namespace", "token"},
		{"native_LONGNS", set("namespace", `"`+strings.Repeat("n", 300)+`"`), "namespace", "more than 256"},
		{"native_BADNAME", set("name", `"web\u001b[2J"`), "name", "control characters"},
		{"native_LONGNAME", set("name", `"`+strings.Repeat("n", 2000)+`"`), "name", "more than 256"},
		{"native_NUMNAME", set("name", `42`), "name", "expected string"},
		{"native_TAGSLIST", set("tags", `["a"]`), "tags", "expected map"},
		{"native_LIFECYCLE", set("workload_lifecycle", `"forever"`), "workload_lifecycle", "not one of"},
		{"native_OTHERTYPE", set("workload_type", `"oci"`), "workload_type", "key's workload type"},
		{"native_NOTJSON", "not json", "", "malformed JSON"},
		{"native_NULL", "null", "", "null"},
		{"native_EMPTY", "", "", "empty"},
		{"native_x/../../system.slice", good, "", "not a plain token"},
		{"native_x=y", good, "", "not a plain token"},
		{"native_cgroup/cgroup.procs", good, "", "not a plain token"},
		{"native_" + strings.Repeat("A", 65), good, "", "more than 64"},
		{"native", good, "", "<workload type>.<workload id>"},
		{"na/tive_ID", good, "", "workload type"},
		{"native.x.y", good, "", "not a plain token"},
		{"native.x_y", good, "", "not a plain token"},
		{"native_HUGE", set("description", `"`+strings.Repeat("d", 70_000)+`"`), "", "exceeds"},
	}
}

func TestDecodeRecordNamesKeyAndField(t *testing.T) {
	if _, err := DecodeRecord("native_GOOD1", goodRecord(t), MaxValueSize); err != nil {
		t.Fatalf("good record: %v", err)
	}
	// What an older nexd or upstream may have recorded before a deploy's bounds.
	old := request("my web", strings.Repeat("L", 100), "native", "{}")
	b, _ := json.Marshal(old)
	if _, err := DecodeRecord("native_OLD1", b, MaxValueSize); err != nil {
		t.Fatalf("an older nexd's record: %v", err)
	}
	for _, c := range badRecords(t) {
		_, err := DecodeRecord(c.key, []byte(c.value), MaxValueSize)
		var re *RecordError
		if !errors.As(err, &re) {
			t.Errorf("%s: got %v, want a RecordError", c.key, err)
			continue
		}
		if re.Key != c.key || re.Field != c.field || !strings.Contains(err.Error(), c.says) || !strings.Contains(err.Error(), c.key) {
			t.Errorf("%s: got key %q field %q: %v; want field %q saying %q", c.key, re.Key, re.Field, err, c.field, c.says)
		}
	}
}

// TestBadRecordsAmongGoodAreSkipped: a real bucket holding bad records among good ones
// (written as a hand edit or a cut write would leave them) gives back every good
// record and reports each bad one by key and field: a replay's read (ByType) those
// under its type's keys, All those an older nexd's keys name too. Before, a record
// without a namespace or with an id like "x/../../system.slice" came back as good.
func TestBadRecordsAmongGoodAreSkipped(t *testing.T) {
	s := testnats.Start(t, testnats.Options{})
	nc := testnats.Connect(t, s)
	ctx := testCtx(t)
	var logs testkit.Buffer
	kv, err := OpenKV(ctx, nc, "NODE1", "", slog.New(slog.NewTextHandler(&logs, nil)))
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{"GOOD1", "GOOD2", "GOOD3"} {
		if err := kv.Put(ctx, "native", id, request("w-"+id, "tenant-a", "native", "{}")); err != nil {
			t.Fatal(err)
		}
	}
	bad := badRecords(t)
	var stored []struct{ key, value, field, says string }
	for _, c := range bad {
		if typ, id, ok := strings.Cut(c.key, "_"); ok && typ == "native" && !strings.Contains(id, ".") {
			c.key = "native." + id // the same record in this nexd's layout
			stored = append(stored, c)
		}
	}
	for _, c := range bad {
		if _, err := kv.kv.Put(ctx, c.key, []byte(c.value)); err != nil {
			// The bucket's own key rules refuse some keys; no record, nothing to skip.
			t.Logf("bucket refused key %s: %v", c.key, err)
			continue
		}
	}
	for _, c := range stored {
		if _, err := kv.kv.Put(ctx, c.key, []byte(c.value)); err != nil {
			t.Logf("bucket refused key %s: %v", c.key, err)
		}
	}
	got, err := kv.ByType(ctx, "native")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 3 || got["GOOD1"].Name != "w-GOOD1" || got["GOOD2"].Name != "w-GOOD2" || got["GOOD3"].Name != "w-GOOD3" {
		t.Fatalf("got %d records: %v", len(got), got)
	}
	checkReported(t, kv, &logs, stored)
	all, err := kv.All(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 3 || all["native_GOOD1"].Name != "w-GOOD1" {
		t.Fatalf("All: %d records: %v", len(all), all)
	}
	checkReported(t, kv, &logs, bad)
}

// checkReported checks that each of the records bad that the bucket holds is in the log
// by its key and field.
func checkReported(t *testing.T, kv *KV, logs *testkit.Buffer, bad []struct{ key, value, field, says string }) {
	t.Helper()
	ctx := testCtx(t)
	for _, c := range bad {
		if _, err := kv.kv.Get(ctx, c.key); err != nil {
			continue // never stored
		}
		if c.value == "" {
			continue // an empty value is a delete marker to the watcher: never read back
		}
		line := ""
		for l := range strings.Lines(logs.String()) {
			if strings.Contains(l, "key="+c.key+" ") || strings.Contains(l, `key="`+c.key+`"`) {
				line = l
			}
		}
		if line == "" || !strings.Contains(line, "field="+c.field) && !strings.Contains(line, `field="`+c.field+`"`) {
			t.Errorf("record %s: not reported with its field %q; log:\n%s", c.key, c.field, line)
		}
	}
}

// FuzzStateRecord: whatever a record's key and value, DecodeRecord refuses it with an
// error naming the key, or returns a request a deploy over NATS would have passed
// (protocol.Decode of its encoding; a namespace and a name within CheckRecord's bounds) under a key Key makes.
func FuzzStateRecord(f *testing.F) {
	f.Add("native_GOOD1", goodRecord(f))
	f.Add("native.GOOD1", goodRecord(f))
	for _, c := range badRecords(f) {
		f.Add(c.key, []byte(c.value))
	}
	f.Add("native_A", []byte(`{"description":"","name":"a","namespace":"b","run_request":"","tags":null,"workload_lifecycle":"job","workload_type":"native","metadata":{"x":[1,{"y":null}]},"reference":"r","nexd_owner":7}`))
	f.Fuzz(func(t *testing.T, key string, value []byte) {
		req, err := DecodeRecord(key, value, MaxValueSize)
		if err != nil {
			var re *RecordError
			if !errors.As(err, &re) || re.Key != key || !strings.Contains(err.Error(), "record ") {
				t.Fatalf("error does not name the record %q: %v", key, err)
			}
			return
		}
		typ, id, ok := SplitKey(key)
		k, err := Key(typ, id)
		stored, _ := StoredKey(typ, id)
		if !ok || err != nil || k != key && stored != key {
			t.Fatalf("key %q accepted but Key(%q, %q) = %q, %v and StoredKey %q", key, typ, id, k, err, stored)
		}
		if len(id) > MaxWorkloadIDLen || len(value) > MaxValueSize {
			t.Fatalf("accepted id of %d or value of %d bytes", len(id), len(value))
		}
		if req.WorkloadType != typ || !req.WorkloadLifecycle.Valid() || !protocol.IsToken(req.Namespace) ||
			len(req.Namespace) > MaxRecordNameLen || req.Name == "" || len(req.Name) > MaxRecordNameLen ||
			!utf8.ValidString(req.Name) || strings.ContainsFunc(req.Name, unicode.IsControl) {
			t.Fatalf("accepted %+v under %q", req, key)
		}
		b, err := json.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		var again protocol.StartWorkloadRequest
		if err := protocol.Decode(b, &again); err != nil {
			t.Fatalf("accepted record does not decode as a deploy: %v", err)
		}
	})
}
