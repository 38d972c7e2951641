package native

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"

	"github.com/nexd-project/nexd/protocol"
)

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to switch users")
	}
}

// statusField returns a field of /proc/<pid>/status.
func statusField(t *testing.T, pid int, key string) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	t.Fatalf("no %s in status of %d", key, pid)
	return ""
}

func TestWorkloadsRunUnderDynamicUIDsWithoutPrivileges(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	acc, _ := nkeys.CreateAccount()
	uri := script(t, `echo "me=$(id -u):$(id -g):$(id -G) pwd=$PWD"; exec sleep 1000`)
	creds := jwtCreds(t, acc, 0, fn.srv.ClientURL())
	fn.mustStart("dyn1", startReq(protocol.LifecycleService, "dyn1", map[string]any{"uri": uri}, creds))
	fn.mustStart("dyn2", startReq(protocol.LifecycleService, "dyn2", map[string]any{"uri": uri}, creds))
	s1, _ := fn.summary("dyn1")
	s2, _ := fn.summary("dyn2")
	uid1, _ := strconv.Atoi(s1.Metadata["uid"])
	uid2, _ := strconv.Atoi(s2.Metadata["uid"])
	// The test's own range (testkit.UIDs, ownDirs); a policy that names none gets the
	// default one.
	lo, hi := int(tn.users.pol.UIDMin), int(tn.users.pol.UIDMax)
	if uid1 < lo || uid1 > hi || uid2 < lo || uid2 > hi || uid1 == uid2 {
		t.Fatalf("uids %d and %d: want two distinct uids in %d-%d", uid1, uid2, lo, hi)
	}
	if us, err := newUsers(UserPolicy{LeaseDir: t.TempDir()}, ""); err != nil || us.pol.UIDMin != DefaultUIDMin || us.pol.UIDMax != DefaultUIDMax {
		t.Errorf("a policy with no range: %v, want %d-%d", err, DefaultUIDMin, DefaultUIDMax)
	}
	home := filepath.Join(tn.WorkloadsDir(), "dyn1", homeDirName)
	fn.waitLog("dyn1", "stdout", "me="+strconv.Itoa(uid1)+":"+strconv.Itoa(uid1)+":"+strconv.Itoa(uid1)+" pwd="+home)
	pid, _ := strconv.Atoi(s1.Metadata["pid"])
	if v := statusField(t, pid, "NoNewPrivs"); v != "1" {
		t.Errorf("NoNewPrivs = %s, want 1", v)
	}
	for _, k := range []string{"CapInh", "CapPrm", "CapEff", "CapAmb"} {
		if v := statusField(t, pid, k); strings.Trim(v, "0") != "" {
			t.Errorf("%s = %s, want none", k, v)
		}
	}
	// Its home is its own and private; its creds file is readable by it only.
	for path, want := range map[string]os.FileMode{home: 0o700, filepath.Join(tn.WorkloadsDir(), "dyn1", credsFileName): 0o400} {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if int(st.Uid) != uid1 || os.FileMode(st.Mode).Perm() != want {
			t.Errorf("%s: uid %d mode %o, want uid %d mode %o", path, st.Uid, st.Mode&0o777, uid1, want)
		}
	}
	// The uid is leased while the workload lives and released after.
	lease := filepath.Join(tn.users.pol.LeaseDir, strconv.Itoa(uid1))
	if _, err := os.Stat(lease); err != nil {
		t.Errorf("no lease for a live workload: %v", err)
	}
	fn.stop("dyn1", testNS)
	// Released just after the stop's reply (the walk of /proc is off its path).
	testkit.Eventually(t, "the lease of a stopped workload released", func() bool {
		_, err := os.Stat(lease)
		return os.IsNotExist(err)
	})
	if p, _ := uidProcs("/proc", uint32(uid1)); len(p) != 0 {
		t.Errorf("processes of uid %d left: %v", uid1, p)
	}
}

func TestNamedAndRootUsersOnlyWhenAllowed(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	fn.startNexlet(Config{Users: UserPolicy{Allowed: []string{"nobody"}}})
	uri := script(t, `echo "me=$(id -un)"; exec sleep 1000`)
	for user, want := range map[string]string{
		"root":   "allow_root_workloads",
		"daemon": "workload_users",
	} {
		r := fn.start("u-"+user, startReq(protocol.LifecycleService, "u", map[string]any{"uri": uri, "user": user}, fn.creds()))
		if r.code == "" || !strings.Contains(r.errText, want) {
			t.Errorf("user %s: %s %q, want an error naming %s", user, r.code, r.errText, want)
		}
		if p := fn.procsOf("u-" + user); len(p) != 0 {
			t.Errorf("user %s: started anyway: %v", user, p)
		}
	}
	fn.mustStart("u-nobody", startReq(protocol.LifecycleService, "u", map[string]any{"uri": uri, "user": "nobody"}, fn.creds()))
	fn.waitLog("u-nobody", "stdout", "me=nobody")
}

