package e2e

import (
	"context"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestBadStateRecordsReportedGoodReplayed: node state (the real JetStream KV bucket
// nex-<node id>) holds two services nexd recorded and, written beside them while nexd
// was stopped, records a hand edit or a cut write leaves: no namespace, not JSON, a
// name of the wrong JSON type, an id that is not a plain token ("sub/dir", which the
// bucket's key rules allow), another workload type than the key's, a kilobyte-long
// name. Each bad record is a copy of a good one's start request, so any of them that
// reached the native nexlet would run. After nexd's restart the two services are
// replayed and run, nothing else runs, and nexd's log names each bad record by key
// and field. Before, a record was only unmarshalled: the ones without a namespace,
// with the wrong type or the "sub/dir" id were handed to the nexlet.
func TestBadStateRecordsReportedGoodReplayed(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	base := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), extra: []string{"--state", "kv"}}
	n := startNode(t, base)
	st := n.waitReady(t)
	good := []runResult{
		n.runWorkload(t, "--name", "good-a", "--", "/bin/sleep", "600"),
		n.runWorkload(t, "--name", "good-b", "--", "/bin/sleep", "600"),
	}
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d after SIGTERM\n%s", code, n.out.String())
	}

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kv := testnats.StateBucket(t, testnats.Connect(t, s), st.NodeID)
	e, err := kv.Get(ctx, "native."+good[0].ID)
	if err != nil {
		t.Fatalf("the first service's record: %v", err)
	}
	edit := func(field, raw string) []byte { return testkit.EditJSON(t, e.Value(), field, raw) }
	bad := []struct {
		key   string
		value []byte
		field string
	}{
		{"native.BADNOSPACE", edit("namespace", ""), "namespace"},
		{"native.BADJSON", []byte(`{"name":"cut`), ""},
		{"native.BADNAMETYPE", edit("name", "42"), "name"},
		{"native.sub/dir", e.Value(), ""},
		{"native.BADOTHERTYPE", edit("workload_type", `"oci"`), "workload_type"},
		{"native.BADLONGNAME", edit("name", `"`+strings.Repeat("n", 2000)+`"`), "name"},
	}
	for _, b := range bad {
		if _, err := kv.Put(ctx, b.key, b.value); err != nil {
			t.Fatalf("put %s: %v", b.key, err)
		}
	}

	base.cgroup = n.cgroup // the same node: the same cgroup root
	n2 := startNode(t, base)
	n2.waitReady(t)
	n2.waitNative(t)
	ids := func(ws []control.Workload) []string {
		var out []string
		for _, w := range ws {
			out = append(out, w.ID)
		}
		slices.Sort(out)
		return out
	}
	want := []string{good[0].ID, good[1].ID}
	slices.Sort(want)
	var ws []control.Workload
	// Listed and past "starting": a replayed service is listed starting until its
	// process runs, which at load 25 came after its first listing.
	if !testkit.WaitFor(60*time.Second, func() bool {
		ws = n2.workloads(t)
		return slices.Equal(ids(ws), want) && !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.State == "starting" })
	}) && !slices.Equal(ids(ws), want) {
		t.Fatalf("after the restart the node runs %v, want only the services %v", ids(ws), want)
	}
	for _, w := range ws {
		if w.State != "running" {
			t.Errorf("workload %s (%s) is %s after the replay", w.ID, w.Name, w.State)
		}
	}
	time.Sleep(time.Second) // a bad record handed to the nexlet would be listed by now
	if got := ids(n2.workloads(t)); !slices.Equal(got, want) {
		t.Errorf("after the replay the node runs %v, want only %v", got, want)
	}
	for _, b := range bad {
		field := "field=" + b.field + " "
		if b.field == "" {
			field = `field="" `
		}
		found := false
		for l := range strings.Lines(n2.out.String()) {
			if strings.Contains(l, "cannot be replayed") && strings.Contains(l, "key="+b.key+" ") &&
				strings.Contains(l, field) {
				found = true
			}
		}
		if !found {
			t.Errorf("bad record %s not reported by key with field %q", b.key, b.field)
		}
	}
	// They stay for the operator to mend or remove. (A context of its own: the test's
	// minute ran out before this at CI's load 60.)
	ctx, cancel = context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, b := range bad {
		if _, err := kv.Get(ctx, b.key); err != nil {
			t.Errorf("bad record %s: %v", b.key, err)
		}
	}
}
