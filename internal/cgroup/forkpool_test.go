package cgroup

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// wantBornIn fails t unless procCgroup (a /proc/<pid>/cgroup) puts who in m's group
// name in every hierarchy.
func wantBornIn(t *testing.T, m *Manager, procCgroup []byte, name, who string) {
	t.Helper()
	_, in := parseSelfCgroup(procCgroup)
	for _, h := range m.hiers {
		ctrl := strings.Split(h.Name, ",")[0]
		if want := strings.TrimPrefix(filepath.Join(h.Root, name), h.Mount); in[ctrl] != want {
			t.Errorf("%s in %s group %q, want %q", who, h.Name, in[ctrl], want)
		}
	}
}

// poolGroups lists the pool's groups in every hierarchy of m.
func poolGroups(m *Manager) []string {
	var out []string
	for _, h := range m.hiers {
		ents, _ := os.ReadDir(h.Root)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), forkPoolPrefix) {
				out = append(out, filepath.Join(h.Root, e.Name()))
			}
		}
	}
	return out
}

// TestV1ForkPool: a process started in a group from the pool is born in it in every
// hierarchy with the limits written and the thread setup inherited (no_new_privs);
// the pool thread leaves the group, so only the child is listed and the group can be
// removed; a group taken but never started in is removed too; Close leaves no pool
// group behind.
func TestV1ForkPool(t *testing.T) {
	m := v1Root(t)
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	p := m.NewForkPool(2)
	defer p.Close()
	testkit.Eventually(t, "two pool groups in each hierarchy", func() bool { return len(poolGroups(m)) == 2*len(m.hiers) })
	for _, name := range []string{"w1", "w2", "w3"} { // more than the pool holds
		g, err := p.Create(name, Limits{PidsMax: 7, MemoryMax: 64 << 20})
		must(t, err)
		if got := readTrim(t, filepath.Join(m.hierDir("pids"), name, "pids.max")); got != "7" {
			t.Errorf("%s: pids.max %q", name, got)
		}
		if got := readTrim(t, filepath.Join(m.hierDir("memory"), name, "memory.limit_in_bytes")); got != "67108864" {
			t.Errorf("%s: memory.limit_in_bytes %q", name, got)
		}
		// Not asked for: the kernel's defaults (a pool group's are not written).
		if got := readTrim(t, filepath.Join(m.hierDir("cpu"), name, "cpu.cfs_quota_us")); got != "-1" {
			t.Errorf("%s: cpu.cfs_quota_us %q", name, got)
		}
		if name == "w1" && !g.Empty() {
			t.Errorf("%s: a pool group, not known empty", name)
		}
		cmd := exec.Command("/bin/sleep", "3600")
		must(t, g.Start(cmd))
		if g.Empty() {
			t.Errorf("%s: known empty after a start", name)
		}
		b, err := os.ReadFile("/proc/" + itoa(cmd.Process.Pid) + "/cgroup")
		must(t, err)
		wantBornIn(t, m, b, name, name+": child")
		st, err := os.ReadFile("/proc/" + itoa(cmd.Process.Pid) + "/status")
		must(t, err)
		if !strings.Contains(string(st), "NoNewPrivs:\t1") {
			t.Errorf("%s: the child lacks no_new_privs", name)
		}
		testkit.Eventually(t, "only the child in the group", func() bool {
			for _, h := range m.hiers {
				ps, _ := readPids(filepath.Join(h.Root, name, "cgroup.procs"))
				if !slices.Equal(ps, []int{cmd.Process.Pid}) {
					return false
				}
			}
			return true
		})
		must(t, g.Remove())
		_ = cmd.Wait()
		if _, err := os.Stat(filepath.Join(m.hierDir("memory"), name)); !os.IsNotExist(err) {
			t.Errorf("%s: group not removed: %v", name, err)
		}
	}
	// Taken, never started in, removed.
	testkit.Eventually(t, "a ready pool thread", func() bool { return len(poolGroups(m)) == 2*len(m.hiers) })
	g, err := p.Create("unused", Limits{})
	must(t, err)
	must(t, g.Remove())
	// A name already taken: the usual group, the pool thread moves on.
	must(t, os.Mkdir(filepath.Join(m.hierDir("memory"), "taken"), 0o755))
	g, err = p.Create("taken", Limits{})
	must(t, err)
	if g.Empty() {
		t.Errorf("a group that existed before is known empty")
	}
	cmd := exec.Command("/bin/true")
	must(t, g.Start(cmd))
	_ = cmd.Wait()
	must(t, g.Remove())
	p.Close()
	if left := poolGroups(m); len(left) > 0 {
		t.Errorf("pool groups left after Close: %v", left)
	}
}