func TestRootWorkloadWhenAllowed(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	fn.startNexlet(Config{Users: UserPolicy{AllowRoot: true}})
	fn.mustStart("r1", startReq(protocol.LifecycleJob, "r1", map[string]any{"uri": script(t, `id -u`), "user": "root"}, fn.creds()))
	fn.waitLog("r1", "stdout", "0")
}

func TestArtifactTheUserCannotRunIsRefused(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	private := filepath.Join(t.TempDir(), "private.sh") // t.TempDir is root's alone
	if err := os.WriteFile(private, []byte("#!/bin/sh\necho ran\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	ownerOnly := filepath.Join(publicDir(t), "owner-only.sh")
	if err := os.WriteFile(ownerOnly, []byte("#!/bin/sh\necho ran\n"), 0o700); err != nil {
		t.Fatal(err)
	}
	for id, path := range map[string]string{"a1": private, "a2": ownerOnly} {
		r := fn.start(id, startReq(protocol.LifecycleJob, id, map[string]any{"uri": "file://" + path}, fn.creds()))
		if r.code != "100" || !strings.Contains(r.errText, "the workload's user cannot run it") || !strings.Contains(r.errText, "dynamic uid") {
			t.Errorf("%s: %s %q", path, r.code, r.errText)
		}
		if _, err := os.Stat(filepath.Join(tn.WorkloadsDir(), id)); !os.IsNotExist(err) {
			t.Errorf("%s: workload dir left: %v", id, err)
		}
	}
	if leakedLeases(tn.users.pol.LeaseDir, tn.WorkloadsDir()) {
		t.Errorf("a refused start left a uid lease")
	}
}

// leakedLeases says whether a lease in dir names something in wdir.
func leakedLeases(dir, wdir string) bool {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		if strings.HasPrefix(string(b), wdir) {
			return true
		}
	}
	return false
}

func TestUIDRangeIsHonouredAndExhaustionIsAnError(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 1)
	hi := lo
	uid := strconv.FormatUint(uint64(lo), 10)
	fn := newFakeNode(t)
	leases := t.TempDir()
	fn.startNexlet(Config{Users: UserPolicy{UIDMin: lo, UIDMax: hi, LeaseDir: leases}})
	uri := script(t, `exec sleep 1000`)
	fn.mustStart("one", startReq(protocol.LifecycleService, "one", map[string]any{"uri": uri}, fn.creds()))
	if s, _ := fn.summary("one"); s.Metadata["uid"] != uid {
		t.Errorf("uid = %q, want %s", s.Metadata["uid"], uid)
	}
	// Never reused while the workload lives.
	r := fn.start("two", startReq(protocol.LifecycleService, "two", map[string]any{"uri": uri}, fn.creds()))
	if !strings.Contains(r.errText, "no free dynamic uid in "+uid+"-"+uid) {
		t.Errorf("second workload: %s %q", r.code, r.errText)
	}
	fn.stop("one", testNS)
	// Released after the stop's reply (batched); leased to the nexlet until then.
	testkit.Eventually(t, "uid "+uid+" released", func() bool {
		_, err := os.Stat(filepath.Join(leases, uid))
		return os.IsNotExist(err)
	})
	fn.mustStart("three", startReq(protocol.LifecycleService, "three", map[string]any{"uri": uri}, fn.creds()))
	if s, _ := fn.summary("three"); s.Metadata["uid"] != uid {
		t.Errorf("uid after release = %q, want %s again", s.Metadata["uid"], uid)
	}
	for _, bad := range []string{"", "5", "10-5", "0-10", "a-b"} {
		if _, _, err := ParseUIDRange(bad); err == nil {
			t.Errorf("ParseUIDRange(%q) accepted", bad)
		}
	}
}

