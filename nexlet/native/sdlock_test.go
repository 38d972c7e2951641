package native

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
	"golang.org/x/sys/unix"
)

// envSDProbe makes the test binary a probe that tries systemd's lock on a uid (the
// file it names) exactly as systemd's allocator does (src/core/dynamic-user.c,
// pick_uid) and says "locked" or "busy".
const envSDProbe = "NEXD_TEST_SYSTEMD_UID_PROBE"

// TestSystemdUIDProbe is the probe's body, run in a process of its own: flock belongs
// to the open file, so the nexlet's own process would not show what another sees.
func TestSystemdUIDProbe(t *testing.T) {
	path := os.Getenv(envSDProbe)
	if path == "" {
		t.Skip("the probe process of TestAttackSystemdDynamicUserGetsAWorkloadsUID")
	}
	_ = os.Mkdir(filepath.Dir(path), 0o755) // as pick_uid does
	for {
		fd, err := unix.Open(path, unix.O_CREAT|unix.O_RDWR|unix.O_NOFOLLOW|unix.O_CLOEXEC|unix.O_NOCTTY, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
			if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EBUSY) {
				fmt.Println("PROBE busy")
				return
			}
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			t.Fatal(err)
		}
		if st.Nlink > 0 {
			// systemd would now check the uid against NSS and keep the lock; the probe
			// lets it go (and the empty file it may have made stays, as systemd's
			// would after a crash: a lock nobody holds).
			fmt.Println("PROBE locked")
			return
		}
		unix.Close(fd)
	}
}

// probeSystemdLock runs the probe in a process of its own against path.
func probeSystemdLock(t *testing.T, path string) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestSystemdUIDProbe$", "-test.count=1")
	cmd.Env = append(os.Environ(), envSDProbe+"="+path)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe: %v: %s", err, out)
	}
	for _, l := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(l, "PROBE "); ok {
			return v
		}
	}
	t.Fatalf("probe said nothing: %s", out)
	return ""
}

// TestAttackSystemdDynamicUserGetsAWorkloadsUID: systemd gives a DynamicUser= service
// a uid of its range (61184-65519, nexd's default workload_uid_range too) whose lock
// file /run/systemd/dynamic-uid/<uid> it can flock, and looks at no process and at no
// lease of nexd's. Before, nothing held that lock for a running workload's uid: a
// process doing systemd's check (open O_CREAT, flock LOCK_EX|LOCK_NB, st_nlink) got it,
// so a service started later could run as the workload's uid (signal, ptrace, read its
// files and credentials). Now the nexlet holds the lock while it leases the uid (the
// probe gets EAGAIN), unlinks and drops it on release (the probe gets it again), and
// a uid whose lock another process holds is not leased.
func TestAttackSystemdDynamicUserGetsAWorkloadsUID(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	sd := sdTestDir(t, uid)
	leases := t.TempDir()
	lockPath := filepath.Join(sd, strconv.Itoa(int(uid)))
	fn := newFakeNode(t)
	first := fn.startNexlet(Config{Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: leases, SystemdUIDDir: sd}})
	run := startReq(protocol.LifecycleService, "w", map[string]any{"uri": script(t, "echo up; exec sleep 1000")}, fn.creds())
	fn.mustStart("w", run)
	fn.waitLog("w", "stdout", "up")
	if got := probeSystemdLock(t, lockPath); got != "busy" {
		t.Fatalf("systemd's check on a running workload's uid %d: %s, want busy (EAGAIN)", uid, got)
	}

	// A nexlet that dies drops the locks with its descriptors (here: closed as its
	// exit would); until the next one adopts the workload, systemd could take the uid.
	first.crash()
	first.users.sd.closeAll()
	if got := probeSystemdLock(t, lockPath); got != "locked" {
		t.Fatalf("systemd's check with no nexlet running: %s, want locked", got)
	}
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"w": run}
	fn.mu.Unlock()
	second := fn.startNexlet(Config{RuntimeDir: first.cfg.RuntimeDir, Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: leases, SystemdUIDDir: sd}})
	testkit.Eventually(t, "the adopting nexlet holds systemd's lock again", func() bool {
		return probeSystemdLock(t, lockPath) == "busy"
	})

	// With the lock another process's, the uid is not leased (the only one of the
	// range is taken by the running workload anyway: a second workload must not get it).
	fn.stop("w", testNS)
	testkit.Eventually(t, "the uid released", func() bool {
		_, err := os.Stat(filepath.Join(leases, strconv.Itoa(int(uid))))
		return os.IsNotExist(err)
	})
	if err := lstatReleased(t, leases, lockPath); !os.IsNotExist(err) {
		t.Errorf("systemd's lock file outlived the release: %v", err)
	}
	if got := probeSystemdLock(t, lockPath); got != "locked" {
		t.Fatalf("systemd's check after the release: %s, want locked", got)
	}

	// A uid whose systemd lock another process holds (a DynamicUser= service's) is
	// skipped: with it the only uid of the range, no workload starts.
	holdSystemdLock(t, lockPath)
	if ids, err := second.users.leaseFreshN("/proc/"+strconv.Itoa(os.Getpid()), 1); err == nil {
		t.Fatalf("leased %v, whose systemd lock another process holds", ids)
	}
}

