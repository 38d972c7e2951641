package cli

import (
	"context"
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testnats"
)

// tombstoneBackend answers status as a node with tombstones.
type tombstoneBackend struct {
	*localBackend
	st control.Status
}

func (b tombstoneBackend) Status(context.Context) (control.Status, error) { return b.st, nil }

// TestTombstonesShown: a local node whose state bucket (real JetStream) still holds a
// stopped workload's record, its removal pending behind a tombstone: nexctl status
// counts and lists the tombstone (id, namespace, type, age), and nexctl node state
// marks that entry, in the table and as tombstoned_since in --json, and no other.
// Before, neither showed them (node state listed the entry as any other). The entry's
// key is <type>.<id>, as nexd stores it now (before the layout's change nexctl matched
// <type>_<id> only, and marked none).
func TestTombstonesShown(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	url := s.ClientURL()
	ctx := context.Background()
	id, _ := testnats.NewStateBucket(t, testnats.Connect(t, s),
		testnats.Record{Key: "native.WSTOPPED", Value: []byte(`{"request":{}}`)},
		testnats.Record{Key: "native_WRUNNING", Value: []byte(`{"request":{}}`)})
	newFakeNode(t, testnats.Connect(t, s), id, nil).start()
	since := time.Now().Add(-3 * time.Minute).UTC().Truncate(time.Second)
	b := tombstoneBackend{localBackend: &localBackend{secrets: map[string]string{}}, st: control.Status{NodeID: id, Name: "here",
		State: control.StateRunning, Workloads: map[string]int{"running": 1},
		Tombstones: []control.Tombstone{{ID: "WSTOPPED", Type: "native", Namespace: "tenant", Since: since}}}}
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	srv, err := control.Listen(sock, control.ServerOptions{Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(sctx) }()
	defer func() { cancel(); <-done }()
	sockArg := []string{"--control-socket", sock}

	out, errOut, code := runCLI(t, nil, append(sockArg, "status")...)
	// Ages in minutes and seconds: "3m", or "3m 1s" on a loaded machine.
	if code != 0 || !strings.Contains(out, "1 stopped workload(s) kept out of replays; removal from node state pending (oldest 3m") ||
		!strings.Contains(out, "│ WSTOPPED │ tenant    │ native │ "+since.Format(time.RFC3339)+" │ 3m") {
		t.Fatalf("status: exit %d, want the tombstone counted and listed:\n%s%s", code, out, errOut)
	}
	for _, args := range [][]string{{"node", "state"}, {"node", "state", id}} {
		out, errOut, code = runCLI(t, nil, natsArgs(url, append(sockArg, args...)...)...)
		if code != 0 || !strings.Contains(out, "STOPPED, removal pending for 3m") || strings.Count(out, "(tombstone)") != 1 ||
			!strings.Contains(lineWith(out, "native.WSTOPPED"), "(tombstone)") {
			t.Fatalf("%v: exit %d, want native.WSTOPPED alone marked:\n%s%s", args, code, out, errOut)
		}
	}
	out, errOut, code = runCLI(t, nil, natsArgs(url, append(sockArg, "--json", "node", "state")...)...)
	var entries []stateEntry
	if code != 0 || json.Unmarshal([]byte(out), &entries) != nil || len(entries) != 2 {
		t.Fatalf("node state --json: exit %d:\n%s%s", code, out, errOut)
	}
	for _, e := range entries {
		if marked := e.TombstonedSince != nil && e.TombstonedSince.Equal(since); marked != (e.Key == "native.WSTOPPED") {
			t.Errorf("--json entry %s: tombstoned_since %v", e.Key, e.TombstonedSince)
		}
	}
}

// lineWith is the first line of out holding s.
func lineWith(out, s string) string {
	for l := range strings.SplitSeq(out, "\n") {
		if strings.Contains(l, s) {
			return l
		}
	}
	return ""
}