// twoLeasedOneRunning leases two fresh uids of [lo, hi], retires them (as a stop's
// tidy does) and starts a sleep running as the first.
// The tests here lease from uids of their own (testkit.UIDs), outside the default
// dynamic range (61184-65519): a nexlet of another test run at the same time (make test
// runs the e2e nexds beside this package) starts workloads as uids anywhere in that
// range, and a process running as one of a test's uids makes it unleasable ("leased 2
// uids, want 4"), or is killed by the test's release.
func twoLeasedOneRunning(t *testing.T, lo, hi uint32) (*users, []ident, *exec.Cmd) {
	t.Helper()
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: lo, UIDMax: hi})
	owner := t.TempDir()
	ids, err := us.leaseFreshN(owner, 2)
	if err != nil || len(ids) != 2 {
		t.Fatalf("leased %v: %v", ids, err)
	}
	for _, id := range ids { // as a stop's tidy does: only a retired uid is released
		if !us.retire(id.uid, owner) {
			t.Fatalf("uid %d not retired", id.uid)
		}
	}
	cmd := exec.Command("/bin/sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: ids[0].uid, Gid: ids[0].gid}}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return us, ids, cmd
}

// TestReleaseAllKillsSurvivors: releasing several uids at once (a batch of stops)
// kills any process still running as one of them (one that left its workload's group)
// before its lease goes, and frees the others too.
func TestReleaseAllKillsSurvivors(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 10)
	us, ids, cmd := twoLeasedOneRunning(t, lo, lo+9)
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	if err := us.releaseAll(ids); err != nil {
		t.Fatal(err)
	}
	select {
	case <-waited:
	case <-time.After(10 * time.Second):
		t.Fatal("the process running as a released uid survived")
	}
	for _, id := range ids {
		if _, err := os.Stat(us.leasePath(id.uid)); !os.IsNotExist(err) {
			t.Errorf("lease of uid %d left: %v", id.uid, err)
		}
	}
}

// TestUIDKeptWhenProcessesCannotBeListed: a walk of /proc that cannot see every process
// (here: the directory cannot be opened; EMFILE, a failed read) must not count as
// "nothing runs as this uid". Release and batched release keep the lease of a uid a
// process still runs as, with an error naming the walk, and a fresh lease is refused.
// Before, the failed walk found no survivor and the uid was freed for the next tenant
// while the process ran on.
func TestUIDKeptWhenProcessesCannotBeListed(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 10)
	us, ids, cmd := twoLeasedOneRunning(t, lo, lo+9)
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }() // reaped as soon as it is killed
	defer func() { _ = cmd.Process.Kill(); <-waited }()

	us.proc = filepath.Join(t.TempDir(), "no-proc")
	us.lastBusy = nil // the lease below must walk, not take the walk of the leases above
	if err := us.release(ids[0]); err == nil || !strings.Contains(err.Error(), "no-proc") {
		t.Errorf("release with processes unlisted: %v; want an error naming the walk", err)
	}
	if err := us.releaseAll(ids); err == nil || !strings.Contains(err.Error(), "no-proc") {
		t.Errorf("releaseAll with processes unlisted: %v; want an error naming the walk", err)
	}
	for _, id := range ids {
		if _, err := os.Stat(us.leasePath(id.uid)); err != nil {
			t.Errorf("uid %d freed by a walk that listed no process: %v", id.uid, err)
		}
	}
	if got, err := us.leaseFreshN(t.TempDir(), 1); err == nil {
		t.Errorf("leased %v although no process could be listed", got)
	}
	select {
	case <-waited:
		t.Fatal("the survivor ended")
	default:
	}

	us.proc = "/proc"
	if err := us.releaseAll(ids); err != nil {
		t.Fatal(err)
	}
}

