package cli

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNodeStateShowsBadRecords: a node's state bucket (real JetStream) holds two good
// records and, beside them, records a hand edit or a cut write leaves (the cases of
// e2e TestBadStateRecordsReportedGoodReplayed, and one past the bucket's value limit).
// nexctl node state runs the node's own check of a record read back
// (state.CheckReadBack): each bad record is listed as one the node does not replay,
// naming its field where one is at fault, in the table and in --json, the good ones
// as ok, and a line on stderr counts the bad; the listing does not fail. Before,
// every record was listed alike, the bad ones as if the node would replay them.
func TestNodeStateShowsBadRecords(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	url := s.ClientURL()
	good := protocol.StartWorkloadRequest{Description: "d", Name: "good", Namespace: "tenant", RunRequest: `{"cmd":"x"}`,
		Tags: map[string]string{}, WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "native"}
	goodJSON, err := json.Marshal(good)
	if err != nil {
		t.Fatal(err)
	}
	edit := func(field, raw string) []byte { return testkit.EditJSON(t, goodJSON, field, raw) }
	records := []struct {
		key   string
		value []byte
		field string // "" and bad: the key or the value as a whole
		bad   bool
		says  string
	}{
		{key: "native_GOODA", value: goodJSON},
		{key: "native_GOODB", value: goodJSON},
		{key: "native_BADNOSPACE", value: edit("namespace", ""), field: "namespace", bad: true},
		{key: "native_BADJSON", value: []byte(`{"name":"cut`), bad: true},
		{key: "native_BADNAMETYPE", value: edit("name", "42"), field: "name", bad: true},
		{key: "native_sub/dir", value: goodJSON, bad: true, says: "not a plain token"},
		{key: "native_BADOTHERTYPE", value: edit("workload_type", `"oci"`), field: "workload_type", bad: true},
		{key: "native_BADLONGNAME", value: edit("name", `"`+strings.Repeat("n", 2000)+`"`), field: "name", bad: true},
		{key: "native_BADCONTROL", value: edit("name", `"a\u001b[2Jb"`), field: "name", bad: true},
	}
	var seed []testnats.Record
	for _, r := range records {
		seed = append(seed, testnats.Record{Key: r.key, Value: r.value})
	}
	id, _ := testnats.NewStateBucket(t, testnats.Connect(t, s), seed...)
	newFakeNode(t, testnats.Connect(t, s), id, nil).start()
	const badCount = 7

	out, errOut, code := runCLI(t, nil, natsArgs(url, "node", "state", id)...)
	if code != 0 {
		t.Fatalf("node state: exit %d, want 0 (bad records are shown, the listing does not fail):\n%s%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "7 of 9 records in nex-"+id+" cannot be replayed") {
		t.Errorf("stderr %q does not count the bad records", errOut)
	}
	for _, r := range records {
		line := lineWith(out, r.key)
		switch {
		case line == "":
			t.Errorf("%s is not listed:\n%s", r.key, out)
		case !r.bad && (!strings.Contains(line, "│ ok") || strings.Contains(line, "BAD")):
			t.Errorf("good record %s is not shown ok: %q", r.key, line)
		case r.bad && !strings.Contains(line, "BAD, not replayed"):
			t.Errorf("bad record %s is shown as if the node replayed it: %q", r.key, line)
		case r.bad && r.field != "" && !strings.Contains(line, `field "`+r.field+`"`):
			t.Errorf("bad record %s: the row does not name field %q: %q", r.key, r.field, line)
		case r.says != "" && !strings.Contains(line, r.says):
			t.Errorf("bad record %s: the row does not say %q: %q", r.key, r.says, line)
		}
	}
	t.Logf("nexctl node state:\n%s%s", out, errOut)
	if strings.Contains(out, "\x1b") {
		t.Errorf("a control character of a record reached the terminal:\n%q", out)
	}

	out, errOut, code = runCLI(t, nil, natsArgs(url, "--json", "node", "state", id)...)
	var entries []stateEntry
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil || len(entries) != len(records) {
		t.Fatalf("node state --json: exit %d:\n%s%s", code, out, errOut)
	}
	byKey := map[string]stateEntry{}
	for _, e := range entries {
		byKey[e.Key] = e
	}
	refused := 0
	for _, r := range records {
		e := byKey[r.key]
		switch {
		case !r.bad && e.Refused != nil:
			t.Errorf("--json: good record %s refused: %+v", r.key, *e.Refused)
		case r.bad && e.Refused == nil:
			t.Errorf("--json: bad record %s not refused", r.key)
		case r.bad && (e.Refused.Field != r.field || e.Refused.Error == ""):
			t.Errorf("--json: bad record %s refused %+v, want field %q and why", r.key, *e.Refused, r.field)
		}
		if e.Refused != nil {
			refused++
		}
	}
	if refused != badCount {
		t.Errorf("--json: %d records refused, want %d", refused, badCount)
	}
}
