package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestReplayKillsNoOtherWorkloadsUID: a start kills what still runs as its workload's
// previous uid only while that uid's lease is the workload's. A nexlet killed between
// its tidy's retirement of a uid and the removal of the workload's directory leaves the
// directory naming the uid and the lease stale (its owner, the nexlet, gone); the uid
// is then free and another workload is given it. When the first workload is replayed
// (its stop lost with the nexlet, or a restart due), its start read the old uid from the
// directory and SIGKILLed every process running as it: the other workload's. Before,
// the other workload's process was killed here (and its lease removed, so that a third
// workload could be given the uid too); now it runs on, the replayed workload gets
// another uid, and nothing is killed.
func TestReplayKillsNoOtherWorkloadsUID(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 2)
	hi := lo + 1
	leases := t.TempDir()
	pol := UserPolicy{UIDMin: lo, UIDMax: hi, LeaseDir: leases}
	fn := newFakeNode(t)
	first := fn.startNexlet(Config{Users: pol})
	other := startReq(protocol.LifecycleService, "other", map[string]any{"uri": script(t, "echo up; exec sleep 1000")}, fn.creds())
	fn.mustStart("other", other)
	fn.waitLog("other", "stdout", "up")
	s, _ := fn.summary("other")
	uid, err := strconv.ParseUint(s.Metadata["uid"], 10, 32)
	if err != nil {
		t.Fatalf("other's uid %q: %v", s.Metadata["uid"], err)
	}
	pids := fn.procsOf("other")
	if len(pids) == 0 {
		t.Fatal("other's process not found")
	}

	// The nexlet dies; what an earlier nexlet killed mid-tidy left: the directory of
	// workload "stale" naming other's uid, which no lease gives it.
	first.crash()
	stale := filepath.Join(first.WorkloadsDir(), "stale")
	if err := makeWorkloadDirs(stale, ident{uid: uint32(uid), gid: uint32(uid), groups: []uint32{}, name: "dynamic", dynamic: true}); err != nil {
		t.Fatal(err)
	}
	replayed := startReq(protocol.LifecycleService, "stale", map[string]any{"uri": script(t, "echo up; exec sleep 1000")}, fn.creds())
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"other": other, "stale": replayed}
	fn.mu.Unlock()
	fn.startNexlet(Config{RuntimeDir: first.cfg.RuntimeDir, Users: pol})
	fn.waitLog("stale", "stdout", "up")

	killed := 0
	for _, p := range pids {
		if !alive(p) {
			killed++
		}
	}
	r, _ := fn.summary("stale")
	lease, _ := os.ReadFile(filepath.Join(leases, strconv.FormatUint(uid, 10)))
	t.Logf("replayed start of a workload whose directory named another's uid %d: %d of %d of the other's processes killed; replayed one runs as uid %s; lease of %d: %q",
		uid, killed, len(pids), r.Metadata["uid"], uid, lease)
	if killed != 0 {
		t.Errorf("%d of %d processes of workload other (uid %d) killed by the replayed start of another workload", killed, len(pids), uid)
	}
	if r.Metadata["uid"] == s.Metadata["uid"] {
		t.Errorf("the replayed workload runs as uid %s, the other workload's", r.Metadata["uid"])
	}
	if got := leaseOwner(lease); got != filepath.Join(first.WorkloadsDir(), "other") {
		t.Errorf("lease of uid %d names %q, want other's directory", uid, got)
	}
	testkit.Eventually(t, "other still listed", func() bool {
		_, ok := fn.summary("other")
		return ok
	})
}

// TestPendingReleaseKillsNoNewHolder: a stopped workload's uid release (batched, after
// the stop's reply) kills and frees only a uid whose lease is still this nexlet's
// retirement of it. Here the lease went to another workload before the release ran (as
// a start's release of the same uid, then a lease by the pool, left it), and that
// workload's process runs as the uid: it runs on, its lease stays, and the release
// says why it did nothing. Before, the pending release SIGKILLed it and removed its
// lease.
func TestPendingReleaseKillsNoNewHolder(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	// The uid passes to another workload before the release runs.
	holder := t.TempDir()
	if err := writeLease(us.leasePath(uid), holder); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()

	releaseSparesHolder(t, us, ids, uid, holder, waited, "pending release of uid %d leased again meanwhile", "nothing killed")
}