// TestLeaseTakesARecentReleaseWalk: a lease within walkReuse of a release's walk of
// /proc takes its busy uids from that walk instead of walking again, and still never
// takes a uid a process ran as in that walk (here one whose lease is gone while its
// process runs on), nor, from a walk not made for it, a uid whose lease is stale (its
// owner gone: survivors could have started after the walk). A walk made for the lease
// takes the stale one; the running one never.
func TestLeaseTakesARecentReleaseWalk(t *testing.T) {
	needRoot(t)
	const n = 6
	lo := testkit.UIDs(t, n)
	hi := lo + n - 1
	us, ids, cmd := twoLeasedOneRunning(t, lo, hi)
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	defer func() { _ = cmd.Process.Kill(); <-waited }()
	running := ids[0].uid
	if err := us.releaseAll(ids[1:]); err != nil { // a stop's release: one walk
		t.Fatal(err)
	}
	if err := os.Remove(us.leasePath(running)); err != nil { // its process runs on
		t.Fatal(err)
	}
	stale := uint32(lo)
	for stale == running {
		stale++
	}
	if err := writeLease(us.leasePath(stale), filepath.Join(t.TempDir(), "gone")); err != nil {
		t.Fatal(err)
	}

	walks := us.walks.Load()
	got, err := us.leaseFreshN(t.TempDir(), n)
	if err != nil {
		t.Fatal(err)
	}
	if n := us.walks.Load() - walks; n != 0 {
		t.Errorf("%d walks of /proc for a lease right after a release's walk, want 0", n)
	}
	for _, id := range got {
		if id.uid == running || id.uid == stale {
			t.Errorf("uid %d leased from a walk not made for it (running: %d, stale: %d)", id.uid, running, stale)
		}
	}
	if len(got) != n-2 {
		t.Errorf("leased %d uids, want the %d with no lease and no process", len(got), n-2)
	}

	us.lastWalk = us.lastWalk.Add(-walkReuse - time.Millisecond) // too old to take
	got, err = us.leaseFreshN(t.TempDir(), n)
	if err != nil {
		t.Fatal(err)
	}
	if n := us.walks.Load() - walks; n != 1 {
		t.Errorf("%d walks for a lease with no recent walk, want 1", n)
	}
	if len(got) != 1 || got[0].uid != stale {
		t.Errorf("leased %v with a walk of its own, want only the stale lease's uid %d", got, stale)
	}
	select {
	case <-waited:
		t.Fatal("the process running as the unleased uid ended")
	default:
	}
}

// TestFlushedReleaseDoesNotWaitForItsBatch: a nexlet that closes releases the uids of
// its last stops without waiting out the batch's wait (here an hour) for more stops to
// share the walk; before and after the flush, a release walks once for all pending.
func TestFlushedReleaseDoesNotWaitForItsBatch(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 10)
	us, ids, cmd := twoLeasedOneRunning(t, lo, lo+9)
	waited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(waited) }()
	var wg sync.WaitGroup
	r := &releaser{u: us, log: slog.New(slog.DiscardHandler), wg: &wg, gate: &startGate{}, hurry: make(chan struct{}), batch: time.Hour}
	r.add(ids[0])
	r.flush()
	r.add(ids[1]) // after the flush: no wait either
	wg.Wait()     // an hour, without the flush
	<-waited      // the survivor running as ids[0] was killed
	for _, id := range ids {
		if _, err := os.Stat(us.leasePath(id.uid)); !os.IsNotExist(err) {
			t.Errorf("lease of uid %d left after the flushed release: %v", id.uid, err)
		}
	}
}

// TestStoppedWorkloadsUIDStaysLeasedUntilReleased: between a stop's removal of the
// workload's directory and the batched release of its uid, the uid must stay leased. A
// lease naming a directory that is gone is stale, so another lease (the pool's filler,
// another nexlet of the host) could take the uid meanwhile, and the pending release
// would then kill that holder's processes and remove its lease, leaving the uid to a
// third workload as well. A zombie running as the uid keeps the release waiting, as a
// slow walk of /proc or a survivor would.
func TestStoppedWorkloadsUIDStaysLeasedUntilReleased(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	leases := t.TempDir()
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{Users: UserPolicy{UIDMin: uid, UIDMax: uid, LeaseDir: leases}})
	fn.mustStart("one", startReq(protocol.LifecycleService, "one", map[string]any{"uri": script(t, `exec sleep 1000`)}, fn.creds()))
	if s, _ := fn.summary("one"); s.Metadata["uid"] != strconv.Itoa(int(uid)) {
		t.Fatalf("uid = %q, want %d", s.Metadata["uid"], uid)
	}
	zombie := exec.Command("/bin/true")
	zombie.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	defer zombie.Wait()
	fn.stop("one", testNS)
	unlock, err := tn.Nexlet.users.lock()
	if err != nil {
		t.Fatal(err)
	}
	b, rerr := os.ReadFile(tn.Nexlet.users.leasePath(uid))
	free, _ := tn.Nexlet.users.leaseFreeLocked(uid, true)
	unlock()
	if rerr == nil && free {
		t.Fatalf("uid %d: its lease (%q) is stale while its release is pending: another workload could be given the uid", uid, b)
	}
}

