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
	"time"

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
	// The pid record went into the pool's pid.tmp (writeReadyPID).
	if _, err := os.Lstat(filepath.Join(procs, "rp1", "pid.tmp")); !os.IsNotExist(err) {
		t.Errorf("rp1 pid.tmp after the launch: %v, want it renamed to pid", err)
	}
	n.mu.Lock()
	pid := n.workloads["rp1"].pid
	n.mu.Unlock()
	if p, ok := n.readPID("rp1"); !ok || p.PID != pid {
		t.Errorf("rp1 pid record %v %v, want the workload's pid", p, ok)
	}
	left := readyDirs(t, procs)
	if gone := slices.DeleteFunc(slices.Clone(before), func(d string) bool { return slices.Contains(left, d) }); len(gone) != 1 {
		t.Errorf("ready directories after a deploy %v, want one of %v renamed away", left, before)
	}
	testkit.Eventually(t, "record pool refilled", full)
	// Once refilled: before, the one being made could be listed before its pid.tmp was
	// (a -race run failed 1 in 5-10, on main too).
	for _, d := range readyDirs(t, procs) {
		if fi, err := os.Lstat(filepath.Join(procs, d, "pid.tmp")); err != nil || !fi.Mode().IsRegular() || fi.Size() != pidRecordSize {
			t.Errorf("ready directory %s pid.tmp: %v, %v: want a file of %d bytes", d, fi, err, pidRecordSize)
		}
	}
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
				p := newRecordPool(d, 1, false, nil, slog.New(slog.DiscardHandler))
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

// TestPoolsWaitForRegistration: with Config.PoolsAfter, nothing is made ahead (no
// ready record directory, no pooled uid) until it is closed, so that a start-up's
// CPU goes to the registration nexd waits for; a deploy before then makes its own.
func TestPoolsWaitForRegistration(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lease := filepath.Join(dir, "leases")
	if err := os.Mkdir(lease, 0o700); err != nil {
		t.Fatal(err)
	}
	registered := make(chan struct{})
	// A range of its own: its leases are in a directory of its own and it takes no
	// systemd lock, so no other nexlet of the host (e2e's nodes, in the same make test)
	// sees its uids as leased; in the shared 61184-65519 another could lease the uid of
	// its workload, which its stop's release (a kill by uid) would then SIGKILL.
	lo := testkit.UIDs(t, 4*DefaultUIDPool+1)
	hi := lo + 4*DefaultUIDPool
	n, err := New(Config{RuntimeDir: filepath.Join(dir, "run"), Users: UserPolicy{LeaseDir: lease, Pool: DefaultUIDPool, UIDMin: lo, UIDMax: hi},
		Logger: slog.New(slog.DiscardHandler), PoolsAfter: registered, workloadsBase: ownWorkloadsBase(t), asideRoots: ownAsideRoots(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	procs := filepath.Join(n.cfg.RuntimeDir, "procs")
	leases := func() int { // not the lock file
		ents, _ := os.ReadDir(lease)
		return len(slices.DeleteFunc(ents, func(e os.DirEntry) bool { return strings.HasPrefix(e.Name(), ".") }))
	}
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
	req := startReq(protocol.LifecycleService, "early", run, protocol.NatsConnectionData{})
	if _, err := n.StartWorkload("early", &req, false); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = n.StopWorkload("early", &protocol.StopWorkloadRequest{Namespace: testNS}) }()
	time.Sleep(100 * time.Millisecond) // what a pool would make comes within this
	if d, l := readyDirs(t, procs), leases(); len(d) != 0 || (n.users.root && l != 1) {
		t.Fatalf("before the registration: ready directories %v, %d uid leases (want none made ahead, the deploy's own lease)", d, l)
	}
	close(registered)
	testkit.Eventually(t, "record pool filled", func() bool { return len(readyDirs(t, procs)) == DefaultRecordPool })
	if n.users.root {
		testkit.Eventually(t, "uids leased ahead", func() bool { return leases() == 1+DefaultUIDPool })
	}
}

// TestReadyPIDRecord: a first launch's pid record is whole whatever its record
// directory holds: written into the pool's empty pid.tmp, and the old way when pid.tmp
// is missing or holds something; a directory there is an error, not a record.
func TestReadyPIDRecord(t *testing.T) {
	n := &Nexlet{cfg: Config{RuntimeDir: t.TempDir()}}
	p, err := procid.Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		make func(tmp string) error
	}{
		{"empty", func(tmp string) error { return os.WriteFile(tmp, nil, 0o600) }},
		{"missing", func(string) error { return nil }},
		{"partial", func(tmp string) error { return os.WriteFile(tmp, []byte("12345678901234567890 99"), 0o600) }},
		{"directory", func(tmp string) error { return os.Mkdir(tmp, 0o700) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := n.recordDir(c.name)
			if err := os.MkdirAll(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := c.make(filepath.Join(dir, "pid.tmp")); err != nil {
				t.Fatal(err)
			}
			err := n.writeReadyPID(c.name, p)
			if c.name == "directory" {
				if err == nil {
					t.Fatal("pid record written over a directory pid.tmp")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got, ok := n.readPID(c.name); !ok || got != p {
				t.Fatalf("pid record %v %v, want %v", got, ok, p)
			}
			if _, err := os.Lstat(filepath.Join(dir, "pid.tmp")); !os.IsNotExist(err) {
				t.Errorf("pid.tmp left: %v", err)
			}
		})
	}
}