// TestSystemdUIDLockFileGoesWithAnUnwatchedEnd: a workload whose nexlet died ends
// before the next nexlet starts; that one finds it ended and releases its uid. Before,
// the release dropped only a lock it held, and it held none (it takes a lock again only
// for a workload still running), so /run/systemd/dynamic-uid/<uid> stayed for every
// such end, an empty lock file in systemd's directory until reboot. Now a release also
// removes a lock file nobody holds, and leaves one another process holds (systemd's).
func TestSystemdUIDLockFileGoesWithAnUnwatchedEnd(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	sd := sdTestDir(t, uid)
	leases := t.TempDir()
	lockPath := filepath.Join(sd, strconv.Itoa(int(uid)))
	pol := UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: leases, SystemdUIDDir: sd}
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime, Users: pol})
	marker := filepath.Join(sharedDir(t), "go")
	req := startReq(protocol.LifecycleJob, "w", map[string]any{
		"uri": script(t, `echo up; while [ ! -e `+marker+` ]; do sleep 0.01; done; exit 0`)}, fn.creds())
	fn.mustStart("w", req)
	fn.waitLog("w", "stdout", "up")
	pids := fn.procsOf("w")
	if len(pids) == 0 {
		t.Fatal("the job's process is not found")
	}
	// The nexlet dies (its descriptors, the lock among them, go with it); the job ends
	// while no nexlet runs.
	first.crash()
	first.users.sd.closeAll()
	if err := os.WriteFile(marker, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "the job ended", func() bool {
		for _, p := range pids {
			if alive(p) {
				return false
			}
		}
		return true
	})
	first.watch.stop()
	fn.replayWith(Config{RuntimeDir: runtime, Users: pol}, "w", req)
	fn.endedOnce("w")
	testkit.Eventually(t, "the uid released", func() bool {
		_, err := os.Stat(filepath.Join(leases, strconv.Itoa(int(uid))))
		return os.IsNotExist(err)
	})
	if err := lstatReleased(t, leases, lockPath); !os.IsNotExist(err) {
		t.Errorf("systemd's lock file of released uid %d stayed: %v", uid, err)
	}

	// One another process holds is not touched.
	holdSystemdLock(t, lockPath)
	s, _ := openSDLocks(sd)
	s.drop(uid)
	if _, err := os.Lstat(lockPath); err != nil {
		t.Errorf("a lock file another process holds went: %v", err)
	}
}

// lstatReleased is os.Lstat of a released uid's lock file, looked at under the lease
// lock of leaseDir: a release removes the lease and then the lock file, both under that
// lock, so once the test has it the release whose lease went is done (before, a release
// preempted between the two was seen as a lock file that stayed: CI of d2827e5, load 15).
func lstatReleased(t *testing.T, leaseDir, path string) error {
	t.Helper()
	unlock, err := (&users{pol: UserPolicy{LeaseDir: leaseDir}}).lock()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	_, err = os.Lstat(path)
	return err
}

// holdSystemdLock holds path's flock on an open file of its own until the test ends,
// as another process (systemd) would: flock conflicts between open files.
func holdSystemdLock(t *testing.T, path string) {
	t.Helper()
	holder, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Close() })
	if err := unix.Flock(int(holder.Fd()), unix.LOCK_EX); err != nil {
		t.Fatal(err)
	}
}

// TestSystemdUIDLockDirMadeAgain: a lock directory removed after the nexlet started
// (systemd never removes it; a host's clean-up or a test may) is made again at the next
// lease, as systemd's pick_uid makes it; before, every lease failed with ENOENT.
func TestSystemdUIDLockDirMadeAgain(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	sd := sdTestDir(t, uid)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid, SystemdUIDDir: sd})
	if us.sd == nil {
		t.Fatalf("no systemd locks: %s", us.sdWarn)
	}
	if err := os.Remove(sd); err != nil {
		t.Fatal(err)
	}
	owner := t.TempDir()
	ids, err := us.leaseFreshN(owner, 1)
	if err != nil || len(ids) != 1 {
		t.Fatalf("lease with the lock directory gone: %v %v", ids, err)
	}
	if !us.retire(ids[0].uid, owner) {
		t.Fatalf("uid %d not retired", ids[0].uid)
	}
	if _, err := os.Stat(filepath.Join(sd, strconv.Itoa(int(uid)))); err != nil {
		t.Errorf("lock file: %v", err)
	}
	if err := us.release(ids[0]); err != nil {
		t.Fatal(err)
	}
}

// sdTestDir skips the test unless it runs as root and uid is free on this host, and
// names a systemd lock directory of its own, not yet made (as under /run/systemd).
func sdTestDir(t *testing.T, uid uint32) string {
	t.Helper()
	needRoot(t)
	if newHostIDs().uses(uid) {
		t.Skipf("uid %d is in use on this host", uid)
	}
	return filepath.Join(t.TempDir(), "dynamic-uid")
}