// TestFreshLeaseHeldWhileItsDirectoryIsMade: a uid leased for a workload on the deploy
// path (no pooled uid left) is held from the moment its lease is written, before the
// workload's directory is made: a lease naming a directory that is not there is stale,
// so the pool's filler or another nexlet of the host could lease the same uid for
// another workload meanwhile.
func TestFreshLeaseHeldWhileItsDirectoryIsMade(t *testing.T) {
	needRoot(t)
	uid := testkit.UIDs(t, 1)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid})
	dir := filepath.Join(t.TempDir(), "one")
	id, made, err := us.acquire(ident{dynamic: true, name: "dynamic"}, dir)
	if err != nil || made || id.uid != uid {
		t.Fatalf("acquire: %v made=%v: %v", id, made, err)
	}
	if got, err := us.leaseFreshN("/proc/"+strconv.Itoa(os.Getpid()), 1); err == nil {
		t.Fatalf("uid %d leased again (%v) before the first workload's directory was made", uid, got)
	}
	if err := makeWorkloadDirs(dir, id); err != nil {
		t.Fatal(err)
	}
}

// statusUIDs is every process's uids as its status says (real, effective, saved, fs).
func statusUIDs() map[int][]uint32 {
	out := map[int][]uint32{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/status")
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
				for _, f := range strings.Fields(rest) {
					v, _ := strconv.ParseUint(f, 10, 32)
					out[pid] = append(out[pid], uint32(v))
				}
			}
		}
	}
	return out
}

// realUIDAlone starts a root process (python3, which the caller checked for) whose real
// uid is uid and whose effective and saved uids stay root's, killed when the test ends.
func realUIDAlone(t *testing.T, uid uint32) *exec.Cmd {
	t.Helper()
	mixed := exec.Command("/usr/bin/python3", "-c", "import os, sys, time; os.setresuid(int(sys.argv[1]), 0, 0); print('set', flush=True); time.sleep(60)", strconv.FormatUint(uint64(uid), 10))
	mixed.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out, err := mixed.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := mixed.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = mixed.Process.Kill(); _ = mixed.Wait() })
	buf := make([]byte, 16)
	if n, _ := out.Read(buf); !strings.Contains(string(buf[:n]), "set") {
		t.Fatalf("helper said %q", buf[:n])
	}
	return mixed
}

// TestWalkProcsFindsEveryUID: the /proc walk, which reads a process's status only when
// its /proc directory belongs to root (the kernel gives it the effective uid), finds
// every uid a process runs with: for every process on the host, its uids per the walk
// are its uids per its status. A process that has the uid only as its real uid, with
// root's effective uid, is found under it too.
func TestWalkProcsFindsEveryUID(t *testing.T) {
	needRoot(t)
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("needs /usr/bin/python3 to set a real uid alone")
	}
	uid := testkit.UIDs(t, 1)
	mixed := realUIDAlone(t, uid)
	if p, err := uidProcs("/proc", uid); err != nil || !slices.Contains(p, mixed.Process.Pid) {
		t.Errorf("uid %d: walk found %v (%v), not process %d, whose real uid it is", uid, p, err, mixed.Process.Pid)
	}

	// Enough processes that /proc's entries take several of the walk's directory reads
	// (8 KiB, some 340 entries): a walk that stopped after the first would miss some.
	if n := len(statusUIDs()); n < 600 {
		for range 600 - n {
			c := exec.Command("/bin/sleep", "60")
			c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			defer func() { _ = c.Process.Kill(); _ = c.Wait() }()
		}
	}

	want := statusUIDs()
	got := map[int][]uint32{}
	if err := walkProcs("/proc", func(pid int, uids []uint32) { got[pid] = slices.Clone(uids) }); err != nil {
		t.Fatalf("walk: %v", err)
	}
	after := statusUIDs()
	for pid, w := range want {
		g, ok := got[pid]
		if !ok {
			if _, still := after[pid]; still {
				// Running before the walk and after it: the walk passed it by.
				t.Errorf("pid %d (uids %v) ran throughout the walk, which did not see it", pid, w)
			}
			continue // ended meanwhile
		}
		distinct := slices.Compact(slices.Sorted(slices.Values(w)))
		gd := slices.Compact(slices.Sorted(slices.Values(g)))
		switch {
		case slices.Equal(distinct, gd):
		case len(w) == 4 && w[1] != 0 && len(gd) == 1 && gd[0] == w[1]:
			// The walk's one blind spot (walkProcs): mixed uids, none of them root's
			// effective uid. A host process, for instance a setuid program a user runs.
			t.Logf("pid %d: walk sees effective uid %d only, status says %v", pid, gd[0], w)
		default:
			t.Errorf("pid %d: walk says uids %v, status says %v", pid, g, w)
		}
	}
}

