package native

import (
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/procid"
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
// is gone and leaves those of one that still runs (a hand-over). A nexlet is named by
// pid and start time: a directory whose pid now names another process (a reused pid:
// here a live process with another start time) is stale, and so is a malformed name
// (the pid-only form of older nexlets among them). Before the start time was in the
// name, the reused pid's directory stayed forever.
func TestRecordPoolLeftovers(t *testing.T) {
	other := exec.Command("sleep", "60") // the nexlet that still runs
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = other.Process.Kill(); _ = other.Wait() }()
	live, err := procid.Of(other.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	name := func(id procid.ID) string { return recordPoolPrefix + id.String() + "-1" }
	reused := live
	reused.Start++ // same pid, another process: the nexlet that made it is gone
	kept := []string{name(live)}
	removed := []string{
		name(procid.ID{PID: 1<<22 + 7, Start: 5}), // pid above pid_max's default range
		name(reused), // pid reused
		name(procid.ID{PID: 1, Start: 1<<40 + 3}),    // init, but not with this start time
		fmt.Sprintf("%s%d-1", recordPoolPrefix, 1),   // pid-only (older nexlets)
		fmt.Sprintf("%s%d-x-1", recordPoolPrefix, 1), // malformed
		recordPoolPrefix + live.String(),             // malformed: no sequence number
		recordPoolPrefix + live.String() + "-1-2",    // malformed: extra field
	}
	for _, dirs := range []string{"procs", "workloads"} { // record pool, uid pool
		t.Run(dirs, func(t *testing.T) {
			d := filepath.Join(t.TempDir(), dirs)
			for _, n := range append(slices.Clone(kept), removed...) {
				if err := os.MkdirAll(filepath.Join(d, n, "home"), 0o700); err != nil {
					t.Fatal(err)
				}
			}
			if dirs == "procs" {
				p := newRecordPool(d, 1, slog.New(slog.DiscardHandler))
				testkit.Eventually(t, "record pool filled", func() bool { return len(p.pool) == 1 })
				p.stopRecordPool()
			} else {
				removeStaleReady(d) // as startPool does
			}
			for _, n := range removed {
				if _, err := os.Stat(filepath.Join(d, n)); !os.IsNotExist(err) {
					t.Errorf("stale ready directory %s is still there (%v)", n, err)
				}
			}
			for _, n := range kept {
				if _, err := os.Stat(filepath.Join(d, n)); err != nil {
					t.Errorf("a running nexlet's ready directory %s was removed: %v", n, err)
				}
			}
		})
	}
}
