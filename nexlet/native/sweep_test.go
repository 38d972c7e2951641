package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// TestSweepStaleKeepsWhatIsHeld: the sweep of a nexlet's start (sweepStale) removes
// the leases whose owner is gone and nothing runs as their uid, with their lock files,
// and the empty lock files of its range nobody holds or leases; it keeps a live nexlet's
// lease, a workload directory's, a stale lease whose uid still runs a process, a lock
// another process holds, a lock file with systemd's user name in it and one outside
// its range.
func TestSweepStaleKeepsWhatIsHeld(t *testing.T) {
	const lo = 2000500
	sd := sdTestDir(t, lo)
	leases := t.TempDir()
	us, err := newUsers(UserPolicy{LeaseDir: leases, UIDMin: lo, UIDMax: lo + 9, SystemdUIDDir: sd}, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
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