// TestPidfdUIDsMatchStatus: what a pidfd says of a process's uids (the walk's source for
// root's processes where the kernel has PIDFD_GET_INFO) is what its status says, here
// for a process whose real uid differs from its effective and saved uids, and for an
// exited, unreaped process (which still counts as running as its uid).
func TestPidfdUIDsMatchStatus(t *testing.T) {
	needRoot(t)
	var uids [4]uint32
	if ok, err := pidfdUIDs(os.Getpid(), &uids); !ok {
		t.Skipf("no PIDFD_GET_INFO here: %v", err)
	}
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("needs /usr/bin/python3 to set a real uid alone")
	}
	uid := testkit.UIDs(t, 1)
	mixed := realUIDAlone(t, uid)
	for _, pid := range []int{os.Getpid(), mixed.Process.Pid} {
		if ok, err := pidfdUIDs(pid, &uids); !ok {
			t.Fatalf("pid %d: %v", pid, err)
		}
		if want := statusUIDs()[pid]; !slices.Equal(uids[:], want) {
			t.Errorf("pid %d: pidfd says uids %v, status %v", pid, uids, want)
		}
	}
	if uids[0] != uid || uids[1] != 0 {
		t.Errorf("the mixed process's uids %v, want real %d and effective 0", uids, uid)
	}

	zombie := exec.Command("/bin/true")
	if err := zombie.Start(); err != nil {
		t.Fatal(err)
	}
	defer zombie.Wait()
	testkit.EventuallyWithin(t, 10*time.Second, "the child to exit", func() bool {
		b, _ := os.ReadFile("/proc/" + strconv.Itoa(zombie.Process.Pid) + "/stat")
		return strings.Contains(string(b), ") Z ")
	})
	if ok, err := pidfdUIDs(zombie.Process.Pid, &uids); ok {
		if want := statusUIDs()[zombie.Process.Pid]; !slices.Equal(uids[:], want) {
			t.Errorf("exited, unreaped pid %d: pidfd says uids %v, status %v", zombie.Process.Pid, uids, want)
		}
	} else if err != unix.ESRCH {
		t.Errorf("exited, unreaped pid %d: %v; want its uids, or ESRCH (the walk then reads its status)", zombie.Process.Pid, err)
	}
}

// TestParseStatusUIDs: the walk's parse of a status file's "Uid:" line, including a read
// cut off inside it (not taken: the uids would be partial) and a file without one.
func TestParseStatusUIDs(t *testing.T) {
	var uids [4]uint32
	for _, c := range []struct {
		in   string
		want []uint32
	}{
		{"Name:\tsh\nUmask:\t0022\nUid:\t1000\t0\t0\t1000\nGid:\t0\t0\t0\t0\n", []uint32{1000, 0, 0, 1000}},
		{"Name:\tsh\nUid:\t61184\t61184\t61184\t61184\n", []uint32{61184, 61184, 61184, 61184}},
		{"Name:\tsh\nUid:\t1000\t0", nil},
		{"Name:\tsh\nGid:\t0\t0\t0\t0\n", nil},
		{"Uid:\t5\t5\t5\t5\n", nil}, // always after Name: a line start is "\nUid:"
	} {
		got := parseStatusUIDs([]byte(c.in), &uids)
		if !slices.Equal(uids[:got], c.want) {
			t.Errorf("%q: got %v, want %v", c.in, uids[:got], c.want)
		}
	}
}

