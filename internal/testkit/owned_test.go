package testkit

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envOwnedHelper makes the test binary run as TestOwnedHelper's killed test process.
const envOwnedHelper = "NEXD_TESTKIT_OWNED_HELPER"

// ownedLeftovers is what TestOwnedHelper leaves when killed: its temp directory, a
// freezer group holding a frozen process, and a memory cgroup holding a process.
type ownedLeftovers struct {
	tmpDir, freezer, memory string
	frozen, member          int
}

// TestOwnedHelper plays a test binary killed before its cleanups: it makes what the
// native nexlet's and the cgroup packages' tests make outside their temp dirs, prints
// each and waits to be killed (-9).
func TestOwnedHelper(t *testing.T) {
	if os.Getenv(envOwnedHelper) == "" {
		t.Skip("run by TestSweepOwnedRemovesKilledBinarysLeftovers")
	}
	dir := OwnedTempDir(t, "nexlet-bench-")
	WriteFile(t, filepath.Join(dir, "run", "state"), "left")
	sleep := func() int {
		cmd := exec.Command("sleep", "600")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		return cmd.Process.Pid
	}
	frozen := sleep()
	FreezeV1(t, frozen)
	freezer := ""
	ents, _ := os.ReadDir("/sys/fs/cgroup/freezer")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), "nexd-test-freeze-"+strconv.Itoa(frozen)+"-") {
			freezer = filepath.Join("/sys/fs/cgroup/freezer", e.Name())
		}
	}
	memory := filepath.Join("/sys/fs/cgroup/memory", OwnedName(t, "nexd-test-kit-"))
	if err := os.Mkdir(filepath.Join(memory), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(memory, "inner"), 0o755); err != nil {
		t.Fatal(err)
	}
	member := sleep()
	if err := os.WriteFile(filepath.Join(memory, "inner", "cgroup.procs"), []byte(strconv.Itoa(member)), 0); err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString(strings.Join([]string{dir, freezer, memory, strconv.Itoa(frozen), strconv.Itoa(member)}, " ") + "\n")
	select {} // killed (-9): no cleanup runs
}

// TestSweepOwnedRemovesKilledBinarysLeftovers: a test binary killed (-9) left its
// /tmp/nexlet-bench-* directory, the frozen process in its freezer group
// (/sys/fs/cgroup/freezer/nexd-test-<pid>-<frozen pid>) and the cgroups its tests made
// (nexd-test-native-<random> and others), with their processes; nothing removed them,
// and their names did not say whose they were. Now they are named for the process that
// made them (OwnedTempDir, OwnedName), and the next test binary's Binaries.Run thaws
// and kills what is left in a gone process's cgroups and removes them and its temp
// directories, leaving a live process's alone.
func TestSweepOwnedRemovesKilledBinarysLeftovers(t *testing.T) {
	if os.Getenv(envOwnedHelper) != "" || os.Getenv(envAsideHelper) != "" {
		t.Skip("in a helper")
	}
	for _, h := range []string{"freezer", "memory"} {
		if syscall.Access(filepath.Join("/sys/fs/cgroup", h, "cgroup.procs"), 2) != nil {
			t.Skipf("no writable cgroup v1 %s hierarchy here", h)
		}
	}
	tmp := t.TempDir() // the binaries' os.TempDir(): their temp dirs are swept here only
	cmd := exec.Command(os.Args[0], "-test.run=^TestOwnedHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), envOwnedHelper+"=1", "TMPDIR="+tmp)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	f := strings.Fields(line)
	if err != nil || len(f) != 5 || f[1] == "" {
		t.Fatalf("the helper's leftovers: %q, %v", line, err)
	}
	left := ownedLeftovers{tmpDir: f[0], freezer: f[1], memory: f[2]}
	left.frozen, _ = strconv.Atoi(f[3])
	left.member, _ = strconv.Atoi(f[4])
	frozenStart, _ := procStart(f[3])
	memberStart, _ := procStart(f[4])
	t.Cleanup(func() { // should the sweep not have
		_ = os.WriteFile(filepath.Join(left.freezer, "freezer.state"), []byte("THAWED"), 0)
		for _, pid := range []int{left.frozen, left.member} {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		_ = removeCgroupTree(left.freezer)
		_ = removeCgroupTree(left.memory)
	})
	for _, p := range []string{left.tmpDir, left.freezer, filepath.Join(left.memory, "inner")} {
		if _, err := os.Stat(p); err != nil {
			t.Fatalf("the killed binary's leftover: %v", err)
		}
	}
	if st, _ := os.ReadFile(filepath.Join(left.freezer, "freezer.state")); strings.TrimSpace(string(st)) != "FROZEN" {
		t.Fatalf("the killed binary's freezer group is %q, want FROZEN", st)
	}
	// A live process's (this one's) are kept.
	tag, err := ownerTag()
	if err != nil {
		t.Fatal(err)
	}
	liveDir := filepath.Join(tmp, "nexlet-bench-"+tag+"-1")
	if err := os.Mkdir(liveDir, 0o700); err != nil {
		t.Fatal(err)
	}
	liveCg := filepath.Join("/sys/fs/cgroup/memory", OwnedName(t, "nexd-test-kit-"))
	if err := os.Mkdir(liveCg, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = syscall.Rmdir(liveCg) })

	// The next test binary (this one, running no test).
	next := exec.Command(os.Args[0], "-test.run=^$")
	next.Env = append(os.Environ(), "TMPDIR="+tmp)
	said, err := next.CombinedOutput()
	if err != nil {
		t.Fatalf("the next test binary: %v\n%s", err, said)
	}
	t.Logf("the next test binary said: %s", said)
	for _, p := range []string{left.tmpDir, left.freezer, left.memory} {
		if _, err := os.Lstat(p); !os.IsNotExist(err) {
			t.Errorf("the killed binary's %s is still there after the next binary's start (%v)", p, err)
		}
	}
	for pid, start := range map[int]string{left.frozen: frozenStart, left.member: memberStart} {
		if !WaitFor(10*time.Second, func() bool { return !procLive(pid, start) }) {
			t.Errorf("the killed binary's process %d (in its cgroups) still runs", pid)
		}
	}
	for _, p := range []string{liveDir, liveCg} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("the sweep removed a live process's %s: %v", p, err)
		}
	}
}

// procLive reports whether pid still runs as the process that started at start: not
// ended, not a zombie, not another process by the same number.
func procLive(pid int, start string) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 || i+2 >= len(s) || s[i+2] == 'Z' {
		return false
	}
	now, ok := procStart(strconv.Itoa(pid))
	return ok && now == start
}

// TestPidNamespaceCopySweepsNothing: a copy of the test binary in a pid namespace of
// its own (InPidNamespace) runs TestMain's Binaries.Run, but its /proc shows none of
// the host's processes, so every owner looked gone to its sweep: it removed this live
// binary's owned directory (in a CI run, the e2e binary's nexd and nexctl builds). It
// sweeps nothing now.
func TestPidNamespaceCopySweepsNothing(t *testing.T) {
	if os.Getenv(envPidns) != "" {
		if !InPidNamespace(t) {
			t.Fatal("not in the copy")
		}
		return // the copy: its TestMain ran the sweep before this
	}
	dir := OwnedTempDir(t, "nexd-test-public-")
	if !InPidNamespace(t) {
		if _, err := os.Stat(dir); err != nil {
			t.Fatalf("the pid namespace copy's sweep removed the live owner's %s: %v", dir, err)
		}
	}
}
