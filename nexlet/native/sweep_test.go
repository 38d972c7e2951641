package native

import (
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestSweepStaleKeepsWhatIsHeld: the sweep of a nexlet's start (sweepStale) removes
// the leases whose owner is gone and nothing runs as their uid, with their lock files,
// and the empty lock files of its range nobody holds or leases; it keeps a live nexlet's
// lease, a workload directory's, a stale lease whose uid still runs a process, a lock
// another process holds, a lock file with systemd's user name in it and one outside
// its range.
func TestSweepStaleKeepsWhatIsHeld(t *testing.T) {
	lo := testkit.UIDs(t, 10)
	sd := sdTestDir(t, lo)
	leases := t.TempDir()
	us := testUsers(t, UserPolicy{LeaseDir: leases, UIDMin: lo, UIDMax: lo + 9, SystemdUIDDir: sd})
	if us.sd == nil {
		t.Fatalf("no systemd locks: %s", us.sdWarn)
	}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	runs := exec.Command("sleep", "60")
	runs.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: lo + 4, Gid: lo + 4}}
	if err := runs.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = runs.Process.Kill(); _ = runs.Wait() })
	wdir := t.TempDir()
	lease := func(uid uint32, owner string) {
		t.Helper()
		if err := writeLease(us.leasePath(uid), owner); err != nil {
			t.Fatal(err)
		}
	}
	lock := func(uid uint32, content string) string {
		t.Helper()
		p := filepath.Join(sd, strconv.Itoa(int(uid)))
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	deadNexlet := "/proc/" + strconv.Itoa(gone.Process.Pid)
	lease(lo, deadNexlet) // a killed nexlet's pooled uid
	lock(lo, "")
	lease(lo+1, filepath.Join(wdir, "gone")) // a workload directory removed
	lease(lo+2, "/proc/"+strconv.Itoa(os.Getpid()))
	lock(lo+2, "")
	lease(lo+3, wdir)
	lock(lo+3, "")
	lease(lo+4, deadNexlet) // stale, but its uid runs a process
	lock(lo+5, "")          // no lease, nobody holds it
	holdSystemdLock(t, lock(lo+6, ""))
	lock(lo+7, "systemd-dynamic-user\n")
	lock(lo+20, "") // outside the range

	nl, nk, err := us.sweepStale()
	if err != nil {
		t.Fatal(err)
	}
	exists := func(p string) bool { _, err := os.Lstat(p); return err == nil }
	for uid, want := range map[uint32]bool{lo: false, lo + 1: false, lo + 2: true, lo + 3: true, lo + 4: true} {
		if got := exists(us.leasePath(uid)); got != want {
			t.Errorf("lease of uid %d there: %v, want %v", uid, got, want)
		}
	}
	for uid, want := range map[uint32]bool{lo: false, lo + 2: true, lo + 3: true, lo + 5: false, lo + 6: true, lo + 7: true, lo + 20: true} {
		if got := exists(filepath.Join(sd, strconv.Itoa(int(uid)))); got != want {
			t.Errorf("lock file of uid %d there: %v, want %v", uid, got, want)
		}
	}
	if nl != 2 || nk != 1 {
		t.Errorf("sweep counted %d leases and %d lock files, want 2 and 1 (the lease's own lock file goes with it)", nl, nk)
	}
}