// TestReleaseKillsNoLeaseChangedMidRelease: a release checks that its uid's lease is
// still this nexlet's retirement (keepRetired), then walks /proc and kills what runs as
// the uid. Here the lease changes hands in between (the nexlet adopts a workload of that
// uid, hold; a nexlet that cannot see this one's /proc entry takes the lease as stale
// does the same) and the new holder's process runs as the uid. The kill and the free
// check the lease again under the lease lock: the process runs on, its lease stays, and
// the release says why. Before, the release SIGKILLed it (1 killed) and removed its
// lease, so the uid could be handed out again while the holder ran as it.
func TestReleaseKillsNoLeaseChangedMidRelease(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	holder := t.TempDir()
	cmd := exec.Command("/bin/sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	waited := make(chan struct{})
	us.releaseChecked = func() {
		// The uid passes to another holder after the release checked its lease.
		if err := us.hold(uid, holder); err != nil {
			t.Error(err)
		}
		if err := cmd.Start(); err != nil {
			t.Error(err)
			close(waited)
			return
		}
		go func() { _ = cmd.Wait(); close(waited) }()
	}
	defer func() {
		if cmd.Process != nil {
			_ = cmd.Process.Kill()
		}
		<-waited
	}()

	releaseSparesHolder(t, us, ids, uid, holder, waited, "uid %d's lease changed hands mid-release", "stopped being this nexlet's retirement")
	// The uid is not left marked as being released: a later release of it is not skipped.
	us.relMu.Lock()
	marked := us.releasing[uid]
	us.relMu.Unlock()
	if marked {
		t.Error("uid left marked as being released")
	}
}

// releaseSparesHolder runs the release of ids and checks that it spared uid's new
// holder: nothing killed, its process (waited closes when it ends) still running, the
// lease still the holder's, and the release's error saying says. what names the case
// in the log (with the uid).
func releaseSparesHolder(t *testing.T, us *users, ids []ident, uid uint32, holder string, waited <-chan struct{}, what, says string) {
	t.Helper()
	killed, err := us.releaseCounted(ids)
	b, _ := os.ReadFile(us.leasePath(uid))
	t.Logf(what+": %d killed; err %v; lease %q", uid, killed, err, b)
	if killed != 0 {
		t.Errorf("the release killed %d processes of the uid's new holder", killed)
	}
	select {
	case <-waited:
		t.Error("the new holder's process was killed")
	case <-time.After(100 * time.Millisecond):
	}
	if leaseOwner(b) != holder {
		t.Errorf("lease names %q, want the new holder %s", leaseOwner(b), holder)
	}
	if err == nil || !strings.Contains(err.Error(), says) {
		t.Errorf("release error %v; want one saying %q", err, says)
	}
}

// retiredUID makes a users of uid alone (skipped without root or when the host uses
// uid), leases it to a stopped workload's directory and retires it there: what a stop's
// release then frees.
func retiredUID(t *testing.T, uid uint32) (*users, []ident) {
	t.Helper()
	needRoot(t)
	if newHostIDs().uses(uid) {
		t.Skipf("uid %d is in use on this host", uid)
	}
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid})
	stopped := t.TempDir()
	ids, err := us.leaseFreshN(stopped, 1)
	if err != nil {
		t.Fatal(err)
	}
	if !us.retire(uid, stopped) {
		t.Fatal("not retired")
	}
	return us, ids
}