// FuzzParseStatusUIDs: whatever a read of a status file holds (cut anywhere, any bytes),
// the parse never panics and takes the uids of the first line starting "Uid:" after
// the first, only when that line is complete, up to four and up to a field that is not
// a uid; and a status file's Uid line is read whatever process name precedes it (the
// kernel escapes a name's newlines and backslashes, so a name cannot start a line).
func FuzzParseStatusUIDs(f *testing.F) {
	f.Add([]byte("Name:\tsh\nUmask:\t0022\nUid:\t1000\t0\t0\t1000\nGid:\t0\t0\t0\t0\n"), "sh", uint32(1000), uint32(0), uint32(0), uint32(1000))
	f.Add([]byte("Name:\tsh\nUid:\t1000\t0"), "a\\nUid:\t1", uint32(61184), uint32(61184), uint32(61184), uint32(61184))
	f.Add([]byte("Name:\tx\nUid:\t4294967296\t1\n"), "", uint32(1<<32-1), uint32(1), uint32(2), uint32(3))
	f.Fuzz(func(t *testing.T, b []byte, name string, r, e, s, fs uint32) {
		var uids [4]uint32
		got := parseStatusUIDs(b, &uids)
		var want []uint32
		text := string(b)
		if i := strings.Index(text, "\nUid:"); i >= 0 {
			if line, _, complete := strings.Cut(text[i+5:], "\n"); complete {
				for _, fld := range strings.Fields(line) {
					v, err := strconv.ParseUint(fld, 10, 32)
					if err != nil || len(want) == 4 {
						break
					}
					want = append(want, uint32(v))
				}
			}
		}
		if !slices.Equal(uids[:got], want) {
			t.Fatalf("%q: parsed %v, want %v", b, uids[:got], want)
		}

		// As the kernel writes it: the name escaped (proc_task_name), then the lines
		// before Uid.
		esc := strings.NewReplacer("\\", "\\\\", "\n", "\\n").Replace(name)
		status := fmt.Sprintf("Name:\t%s\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t7\nNgid:\t0\nPid:\t7\nPPid:\t1\nTracerPid:\t0\nUid:\t%d\t%d\t%d\t%d\nGid:\t0\t0\t0\t0\n", esc, r, e, s, fs)
		got = parseStatusUIDs([]byte(status), &uids)
		if want := []uint32{r, e, s, fs}; !slices.Equal(uids[:got], want) {
			t.Fatalf("status of a process named %q: parsed %v, want %v", name, uids[:got], want)
		}
	})
}

// TestOwnProc: the pidfd walk is taken only where proc lists this process's own pid
// namespace; a proc whose "self" names another pid (another namespace's /proc) or none
// (a test's directory) is read through each status.
func TestOwnProc(t *testing.T) {
	if !ownProc("/proc") {
		t.Fatal("/proc is not this process's own")
	}
	other := t.TempDir()
	if err := os.Symlink("1", filepath.Join(other, "self")); err != nil {
		t.Fatal(err)
	}
	if ownProc(other) {
		t.Error("a proc whose self names pid 1 taken as this process's own")
	}
	if ownProc(t.TempDir()) {
		t.Error("a proc with no self taken as this process's own")
	}
}