// TestWorkloadsDirsOfGoneNexletsSwept: a nexlet's sweep of /run/nex-workloads removes
// the directories no nexlet holds that are empty once what dead nexlets made ahead is
// gone, and keeps the one a live nexlet holds (even empty), one with a workload's
// directory and one with a live nexlet's directory made ahead. Where the runtime
// directory a directory names is gone, the directories of workloads whose dynamic uid
// no process runs as go too, with their lease; one whose uid still runs stays. A nexlet
// that waited for its lock while a sweep removed its directory makes it again; a clean
// stop removes its own directory when it is empty and nobody else holds it. Before,
// every runtime directory no nexlet came back to left its directory there: 38,678 after
// a day of test runs here.
func TestWorkloadsDirsOfGoneNexletsSwept(t *testing.T) {
	uid := testkit.UIDs(t, 2)
	needRoot(t)
	base := filepath.Join(t.TempDir(), "nex-workloads")
	dir := func(name string) string { return filepath.Join(base, name) }
	rt := t.TempDir()
	goneRT := filepath.Join(t.TempDir(), "gone")
	held, err := holdWorkloadsDir(base, dir("held"), rt)
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	live := exec.Command("sleep", "60")
	live.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid + 1, Gid: uid + 1}}
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = live.Process.Kill(); _ = live.Wait() })
	liveID, err := procid.Of(live.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	mk := func(p string) {
		t.Helper()
		if err := os.MkdirAll(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	record := func(d, rt string) {
		t.Helper()
		if err := os.WriteFile(d+runtimeDirRecord, []byte(rt+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	deadReady := fmt.Sprintf(".ready-%d-1-61200", gone.Process.Pid)
	mk(filepath.Join(dir("dead"), deadReady, "home"))
	record(dir("dead"), rt)
	mk(filepath.Join(dir("workload"), "w1", "home"))
	mk(filepath.Join(dir("workload"), deadReady))
	record(dir("workload"), rt)
	mk(filepath.Join(dir("live"), ".ready-"+liveID.String()+"-61201"))
	mk(dir("empty"))
	mk(dir("own"))
	record(dir("orphan"), rt) // a record beside no directory
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid + 1})
	// Two directories of a runtime directory that is gone: one workload ended, one runs.
	for i, name := range []string{"gone1", "gone2"} {
		wd := filepath.Join(dir(name), "w"+strconv.Itoa(i))
		mk(dir(name))
		record(dir(name), goneRT)
		id := ident{uid: uid + uint32(i), gid: uid + uint32(i), name: "dynamic", dynamic: true}
		if err := makeWorkloadDirs(wd, id); err != nil {
			t.Fatal(err)
		}
		if err := writeLease(us.leasePath(id.uid), wd); err != nil {
			t.Fatal(err)
		}
	}

	if n := sweepWorkloadDirs(base, dir("own"), us); n != 3 {
		t.Errorf("swept %d directories, want 3 (dead, empty, gone1)", n)
	}
	exists := func(p string) bool { _, err := os.Lstat(p); return err == nil }
	for name, want := range map[string]bool{"held": true, "dead": false, "workload": true, "live": true, "empty": false, "own": true, "gone1": false, "gone2": true} {
		if got := exists(dir(name)); got != want {
			t.Errorf("%s there after the sweep: %v, want %v", name, got, want)
		}
	}
	for _, name := range []string{"dead", "empty", "gone1", "orphan"} {
		if exists(dir(name) + runtimeDirRecord) {
			t.Errorf("the record of %s stays", name)
		}
	}
	if !exists(dir("gone2") + runtimeDirRecord) {
		t.Error("the record of a directory kept went")
	}
	if exists(filepath.Join(dir("workload"), deadReady)) || !exists(filepath.Join(dir("workload"), "w1")) {
		t.Error("in a directory with a workload's: the dead nexlet's ready directory stays or the workload's went")
	}
	if exists(us.leasePath(uid)) || !exists(us.leasePath(uid+1)) || !exists(filepath.Join(dir("gone2"), "w1")) {
		t.Error("of a gone runtime directory: the ended workload's lease stays, or the running one's lease or directory went")
	}

	// A nexlet waiting for its lock while a sweep removes its directory.
	sweeper, err := os.Open(dir("own"))
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Flock(int(sweeper.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	got := make(chan *os.File, 1)
	go func() {
		f, err := holdWorkloadsDir(base, dir("own"), rt)
		if err != nil {
			t.Error(err)
		}
		got <- f
	}()
	time.Sleep(50 * time.Millisecond) // the nexlet waits for the lock (or has not begun: the same)
	if err := unix.Rmdir(dir("own")); err != nil {
		t.Fatal(err)
	}
	sweeper.Close()
	f := <-got
	if f == nil {
		return
	}
	if !sameDir(f, dir("own")) {
		t.Fatal("the nexlet holds a directory that is no longer its path's")
	}

	// A clean stop: kept while another holds it or something is in it, removed else.
	other, err := holdWorkloadsDir(base, dir("own"), rt)
	if err != nil {
		t.Fatal(err)
	}
	if removeWorkloadsDir(f, dir("own")) || !exists(dir("own")) {
		t.Error("removed while another nexlet held it")
	}
	mk(filepath.Join(dir("own"), "w2"))
	if removeWorkloadsDir(other, dir("own")) || !exists(dir("own")) {
		t.Error("removed with a workload's directory in it")
	}
	if err := os.Remove(filepath.Join(dir("own"), "w2")); err != nil {
		t.Fatal(err)
	}
	last, err := holdWorkloadsDir(base, dir("own"), rt)
	if err != nil {
		t.Fatal(err)
	}
	if !removeWorkloadsDir(last, dir("own")) || exists(dir("own")) {
		t.Error("an empty directory nobody else holds stays at a clean stop")
	}
}

// TestSweepStaleGivesBackHandedOverLockWithoutLease: a nexlet killed in a release, after
// its lease went and before its lock file did, leaves nexd a copy of a lock no lease
// names; nexd hands it to every next nexlet (adoptCopies), which kept it for good: no
// lease to release, and the sweep skipped locks the nexlet holds, so systemd could never
// give that uid out again. The sweep now gives it back, unless a process runs as it.
func TestSweepStaleGivesBackHandedOverLockWithoutLease(t *testing.T) {
	lo := testkit.UIDs(t, 2)
	sd := sdTestDir(t, lo)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: lo, UIDMax: lo + 1, SystemdUIDDir: sd})
	if us.sd == nil {
		t.Fatalf("no systemd locks: %s", us.sdWarn)
	}
	runs := exec.Command("sleep", "60")
	runs.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: lo + 1, Gid: lo + 1}}
	if err := runs.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = runs.Process.Kill(); _ = runs.Wait() })
	// The dead nexlet's locks, as nexd keeps them: the files linked, locked, empty.
	var copies []*os.File
	for _, uid := range []uint32{lo, lo + 1} {
		f, err := os.OpenFile(us.sd.path(uid), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
			t.Fatal(err)
		}
		copies = append(copies, f)
	}
	us.sd.adoptCopies([]uint32{lo, lo + 1}, copies, slog.New(slog.DiscardHandler))
	t.Cleanup(us.sd.closeAll)

	if _, _, err := us.sweepStale(); err != nil {
		t.Fatal(err)
	}
	// What systemd's allocator would do: open (creating) and lock without waiting.
	takes := func(uid uint32) bool {
		f, err := os.OpenFile(us.sd.path(uid), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
	}
	if !takes(lo) {
		t.Errorf("uid %d: a lock handed over for no lease, nothing running as it, still held after the sweep", lo)
	}
	if takes(lo + 1) {
		t.Errorf("uid %d: a process runs as it, and its lock was given back", lo+1)
	}
}