// TestReleaseRemovesNoLeftoversOfNewHolder: a release removes what its uid left behind
// (files it owns in /tmp and /dev/shm, its System V IPC objects) before it frees the
// lease. Here the lease changes hands after the release checked it (keepRetired), as in
// TestReleaseKillsNoLeaseChangedMidRelease, and the new holder has a file in /tmp, one
// in /dev/shm and a System V shared memory segment, owned by the uid. The removal runs
// under the lease lock once the lease is seen to be still this nexlet's retirement, as
// the kills do (8da7225): all three survive, the lease stays the holder's, and the
// release says why. Before, the removal ran before the lock and the check: all three
// were removed.
func TestReleaseRemovesNoLeftoversOfNewHolder(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	holder := t.TempDir()
	var files []string
	shm := -1
	us.releaseChecked = func() {
		// The uid passes to another holder after the release checked its lease, and
		// the holder's workload makes files and a segment as the uid.
		if err := us.hold(uid, holder); err != nil {
			t.Error(err)
		}
		for _, dir := range []string{"/tmp", "/dev/shm"} {
			f, err := os.CreateTemp(dir, "nexd-test-holder-")
			if err != nil {
				t.Error(err)
				continue
			}
			f.Close()
			files = append(files, f.Name())
			if err := os.Chown(f.Name(), int(uid), int(uid)); err != nil {
				t.Error(err)
			}
		}
		id, err := unix.SysvShmGet(unix.IPC_PRIVATE, 4096, unix.IPC_CREAT|0o600)
		if err != nil {
			t.Errorf("shmget: %v", err)
			return
		}
		shm = id
		var desc unix.SysvShmDesc
		if _, err := unix.SysvShmCtl(id, unix.IPC_STAT, &desc); err != nil {
			t.Errorf("shmctl IPC_STAT: %v", err)
			return
		}
		desc.Perm.Uid, desc.Perm.Gid = uid, uid
		if _, err := unix.SysvShmCtl(id, unix.IPC_SET, &desc); err != nil {
			t.Errorf("shmctl IPC_SET: %v", err)
		}
	}
	defer func() {
		for _, f := range files {
			_ = os.Remove(f)
		}
		if shm >= 0 {
			_, _ = unix.SysvShmCtl(shm, unix.IPC_RMID, nil)
		}
	}()

	_, err := us.releaseCounted(ids)
	b, _ := os.ReadFile(us.leasePath(uid))
	removed := 0
	for _, f := range files {
		if _, serr := os.Lstat(f); serr != nil {
			removed++
			t.Errorf("the new holder's %s was removed: %v", f, serr)
		}
	}
	var desc unix.SysvShmDesc
	if _, serr := unix.SysvShmCtl(shm, unix.IPC_STAT, &desc); shm < 0 || serr != nil {
		removed++
		t.Errorf("the new holder's System V segment %d was removed: %v", shm, serr)
	}
	t.Logf("uid %d's lease changed hands mid-release: %d of %d of the new holder's leftovers removed; err %v; lease %q", uid, removed, len(files)+1, err, b)
	if leaseOwner(b) != holder {
		t.Errorf("lease names %q, want the new holder %s", leaseOwner(b), holder)
	}
	if err == nil || !strings.Contains(err.Error(), "stopped being this nexlet's retirement") {
		t.Errorf("release error %v; want one saying the lease changed hands", err)
	}
}

// TestReleaseKillsNoRecycledPid: a release walks /proc for its uid's processes, then
// kills what the walk listed. Here the listed process ends between the walk and the
// kill and a stranger, running as another uid, is given its number (a forced reuse:
// the test runs in a pid namespace of its own and sets ns_last_pid). The kill opens a
// pidfd for each listed pid and only then reads the process's uids again: the stranger
// runs on, and the release frees the uid (nothing of it is left). Before, the release
// SIGKILLed the listed number: the stranger was killed.
func TestReleaseKillsNoRecycledPid(t *testing.T) {
	if !testkit.InPidNamespace(t) {
		return
	}
	lo := testkit.UIDs(t, 2)
	uid, other := lo, lo+1
	us, ids := retiredUID(t, uid)
	listed := exec.Command("/bin/sleep", "600")
	listed.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	if err := listed.Start(); err != nil {
		t.Fatal(err)
	}
	n := listed.Process.Pid
	var stranger *exec.Cmd
	us.releaseWalked = func() {
		if stranger != nil {
			return
		}
		// Between the walk and the kill: the listed process ends, and the number goes
		// to a process of another uid.
		_ = listed.Process.Kill()
		_ = listed.Wait()
		stranger = exec.Command("/bin/sleep", "600")
		stranger.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: other, Gid: other}}
		testkit.StartAtPid(t, n, stranger)
	}
	killed, err := us.releaseCounted(ids)
	if stranger == nil {
		t.Fatal("the release's walk did not list the process of its uid")
	}
	// A SIGKILL takes a moment to land: wait (bounded) for it.
	hit := testkit.WaitFor(time.Second, func() bool { return !alive(n) })
	b, _ := os.ReadFile(us.leasePath(uid))
	t.Logf("release of uid %d whose listed pid %d went to a process of uid %d before the kill: killed %d, stranger killed %v, err %v, lease %q",
		uid, n, other, killed, hit, err, b)
	if hit {
		t.Fatalf("the release killed pid %d, a stranger (uid %d) given the listed process's number", n, other)
	}
	if err != nil {
		t.Errorf("release: %v", err)
	}
	if len(b) != 0 {
		t.Errorf("uid %d still leased (%q): nothing of it runs", uid, b)
	}
}

