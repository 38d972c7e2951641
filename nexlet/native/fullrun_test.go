package native

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestDeployOnFullRuntimeDir: the nexlet's runtime directory and nexd's exits
// directory are on a small tmpfs, filled up once the record pool holds its ready
// directories. A deploy that takes a ready directory needs no new space: its pid
// record goes into the pool's pid.tmp in place (it was empty, and its write took a
// page) and its exit record's reserve, made with the directory, moves to the exits
// directory (nexd writes the exit of a run whose nexlet died into it). Once the pool is
// used up, a deploy that would need new space fails, naming the directory, with its
// process killed; what runs is untouched. Before, such a deploy ran without a pid
// record or any room for its exit record.
func TestDeployOnFullRuntimeDir(t *testing.T) {
	fs := testkit.SmallFS(t, "2m")
	exits := filepath.Join(fs, "exits")
	if err := os.Mkdir(exits, 0o700); err != nil {
		t.Fatal(err)
	}
	lease := filepath.Join(t.TempDir(), "leases")
	if err := os.Mkdir(lease, 0o700); err != nil {
		t.Fatal(err)
	}
	lo := testkit.UIDs(t, 1024)
	n, err := New(Config{RuntimeDir: filepath.Join(fs, "native"), ExitsDir: exits, workloadsBase: ownWorkloadsBase(t),
		Users: UserPolicy{LeaseDir: lease, UIDMin: lo, UIDMax: lo + 1023}, asideRoots: ownAsideRoots(t), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(n.Close)
	testkit.Eventually(t, "record pool filled", func() bool { return len(n.records.pool) == cap(n.records.pool) })
	testkit.FillFS(t, fs)

	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
	var started, refused []string
	var errs []string
	for i := range cap(n.records.pool) + 1 {
		id := "full" + string(rune('a'+i))
		req := startReq(protocol.LifecycleService, id, run, protocol.NatsConnectionData{NatsServers: []string{"nats://127.0.0.1:4222"}})
		if _, err := n.StartWorkload(id, &req, false); err != nil {
			refused = append(refused, id)
			errs = append(errs, err.Error())
			continue
		}
		started = append(started, id)
		t.Cleanup(func() { _ = n.StopWorkload(id, &protocol.StopWorkloadRequest{Namespace: testNS}) })
	}
	t.Logf("on a full runtime directory: %d started %v, %d refused %v: %v", len(started), started, len(refused), refused, errs)
	if len(started) != cap(n.records.pool) {
		t.Errorf("%d deploys started on the ready directories, want %d", len(started), cap(n.records.pool))
	}
	for _, id := range started {
		rec, ok := n.readPID(id)
		if !ok {
			t.Errorf("%s: no pid record", id)
			continue
		}
		if _, err := os.Stat(procid.ReservePath(exits, rec)); err != nil {
			t.Errorf("%s: no reserve of its exit record: %v", id, err)
		}
		if !rec.Alive() {
			t.Errorf("%s: its process %v does not run", id, rec)
		}
	}
	if len(refused) != 1 || !strings.Contains(errs[0], fs) || !strings.Contains(errs[0], "full") {
		t.Errorf("the deploy past the ready directories: refused %v %q, want refused naming the directory", refused, errs)
	}
	for _, id := range refused {
		if procs := n.HeldWorkloads(); strings.Contains(strings.Join(procs, " "), id) {
			t.Errorf("the refused deploy %s is held", id)
		}
		if _, err := os.Lstat(n.recordDir(id)); !os.IsNotExist(err) {
			t.Errorf("the refused deploy %s left its record directory: %v", id, err)
		}
	}
	if ents, _ := os.ReadDir(exits); len(ents) != len(started) {
		t.Errorf("nexd's exits directory holds %d entries, want the %d reserves of the started deploys", len(ents), len(started))
	}
}

// TestDeployOnFullLeaseDir: the dynamic uid leases' directory (/run/nex-dynamic-uid,
// on the same tmpfs as nexd's runtime directory on an installed node) is full. A
// deploy with no uid leased ahead needs a new lease file: it is refused before any
// fork, naming the lease file; one given a uid the pool leased ahead rewrites that
// lease in place and needs no new space. Before, the refused deploy left its new lease
// file empty: a lease naming nobody is never stale, so its uid was lost for good.
func TestDeployOnFullLeaseDir(t *testing.T) {
	fs := testkit.SmallFS(t, "1m")
	lease := filepath.Join(fs, "leases")
	if err := os.Mkdir(lease, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, pool := range []int{0, 2} {
		lo := testkit.UIDs(t, 1024)
		n, err := New(Config{RuntimeDir: filepath.Join(t.TempDir(), "native"), workloadsBase: ownWorkloadsBase(t),
			Users: UserPolicy{LeaseDir: lease, Pool: pool, UIDMin: lo, UIDMax: lo + 1023}, asideRoots: ownAsideRoots(t), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(n.Close)
		if pool > 0 {
			testkit.Eventually(t, "uid pool filled", func() bool { return n.users.pool != nil && len(n.users.pool.ch) >= pool })
		}
		fill := testkit.FillFS(t, fs)
		id := "lease" + string(rune('0'+pool))
		run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
		req := startReq(protocol.LifecycleService, id, run, protocol.NatsConnectionData{NatsServers: []string{"nats://127.0.0.1:4222"}})
		_, err = n.StartWorkload(id, &req, false)
		t.Logf("uid pool %d, lease directory full: %v", pool, err)
		if pool == 0 && (err == nil || !strings.Contains(err.Error(), lease)) {
			t.Errorf("a deploy needing a new lease in a full lease directory: %v, want refused naming %s", err, lease)
		}
		if pool > 0 && err != nil {
			t.Errorf("a deploy given a uid leased ahead, the lease directory full: %v, want it started", err)
		}
		if err == nil {
			_ = n.StopWorkload(id, &protocol.StopWorkloadRequest{Namespace: testNS})
		}
		// The pool's refill after the claim meets the full directory too: its new
		// lease files, once refused, must not stay either.
		var empty int
		if !testkit.WaitFor(2*time.Second, func() bool { empty = emptyLeases(lease); return empty == 0 }) {
			ents, _ := os.ReadDir(lease)
			for _, e := range ents {
				fi, _ := e.Info()
				t.Logf("%s %d", e.Name(), fi.Size())
			}
			t.Errorf("uid pool %d: %d empty lease files left after the refused deploy (a lease naming nobody keeps its uid for good), want 0", pool, empty)
		}
		os.Remove(fill)
	}
}

// emptyLeases counts the lease files in dir that name nobody (empty).
func emptyLeases(dir string) int {
	ents, _ := os.ReadDir(dir)
	k := 0
	for _, e := range ents {
		if fi, err := e.Info(); err == nil && fi.Mode().IsRegular() && fi.Size() == 0 && !strings.HasPrefix(e.Name(), ".") {
			k++
		}
	}
	return k
}