// TestEndedWorkloadSweepSparesNewHolder: the sweep of a gone nexlet's workload
// directories removes an ended workload's uid leftovers only while the uid's lease
// still names that directory (or there is none). Here the uid was freed (a release
// whose nexlet died before it removed the directory) and leased again to another
// holder, which runs no process at the sweep's walk (a service in restart backoff, a
// pooled uid) and owns a file in /tmp: the file survives, the lease stays the
// holder's, and the ended workload's directory goes. Before, the removal ran before any
// look at the lease: the holder's file was removed. The same directory with its own
// lease: the file goes and the uid is freed.
func TestEndedWorkloadSweepSparesNewHolder(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid})
	id := ident{uid: uid, gid: uid, name: "dynamic", dynamic: true}
	for _, ownLease := range []bool{false, true} {
		dir := t.TempDir()
		wd := filepath.Join(dir, "w0")
		if err := makeWorkloadDirs(wd, id); err != nil {
			t.Fatal(err)
		}
		owner := t.TempDir() // the new holder's workload directory
		if ownLease {
			owner = wd
		}
		if err := writeLease(us.leasePath(uid), owner); err != nil {
			t.Fatal(err)
		}
		f, err := os.CreateTemp("/tmp", "nexd-test-holder-")
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
		defer os.Remove(f.Name())
		if err := os.Chown(f.Name(), int(uid), int(uid)); err != nil {
			t.Fatal(err)
		}

		us.removeEndedWorkloads(dir)
		_, ferr := os.Lstat(f.Name())
		b, _ := os.ReadFile(us.leasePath(uid))
		_, werr := os.Lstat(wd)
		t.Logf("lease of %s: file there %v, lease %q, directory there %v", map[bool]string{false: "another holder", true: "the directory"}[ownLease], ferr == nil, b, werr == nil)
		if werr == nil {
			t.Errorf("the ended workload's directory %s stays", wd)
		}
		if !ownLease {
			if ferr != nil {
				t.Errorf("the new holder's %s was removed: %v", f.Name(), ferr)
			}
			if leaseOwner(b) != owner {
				t.Errorf("lease names %q, want the new holder %s", leaseOwner(b), owner)
			}
			continue
		}
		if ferr == nil {
			t.Errorf("the ended workload's %s stays", f.Name())
		}
		if len(b) != 0 {
			t.Errorf("uid %d still leased (%q)", uid, b)
		}
	}
}