// TestReleaseNotHeldByZombies: a zombie can run no code, so a release counts a process
// of its uid in state Z as gone. Here the uid has a running process and a zombie, and
// their parent (the test) reaps neither until the release returned: the release kills
// the running one (killed 1, each process counted once), does not wait for either to
// be reaped, and frees the uid. Before, it signalled both every 20 ms until its 10 s
// deadline and kept the uid leased ("processes ... survive SIGKILL"), and counted the
// zombie as killed too (killed 2). (It replaces TestReleaseCountsEachKillOnce of
// ae2b391, whose zombie, reaped 300 ms into the release, is now not killed at all.)
func TestReleaseNotHeldByZombies(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	var cmds []*exec.Cmd
	for _, path := range []string{"/bin/sleep", "/bin/true"} {
		cmd := exec.Command(path, "600")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds = append(cmds, cmd)
	}
	defer func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}()
	zombie := cmds[1].Process.Pid
	testkit.Eventually(t, "the process is a zombie of the uid", func() bool {
		return strings.Contains(statusField(t, zombie, "State"), "Z")
	})
	killed, err := us.releaseCounted(ids)
	b, _ := os.ReadFile(us.leasePath(uid))
	t.Logf("release of uid %d with a running process and a zombie, neither reaped until it returned: killed %d, err %v, lease %q", uid, killed, err, b)
	if err != nil {
		t.Fatalf("release: %v", err)
	}
	if killed != 1 {
		t.Errorf("killed %d, want 1: the running process", killed)
	}
	if len(b) != 0 {
		t.Errorf("uid %d still leased (%q)", uid, b)
	}
	for _, c := range cmds {
		if alive(c.Process.Pid) {
			t.Errorf("pid %d of the uid still runs after its release", c.Process.Pid)
		}
	}
}