// TestAttackTenantProbesRootOnlyFiles: a tenant names, as its workload's uri or
// workdir, paths in a directory only root may search. The nexlet looked at them as
// root before the start, and its answer said what each was: "no such file",
// "is not executable", "is not a regular file", "is not a directory". So a tenant
// (a NATS user, perhaps not even on the host) learnt which files exist in /root or
// the state directory. Now a path is looked at only once the workload's user may
// reach it: every probe gets the same answer, that its user cannot reach it. A
// probe where its user may look is answered precisely, as before.
func TestAttackTenantProbesRootOnlyFiles(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	private := t.TempDir() // root's alone, 0700
	if err := os.WriteFile(filepath.Join(private, "secret"), []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(private, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	runs := script(t, `exit 0`)
	digits := regexp.MustCompile(`[0-9]+`)
	answer := func(id string, run map[string]any, probe string) string {
		r := fn.start(id, startReq(protocol.LifecycleJob, id, run, fn.creds()))
		if r.code == "" {
			t.Fatalf("%s: started", probe)
		}
		// The answer with the probed path and numbers (the dynamic uid) left out.
		return digits.ReplaceAllString(strings.ReplaceAll(r.errText, probe, "P"), "N")
	}
	// The same names through a symlink a workload could make where it may write.
	public := publicDir(t)
	for _, name := range []string{"secret", "sub", "missing"} {
		if err := os.Symlink(filepath.Join(private, name), filepath.Join(public, name)); err != nil {
			t.Fatal(err)
		}
	}
	for _, dir := range []string{private, public} {
		for _, field := range []string{"uri", "workdir"} {
			got := map[string]string{}
			for i, name := range []string{"secret", "sub", "missing"} {
				probe := filepath.Join(dir, name)
				run := map[string]any{"uri": "file://" + probe}
				if field == "workdir" {
					run = map[string]any{"uri": runs, "workdir": probe}
				}
				got[name] = answer(fmt.Sprintf("p%s%d", field, i), run, probe)
				got[name] = strings.ReplaceAll(got[name], private, "D")
			}
			if got["secret"] != got["missing"] || got["sub"] != got["missing"] {
				t.Errorf("%s in %s: a root-only directory's file, directory and missing name answered apart:\n%q\n%q\n%q", field, dir, got["secret"], got["sub"], got["missing"])
			}
		}
	}
	// Where the workload's user may look, the answer still says what is wrong.
	if got := answer("pub", map[string]any{"uri": "file:///nonexistent/prog"}, "/nonexistent/prog"); !strings.Contains(got, "no such file") {
		t.Errorf("a missing file where the user may look: %q", got)
	}
}

// TestAttackTenantProbesProcLinks: a tenant names, as its workload's workdir or uri,
// a path through another process's /proc/<pid>/cwd or /proc/<pid>/root. The kernel
// lets a uid follow those links only into processes it may trace; the nexlet read
// them as root and went on from where they point, so its answer told the tenant
// where a root process works ("directory /root/... cannot be searched", or a start
// where the link led somewhere searchable) and whether a name exists there. Now a
// path through /proc is refused before anything in it is looked at: one answer for
// every process, wherever it works.
func TestAttackTenantProbesProcLinks(t *testing.T) {
	needRoot(t)
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	private := t.TempDir() // root's alone, 0700
	if err := os.WriteFile(filepath.Join(private, "secret"), []byte("x"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(private, "sub"), 0o755); err != nil {
		t.Fatal(err)
	}
	// Root processes working in the root-only directory, below it, and in /.
	pids := map[string]string{}
	for name, dir := range map[string]string{"private": private, "sub": filepath.Join(private, "sub"), "root": "/"} {
		cmd := exec.Command("sleep", "120")
		cmd.Dir = dir
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
		pids[name] = strconv.Itoa(cmd.Process.Pid)
	}
	runs := script(t, `sleep 30`)
	digits := regexp.MustCompile(`[0-9]+`)
	n := 0
	answer := func(run map[string]any, probe string) (raw, norm string) {
		n++
		id := fmt.Sprintf("proc%d", n)
		r := fn.start(id, startReq(protocol.LifecycleService, id, run, fn.creds()))
		if r.code == "" {
			fn.stop(id, testNS)
			return "started", "started"
		}
		return r.errText, digits.ReplaceAllString(strings.ReplaceAll(r.errText, probe, "P"), "N")
	}
	for _, probe := range []struct{ field, tail string }{
		{"workdir", "cwd"}, {"workdir", "cwd/sub"}, {"uri", "cwd/secret"}, {"uri", "cwd/missing"},
		{"workdir", "root/tmp"}, {"uri", "root" + strings.TrimPrefix(runs, "file://")},
	} {
		got := map[string]string{}
		for name, pid := range pids {
			p := "/proc/" + pid + "/" + probe.tail
			run := map[string]any{"uri": "file://" + p}
			if probe.field == "workdir" {
				run = map[string]any{"uri": runs, "workdir": p}
			}
			raw, norm := answer(run, p)
			if strings.Contains(raw, filepath.Dir(private)) { // t.TempDir: its parent is root-only too
				t.Errorf("%s %s of the process in %s: the answer names where it works: %q", probe.field, probe.tail, name, raw)
			}
			got[name] = norm
		}
		if got["private"] != got["sub"] || got["private"] != got["root"] {
			t.Errorf("%s /proc/<pid>/%s: processes working in different places answered apart:\nprivate %q\nsub     %q\nroot    %q",
				probe.field, probe.tail, got["private"], got["sub"], got["root"])
		}
	}
}

// TestResolveAsLongPath: a path the kernel would refuse as too long (PATH_MAX) is
// refused before it is walked. A start request's uri of a megabyte of "../" was
// walked name by name, two syscalls a name (1.27 s of the nexlet's time, measured),
// and then refused by the exec.
func TestResolveAsLongPath(t *testing.T) {
	id := ident{uid: 65534, gid: 65534}
	for _, p := range []string{"/" + strings.Repeat("../", 330000) + "bin/true", "/" + strings.Repeat("a", unix.PathMax)} {
		if _, err := resolveAs(id, p); !errors.Is(err, syscall.ENAMETOOLONG) {
			t.Errorf("a path of %d bytes: %v, want ENAMETOOLONG", len(p), err)
		}
	}
	if _, err := resolveAs(id, "/"+strings.Repeat("../", 100)+"bin"); err != nil {
		t.Errorf("a path within PATH_MAX: %v", err)
	}
}