// TestV1ForkPoolCloseWhileTaken: a Create takes a pool thread without waking it, so
// Close must tell taken threads from offered ones: the offered one's group goes, the
// taken one's stays its taker's, and a start there after Close still has the child
// born in it (by a migration, the thread being gone). Ready counts the offered alone.
func TestV1ForkPoolCloseWhileTaken(t *testing.T) {
	m := v1Root(t)
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	p := m.NewForkPool(2)
	testkit.Eventually(t, "two ready pool threads", func() bool { return p.Ready() == 2 })
	g, err := p.Create("held", Limits{})
	must(t, err)
	if got := p.Ready(); got != 1 {
		t.Errorf("Ready after a take: %d, want 1", got)
	}
	p.Close()
	if left := poolGroups(m); len(left) > 0 {
		t.Errorf("pool groups left after Close: %v", left)
	}
	if _, err := os.Stat(filepath.Join(m.hierDir("memory"), "held")); err != nil {
		t.Fatalf("the taken group went with Close: %v", err)
	}
	if _, err := p.Create("after", Limits{}); err != nil { // the usual group now
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sleep", "3600")
	must(t, g.Start(cmd))
	b, err := os.ReadFile("/proc/" + itoa(cmd.Process.Pid) + "/cgroup")
	must(t, err)
	wantBornIn(t, m, b, "held", "child started after Close")
	must(t, g.Remove())
	_ = cmd.Wait()
	must(t, m.group("after").Remove())
}

// BenchmarkV1CreateStart is a deploy's cgroup share in v1 mode: create the group with
// limits and start a process in it, with the fork pool (size 2) and without (the
// starting thread migrates into the group and back). Removal and the pool's refill
// happen off the clock, as between deploys that are not back to back, and so does a
// 30 ms pause: a migration costs a full RCU grace period only when no other migration
// came just before (the kernel's rcu_sync), and back to back starts would hide that.
func BenchmarkV1CreateStart(b *testing.B) {
	for _, size := range []int{0, 2} {
		b.Run("pool="+itoa(size), func(b *testing.B) {
			m := v1Root(b)
			p := m.NewForkPool(size)
			defer p.Close()
			ready := func() bool { return len(poolGroups(m)) == size*len(m.hiers) }
			i := 0
			for b.Loop() {
				b.StopTimer()
				time.Sleep(30 * time.Millisecond)
				for !ready() {
					time.Sleep(time.Millisecond)
				}
				b.StartTimer()
				name := "b" + itoa(i)
				i++
				g, err := p.Create(name, Limits{PidsMax: 10})
				if err != nil {
					b.Fatal(err)
				}
				cmd := exec.Command("/bin/true")
				if err := g.Start(cmd); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				_ = cmd.Wait()
				if err := g.Remove(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}

// TestV1ForkPoolThreadMoved: when the whole process was moved (its pid written to a
// cgroup.procs, which takes every thread along), the pool thread is no longer in the
// group it was handed with; the start then falls back to the migrating one, and the
// child is still born in its group.
func TestV1ForkPoolThreadMoved(t *testing.T) {
	m := v1Root(t)
	// Where the process started, read before the pool exists: /proc/self/cgroup is the
	// main thread's, and the pool's thread may be the main thread (then it names the
	// pool's group, and the move below would put every thread into "moved").
	b, err := os.ReadFile("/proc/self/cgroup")
	must(t, err)
	_, self := parseSelfCgroup(b)
	p := m.NewForkPool(1)
	defer p.Close()
	testkit.Eventually(t, "a ready pool thread", func() bool { return len(poolGroups(m)) == len(m.hiers) })
	g, err := p.Create("moved", Limits{})
	must(t, err)
	// Move the whole test process (every thread) back to where it started.
	for _, h := range m.hiers {
		must(t, writeFile(filepath.Join(h.Mount, self[strings.Split(h.Name, ",")[0]], "cgroup.procs"), itoa(os.Getpid())))
	}
	cmd := exec.Command("/bin/sleep", "3600")
	must(t, g.Start(cmd))
	b, err = os.ReadFile("/proc/" + itoa(cmd.Process.Pid) + "/cgroup")
	must(t, err)
	wantBornIn(t, m, b, "moved", "child")
	must(t, g.Remove())
	_ = cmd.Process.Kill() // where it was born outside the group, Remove missed it
	_ = cmd.Wait()
}

// BenchmarkV1MoveThread moves the calling thread into a group in every hierarchy and
// back, written as its thread id (as the pool and the starting thread did) and as "0"
// (thisThread). A 30 ms pause off the clock lets the kernel's rcu_sync go idle between
// moves, as between deploys that are not back to back: a move written as an id then
// waits for a full RCU grace period.
func BenchmarkV1MoveThread(b *testing.B) {
	m := v1Root(b)
	g, err := m.Create("move", Limits{})
	if err != nil {
		b.Fatal(err)
	}
	orig, err := os.ReadFile("/proc/thread-self/cgroup")
	if err != nil {
		b.Fatal(err)
	}
	_, origPaths := parseSelfCgroup(orig)
	for _, how := range []string{"id", "self"} {
		b.Run(how, func(b *testing.B) {
			// b.Run runs this in a goroutine of its own: the lock must be taken here. Taken
			// in the caller, it held the wrong goroutine, and "self" (the writing thread)
			// could move one thread in and, after a syscall handed the goroutine to another
			// thread, another out: the group kept a thread and its removal failed (EBUSY,
			// in a benchmark run at load 20).
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			val := thisThread
			if how == "id" {
				val = itoa(unix.Gettid())
			}
			for b.Loop() {
				b.StopTimer()
				time.Sleep(30 * time.Millisecond)
				b.StartTimer()
				for _, h := range g.hiers {
					if err := writeFile(filepath.Join(h.Root, "tasks"), val); err != nil {
						b.Fatal(err)
					}
				}
				for _, h := range g.hiers {
					if err := writeFile(filepath.Join(h.Mount, origPaths[strings.Split(h.Name, ",")[0]], "tasks"), val); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// TestV1ForkPoolAfter: the pool's threads make no group before begin is closed (a
// Create meanwhile migrates), and then fill the pool.
func TestV1ForkPoolAfter(t *testing.T) {
	m := v1Root(t)
	begin := make(chan struct{})
	p := m.NewForkPoolAfter(2, begin)
	defer p.Close()
	time.Sleep(100 * time.Millisecond)
	if left := poolGroups(m); len(left) > 0 || p.Ready() != 0 {
		t.Fatalf("pool groups %v (%d ready) before begin", left, p.Ready())
	}
	g, err := p.Create("early", Limits{})
	must(t, err)
	cmd := exec.Command("/bin/true")
	must(t, g.Start(cmd))
	_ = cmd.Wait()
	must(t, g.Remove())
	close(begin)
	testkit.Eventually(t, "two ready pool threads", func() bool { return p.Ready() == 2 })
}

// TestV1PathIsAgreesWithParse: the pool thread's check before a fork reads a cgroup
// file's lines as parseSelfCgroup does, for every controller of this process.
func TestV1PathIsAgreesWithParse(t *testing.T) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		t.Skip(err)
	}
	_, v1 := parseSelfCgroup(b)
	for c, p := range v1 {
		if !v1PathIs(b, c, p) {
			t.Errorf("%s: not in %q per v1PathIs", c, p)
		}
		if v1PathIs(b, c, p+"x") {
			t.Errorf("%s: in %q per v1PathIs", c, p+"x")
		}
	}
	if v1PathIs(b, "no-such-controller", "/") {
		t.Error("a controller of no line matched")
	}
	text := []byte("12:pids:/a\n11:cpu,cpuacct:/b/c\n0::/u\n")
	for _, c := range []struct {
		ctrl, path string
		want       bool
	}{{"pids", "/a", true}, {"cpuacct", "/b/c", true}, {"cpu", "/b", false}, {"", "/u", false}} {
		if got := v1PathIs(text, c.ctrl, c.path); got != c.want {
			t.Errorf("v1PathIs(%q, %q) = %v, want %v", c.ctrl, c.path, got, c.want)
		}
	}
}

// BenchmarkThreadIn is the pool thread's check, right before each fork, that it is
// still in its group (10-18 us, 26 allocations with os.ReadFile and parseSelfCgroup;
// 4.3 us, 1 allocation now).
func BenchmarkThreadIn(b *testing.B) {
	g := v1Root(b).group("")
	b.ReportAllocs()
	for b.Loop() {
		_ = threadIn(g)
	}
}

// BenchmarkV1StartHeld is a start in a new group while the process holds many
// descriptors, as the native nexlet does with thousands of workloads (two output
// FIFOs and a pidfd each): a fork copies the forking thread's descriptor table and the
// child's execve closes every copy. From the fork pool (pool=2) and from a thread
// moved into the group (pool=0, as when deploys outrun the pool). The descriptors are
// opened after the pool's threads started, as workloads' are.
func BenchmarkV1StartHeld(b *testing.B) {
	for _, size := range []int{0, 2} {
		for _, held := range []int{0, 15000} {
			b.Run("pool="+itoa(size)+"/held="+itoa(held), func(b *testing.B) { benchStartHeld(b, size, held) })
		}
	}
}

func benchStartHeld(b *testing.B, size, held int) {
	m := v1Root(b)
	// As the native nexlet's: a thread that forked is not used again.
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	p := m.NewForkPool(size)
	defer p.Close()
	ready := func() bool { return len(poolGroups(m)) == size*len(m.hiers) }
	for !ready() {
		time.Sleep(time.Millisecond)
	}
	var fds []int
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for len(fds) < held {
		var pp [2]int
		if err := unix.Pipe2(pp[:], unix.O_CLOEXEC); err != nil {
			b.Fatal(err)
		}
		fds = append(fds, pp[0], pp[1])
	}
	r, w, err := os.Pipe()
	if err != nil {
		b.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	i := 0
	var took []time.Duration // the Start alone: to the pool thread, the fork, back
	for b.Loop() {
		b.StopTimer()
		for !ready() {
			time.Sleep(time.Millisecond)
		}
		b.StartTimer()
		name := "b" + itoa(i)
		i++
		g, err := p.Create(name, Limits{})
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("/bin/true")
		cmd.Stdout, cmd.Stderr = w, w
		t0 := time.Now()
		if err := g.Start(cmd); err != nil {
			b.Fatal(err)
		}
		took = append(took, time.Since(t0))
		b.StopTimer()
		_ = cmd.Wait()
		if err := g.Remove(); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	if len(took) > 0 {
		slices.Sort(took)
		b.ReportMetric(float64(took[len(took)/2].Nanoseconds()), "start-p50-ns")
	}
}

// TestV1ForkPoolPrivateFiles: each pool thread, and a thread moved into a group to
// start a process there, forks from a descriptor table of its own that holds none of
// the process's files (so a fork does not copy thousands), yet the child gets exactly
// its stdio and ExtraFiles from the process's table (and not a descriptor the process
// holds without close-on-exec), its exit status reaches Wait, and a descriptor the
// process closes is closed (the pool thread kept no copy: a pipe's reader sees end of
// file). A command whose output is not an *os.File still starts in its group.
func TestV1ForkPoolPrivateFiles(t *testing.T) {
	m := v1Root(t)
	// As the native nexlet's (a thread moved into a group is then discarded, so it
	// gets a table of its own too).
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	early, earlyW, err := os.Pipe() // open before the pool's threads start
	must(t, err)
	defer early.Close()
	p := m.NewForkPool(2)
	defer p.Close()
	testkit.Eventually(t, "two pool groups in each hierarchy", func() bool { return len(poolGroups(m)) == 2*len(m.hiers) })
	must(t, earlyW.Close())
	must(t, early.SetReadDeadline(time.Now().Add(5*time.Second)))
	if n, err := early.Read(make([]byte, 1)); n != 0 || err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("read of a pipe whose writer the process closed: %d, %v (want end of file)", n, err)
	}

	var held []int
	defer func() {
		for _, fd := range held {
			unix.Close(fd)
		}
	}()
	for range 500 {
		var pp [2]int
		must(t, unix.Pipe2(pp[:], unix.O_CLOEXEC))
		held = append(held, pp[0], pp[1])
	}
	// Both pool threads have small tables; every other thread has the process's.
	small := 0
	tasks, err := os.ReadDir("/proc/self/task")
	must(t, err)
	for _, task := range tasks {
		fds, err := os.ReadDir("/proc/self/task/" + task.Name() + "/fd")
		if err == nil && len(fds) < 100 {
			small++
		}
	}
	if small != 2 {
		t.Errorf("%d threads with a small descriptor table, want the pool's 2", small)
	}

	// Not close-on-exec: a child forked from the process's table would inherit it.
	stray, err := unix.Open("/dev/null", unix.O_RDONLY, 0)
	must(t, err)
	defer unix.Close(stray)
	// From a pool thread, and from a thread moved into the group (no pool thread
	// ready: "migrated" is made the usual way).
	for _, name := range []string{"pooled", "migrated"} {
		extra, err := os.CreateTemp(t.TempDir(), "extra")
		must(t, err)
		_, err = extra.WriteString("extra\n")
		must(t, err)
		_, err = extra.Seek(0, 0)
		must(t, err)
		r, w, err := os.Pipe()
		must(t, err)
		create := p.Create
		if name == "migrated" {
			create = m.Create
		}
		g, err := create(name, Limits{})
		must(t, err)
		cmd := exec.Command("/bin/sh", "-c", `echo out; cat <&3; ls /proc/self/fd; cat /proc/self/cgroup >&2; exit 3`)
		cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = w, w, []*os.File{extra}
		must(t, g.Start(cmd))
		w.Close()
		extra.Close()
		b, err := io.ReadAll(r)
		must(t, err)
		r.Close()
		if err := cmd.Wait(); cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != 3 {
			t.Errorf("%s: Wait: %v, %v (want exit code 3)", name, cmd.ProcessState, err)
		}
		// sh's output, then ls's: the descriptors 0-3 and ls's own directory.
		lines := strings.Split(string(b), "\n")
		if len(lines) < 7 || lines[0] != "out" || lines[1] != "extra" || !slices.Equal(lines[2:7], []string{"0", "1", "2", "3", "4"}) {
			t.Errorf("%s: child's output %q, want out, extra and descriptors 0-4", name, lines)
		}
		wantBornIn(t, m, []byte(strings.Join(lines[7:], "\n")), name, name+": child")
		must(t, g.Remove())
	}

	testkit.Eventually(t, "a ready pool thread", func() bool { return len(poolGroups(m)) == 2*len(m.hiers) })
	g, err := p.Create("buffer", Limits{})
	must(t, err)
	var out strings.Builder
	cmd := exec.Command("/bin/sh", "-c", "cat /proc/self/cgroup")
	cmd.Stdout = &out
	must(t, g.Start(cmd))
	must(t, cmd.Wait())
	wantBornIn(t, m, []byte(out.String()), "buffer", "child with a buffer for output")
	must(t, g.Remove())
}