// TestReleaseRemovesTreesAfterTheLock: a release removes the directories its uid left
// in /tmp after the lease lock, not under it. Every deploy's claim of a uid takes that
// lock (host-wide: every nexlet on the shared lease directory), and a directory tree
// takes as long to remove as it has entries (100,000 files: 1.9 s here), so a workload
// that left a big tree in /tmp held every tenant's deploys on the host that long at its
// stop (since 1a38eab, which moved the removal under the lock). Under the lock the tree
// is now moved out of the uid's reach (into a directory of root's, 0700) and removed
// after it: at its removal the lock is free, the tree is no longer at its path, and
// afterwards it is gone and the uid freed.
func TestReleaseRemovesTreesAfterTheLock(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	tree, err := os.MkdirTemp("/tmp", "nexd-test-leftover-tree-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tree)
	for i := range 3 {
		p := filepath.Join(tree, strconv.Itoa(i))
		if err := os.WriteFile(p, []byte("left"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, int(uid), int(uid)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(tree, int(uid), int(uid)); err != nil {
		t.Fatal(err)
	}
	lockFile, err := os.OpenFile(filepath.Join(us.pol.LeaseDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer lockFile.Close()
	removals, held, aside := 0, 0, ""
	us.removingTree = func(path string) {
		removals++
		aside = filepath.Dir(path)
		if err := unix.Flock(int(lockFile.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			held++
			t.Errorf("the lease lock is held while %s is removed: %v", path, err)
		} else {
			_ = unix.Flock(int(lockFile.Fd()), unix.LOCK_UN)
		}
		if _, err := os.Lstat(tree); err == nil {
			t.Errorf("%s is still at its path while it is removed: the uid's next holder may reach it", tree)
		}
		if st, err := os.Stat(filepath.Dir(path)); err != nil || st.Mode().Perm() != 0o700 || st.Sys().(*syscall.Stat_t).Uid != 0 {
			t.Errorf("moved into %s, not a directory of root's with mode 0700: %v %v", filepath.Dir(path), st.Mode(), err)
		}
	}
	if err := us.releaseAll(ids); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d tree(s) removed, %d with the lease lock held", removals, held)
	if removals != 1 {
		t.Errorf("%d trees removed, want 1 (the uid's directory in /tmp)", removals)
	}
	if _, err := os.Lstat(tree); err == nil {
		t.Errorf("%s survived the release", tree)
	}
	if _, err := os.Stat(us.leasePath(uid)); !os.IsNotExist(err) {
		t.Errorf("uid %d still leased after the release: %v", uid, err)
	}
	if _, err := os.Lstat(aside); aside == "" || err == nil {
		t.Errorf("the directory the tree was moved into (%q) is left behind", aside)
	}
}

// TestReleaseKillsThreadsOfExitedMainThread: a release counts a zombie of its uid as
// gone (e05af83), but a process whose main thread ended alone (exit(2), not
// exit_group(2)) shows State Z in /proc/<pid>/status while its other threads run on
// as the uid. Such a process is killed (a signal to its pid ends every thread) and
// waited for like any other. Before, the release took it for a zombie: it freed the
// uid with the process's thread still running as it, for the uid's next holder,
// another tenant's workload maybe, to meet.
func TestReleaseKillsThreadsOfExitedMainThread(t *testing.T) {
	bin := bins.Path(t, "./testdata/leaderexit")
	uid := testkit.UIDs(t, 1)
	us, ids := retiredUID(t, uid)
	cmd := exec.Command(bin)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	waited := make(chan struct{})
	defer func() {
		_ = cmd.Process.Kill()
		<-waited
	}()
	buf := make([]byte, 16)
	if n, err := out.Read(buf); err != nil || !strings.HasPrefix(string(buf[:n]), "ready") {
		close(waited)
		t.Fatalf("helper: %q %v", buf[:n], err)
	}
	pid := cmd.Process.Pid
	testkit.Eventually(t, "the main thread ended, another runs", func() bool {
		return strings.HasPrefix(statusField(t, pid, "State"), "Z") && statusField(t, pid, "Threads") != "1"
	})
	// Its parent (this test) reaps it only after the release: a zombie's reap is its
	// parent's, as for a workload's.
	killed, err := us.releaseCounted(ids)
	b, _ := os.ReadFile(us.leasePath(uid))
	threads := statusField(t, pid, "Threads")
	t.Logf("release of uid %d with a process whose main thread exited alone: killed %d, err %v, lease %q, its threads now %q", uid, killed, err, b, threads)
	go func() { _ = cmd.Wait(); close(waited) }()
	if threads != "1" && threads != "" {
		t.Errorf("the process's other threads (Threads: %s) still run as uid %d after its release", threads, uid)
	}
	if killed != 1 {
		t.Errorf("killed %d, want 1", killed)
	}
	if err == nil && len(b) != 0 {
		t.Errorf("uid %d still leased (%q) after a release without error", uid, b)
	}
}

// TestStopKillsThreadsOfExitedMainThread: a workload's main process whose main thread
// ended alone (exit(2), not exit_group(2)) says State Z while its other threads run on
// as the workload, in its cgroup. Its stop took it for a process that had ended: no
// SIGTERM (procid.Signal refused a zombie), and the kill after the grace listed no
// process in its v1 group and sent nothing, so the stop waited 30 s for an exit that
// did not come and answered with the workload still running (one that ignores SIGTERM,
// as here); only the release of its dynamic uid killed it later, and under a named
// user nothing would have. Now the stop kills it after its grace, and its threads are
// gone by the answer.
func TestStopKillsThreadsOfExitedMainThread(t *testing.T) {
	needRoot(t)
	spec := cgroupSpec(t)
	bin := bins.Path(t, "./testdata/leaderexit")
	uid := testkit.UIDs(t, 1)
	fn := newFakeNode(t)
	fn.startNexlet(Config{Cgroup: spec, Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: t.TempDir()}})
	run := map[string]any{"uri": script(t, "exec "+bin+" deaf"), "stop_grace": "300ms"}
	fn.mustStart("leaderexit", startReq(protocol.LifecycleService, "leaderexit", run, fn.creds()))
	fn.waitLog("leaderexit", "stdout", "ready")
	var pid int
	testkit.Eventually(t, "the workload's main thread ended alone", func() bool {
		pid = 0
		for p := range oomScores(uid) { // its processes, by command line (pid)
			if i := strings.LastIndexByte(p, '('); i >= 0 {
				pid, _ = strconv.Atoi(strings.TrimSuffix(p[i+1:], ")"))
			}
		}
		n, _ := strconv.Atoi(testkit.StatusField(pid, "Threads"))
		return pid > 0 && strings.HasPrefix(testkit.StatusField(pid, "State"), "Z") && n > 1
	})
	began := time.Now()
	r, err := fn.request(protocol.StopWorkloadSubject(testNode, "leaderexit"), protocol.StopWorkloadRequest{Namespace: testNS}, 45*time.Second)
	took := time.Since(began)
	threads := testkit.StatusField(pid, "Threads")
	t.Logf("stop of a workload whose main thread exited alone (pid %d): %v %s in %v; its threads at the answer %q", pid, err, r.data, took.Round(time.Millisecond), threads)
	if err != nil {
		t.Fatal(err)
	}
	if threads != "" {
		t.Errorf("the workload's threads (Threads: %s) still run as uid %d at its stop's answer", threads, uid)
	}
	if took > 10*time.Second {
		t.Errorf("the stop took %v (grace 300ms)", took.Round(time.Millisecond))
	}
}
