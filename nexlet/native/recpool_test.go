package native

import (
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// readyDirs lists the ready record directories under procs.
func readyDirs(t *testing.T, procs string) []string {
	t.Helper()
	ents, err := os.ReadDir(procs)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), recordPoolPrefix) {
			out = append(out, e.Name())
		}
	}
	return out
}

// TestRecordPool: a deploy gets its output FIFOs from a record directory made ahead,
// renamed to the workload's id; the pool makes the next one; a stopped nexlet leaves
// none behind.
func TestRecordPool(t *testing.T) {
	n := benchNexlet(t, 0)
	procs := filepath.Join(n.cfg.RuntimeDir, "procs")
	full := func() bool { return len(n.records.pool) == cap(n.records.pool) }
	testkit.Eventually(t, "record pool filled", full)
	before := readyDirs(t, procs)
	if len(before) != DefaultRecordPool {
		t.Fatalf("ready directories %v, want %d", before, DefaultRecordPool)
	}
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "echo pooled; exec sleep 600"}}
	req := startReq(protocol.LifecycleService, "rp1", run, protocol.NatsConnectionData{})
	if _, err := n.StartWorkload("rp1", &req, false); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.StopWorkload("rp1", &protocol.StopWorkloadRequest{Namespace: testNS}) }()
	for _, s := range []string{"stdout", "stderr"} {
		fi, err := os.Lstat(filepath.Join(procs, "rp1", s))
		if err != nil || fi.Mode()&fs.ModeNamedPipe == 0 {
			t.Fatalf("rp1 %s: %v, %v: want a FIFO", s, fi, err)
		}
	}
	left := readyDirs(t, procs)
	if gone := slices.DeleteFunc(slices.Clone(before), func(d string) bool { return slices.Contains(left, d) }); len(gone) != 1 {
		t.Errorf("ready directories after a deploy %v, want one of %v renamed away", left, before)
	}
	testkit.Eventually(t, "record pool refilled", full)
	for _, d := range readyDirs(t, procs) {
		if slices.Contains(n.HeldWorkloads(), d) {
			t.Errorf("HeldWorkloads lists the ready directory %s", d)
		}
	}
	n.records.stopRecordPool()
	if left := readyDirs(t, procs); len(left) != 0 {
		t.Errorf("ready directories left after the pool stopped: %v", left)
	}
}

// TestRecordPoolLeftovers: a new nexlet removes the ready directories of a nexlet that
// is gone and leaves those of one that still runs (a hand-over).
func TestRecordPoolLeftovers(t *testing.T) {
	dir := t.TempDir()
	procs := filepath.Join(dir, "procs")
	dead := fmt.Sprintf("%s%d-1", recordPoolPrefix, 1<<22+7) // above pid_max's default range
	live := fmt.Sprintf("%s%d-1", recordPoolPrefix, 1)       // init always runs
	for _, d := range []string{dead, live} {
		if err := os.MkdirAll(filepath.Join(procs, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	p := newRecordPool(procs, 1, slog.New(slog.DiscardHandler))
	defer p.stopRecordPool()
	if _, err := os.Stat(filepath.Join(procs, dead)); !os.IsNotExist(err) {
		t.Errorf("a gone nexlet's ready directory is still there (%v)", err)
	}
	if _, err := os.Stat(filepath.Join(procs, live)); err != nil {
		t.Errorf("a running nexlet's ready directory was removed: %v", err)
	}
}
