package cgroup

import (
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestV1ForkPoolPrivateFilesStress: many concurrent starts from threads with
// descriptor tables of their own (pool threads, and threads moved into the group when
// the pool is taken), while the process holds thousands of descriptors,
// opens and closes files on other threads and collects garbage: every child gets
// exactly its stdio and ExtraFiles, every exit status reaches Wait (also of children
// that exited before Start returned), Kill reaches a running child through the
// os.Process Start left, and no descriptor of the process's table is closed or
// replaced behind its owner's back.
func TestV1ForkPoolPrivateFilesStress(t *testing.T) {
	if testing.Short() {
		t.Skip("stress")
	}
	// Inherited from whatever started the test, as nexd marks its own (a start that
	// migrates forks from the process's table).
	must(t, unix.CloseRange(3, ^uint(0), unix.CLOSE_RANGE_CLOEXEC))
	m := v1Root(t)
	// As the native nexlet's: starts the pool cannot take fork from a thread moved
	// into the group, which gets a table of its own too.
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	p := m.NewForkPool(4)
	defer p.Close()
	testkit.Eventually(t, "pool groups", func() bool { return len(poolGroups(m)) == 4*len(m.hiers) })

	// Held descriptors, remembered by what they are.
	type heldFD struct {
		fd       int
		dev, ino uint64
	}
	var held []heldFD
	defer func() {
		for _, h := range held {
			unix.Close(h.fd)
		}
	}()
	for range 1500 {
		var pp [2]int
		must(t, unix.Pipe2(pp[:], unix.O_CLOEXEC))
		for _, fd := range pp {
			var st unix.Stat_t
			must(t, unix.Fstat(fd, &st))
			held = append(held, heldFD{fd, st.Dev, st.Ino})
		}
	}

	countFDs := func(dir string) int {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return -1
		}
		return len(ents)
	}
	// Pool threads: the tasks with a small table.
	poolTables := func() (sizes []int) {
		tasks, _ := os.ReadDir("/proc/self/task")
		for _, task := range tasks {
			if n := countFDs("/proc/self/task/" + task.Name() + "/fd"); n >= 0 && n < 100 {
				sizes = append(sizes, n)
			}
		}
		return sizes
	}
	before := countFDs("/proc/self/fd")
	poolBefore := poolTables()

	stop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Go(func() { // garbage, collected
		for {
			select {
			case <-stop:
				return
			default:
			}
			_ = make([]byte, 1<<16)
			runtime.GC()
			time.Sleep(time.Millisecond)
		}
	})
	bg.Go(func() { // files opened and closed on other threads, some on the poller
		for {
			select {
			case <-stop:
				return
			default:
			}
			r, w, err := os.Pipe()
			if err == nil {
				_ = r.SetReadDeadline(time.Now().Add(time.Millisecond))
				_, _ = r.Read(make([]byte, 1))
				r.Close()
				w.Close()
			}
			if f, err := os.Open("/dev/null"); err == nil {
				f.Close()
			}
		}
	})

	var seq atomic.Int64
	var failures atomic.Int64
	fail := func(format string, a ...any) {
		if failures.Add(1) <= 20 {
			t.Errorf(format, a...)
		}
	}
	one := func() {
		i := seq.Add(1)
		name := fmt.Sprintf("s%d", i)
		g, err := p.Create(name, Limits{})
		if err != nil {
			fail("create %s: %v", name, err)
			return
		}
		defer func() {
			if err := g.Remove(); err != nil {
				fail("remove %s: %v", name, err)
			}
		}()
		r, w, err := os.Pipe()
		if err != nil {
			fail("pipe: %v", err)
			return
		}
		defer r.Close()
		nextra := int(i % 3)
		var extra []*os.File
		for range nextra {
			f, err := os.Open("/dev/null")
			if err != nil {
				fail("open: %v", err)
				return
			}
			defer f.Close()
			extra = append(extra, f)
		}
		code := int(i % 7)
		var cmd *exec.Cmd
		switch i % 4 {
		case 0: // gone before Start returns, most likely
			cmd = exec.Command("/bin/sh", "-c", fmt.Sprintf("exit %d", code))
		case 1: // killed through the os.Process
			cmd = exec.Command("/bin/sleep", "60")
			code = -1
		default:
			cmd = exec.Command("/bin/sh", "-c", fmt.Sprintf("ls /proc/self/fd; exit %d", code))
		}
		cmd.Stdout, cmd.Stderr, cmd.ExtraFiles = w, w, extra
		if err := g.Start(cmd); err != nil {
			w.Close()
			fail("start %s: %v", name, err)
			return
		}
		w.Close()
		switch i % 4 {
		case 0:
			time.Sleep(5 * time.Millisecond) // a zombie by now
		case 1:
			if err := cmd.Process.Kill(); err != nil {
				fail("kill %s: %v", name, err)
			}
		}
		out, err := io.ReadAll(r)
		if err != nil {
			fail("read %s: %v", name, err)
		}
		werr := cmd.Wait()
		if cmd.ProcessState == nil || cmd.ProcessState.ExitCode() != code {
			fail("%s: Wait %v, %v; want exit code %d", name, cmd.ProcessState, werr, code)
		}
		if i%4 >= 2 {
			// sh's 0-2, the extra files and ls's own directory
			want := []string{"0", "1", "2"}
			for j := range nextra + 1 {
				want = append(want, fmt.Sprint(3+j))
			}
			if got := strings.Fields(string(out)); strings.Join(got, " ") != strings.Join(want, " ") {
				fail("%s: child's descriptors %q, want %q", name, got, want)
			}
		}
	}
	var wg sync.WaitGroup
	for range 6 {
		wg.Go(func() {
			for range 40 {
				one()
			}
		})
	}
	wg.Wait()
	close(stop)
	bg.Wait()
	// Starts that fail (exec refused) leave nothing open either, and the pool goes on.
	for i := range 20 {
		g, err := p.Create(fmt.Sprintf("f%d", i), Limits{})
		must(t, err)
		r, w, err := os.Pipe()
		must(t, err)
		cmd := exec.Command("/nonexistent/x")
		cmd.Stdout = w
		if err := g.Start(cmd); err == nil {
			t.Errorf("start of a missing binary: no error")
		}
		r.Close()
		w.Close()
		must(t, g.Remove())
	}
	runtime.GC()
	runtime.GC()
	if after := countFDs("/proc/self/fd"); after > before+2 { // ReadDir's own, a slack
		t.Errorf("process descriptors: %d before, %d after", before, after)
	}
	testkit.Eventually(t, "pool groups", func() bool { return len(poolGroups(m)) == 4*len(m.hiers) })
	// The threads moved into groups ended with their starts; the pool's tables did not
	// grow.
	var poolAfter []int
	testkit.Eventually(t, "only the pool's threads with tables of their own", func() bool {
		poolAfter = poolTables()
		return len(poolAfter) == 4
	})
	if slices.Max(poolAfter) > slices.Max(poolBefore)+1 {
		t.Errorf("pool threads' tables: %v before, %v after", poolBefore, poolAfter)
	}
	for _, h := range held {
		var st unix.Stat_t
		if err := unix.Fstat(h.fd, &st); err != nil || st.Dev != h.dev || st.Ino != h.ino {
			fail("held descriptor %d: %v, %d:%d, want %d:%d", h.fd, err, st.Dev, st.Ino, h.dev, h.ino)
		}
	}
}

// TestV1ForkPoolWithoutPidfdGetfd: where pidfd_getfd is missing (kernels before 5.6)
// or forbidden (a seccomp filter: Docker's default allows it only with
// CAP_SYS_PTRACE), or close_range is (kernels before 5.9), a thread that forks into a
// v1 group (a pool thread, or one moved there: pool=0) keeps the process's descriptor
// table and starts still succeed, born in their group, with their output.
func TestV1ForkPoolWithoutPidfdGetfd(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the filter is written for amd64")
	}
	for _, c := range []struct {
		name  string
		nr    uintptr
		errno unix.Errno
	}{{"pidfd_getfd/ENOSYS", unix.SYS_PIDFD_GETFD, unix.ENOSYS}, {"pidfd_getfd/EPERM", unix.SYS_PIDFD_GETFD, unix.EPERM},
		{"close_range/ENOSYS", unix.SYS_CLOSE_RANGE, unix.ENOSYS}, {"close_range/EPERM", unix.SYS_CLOSE_RANGE, unix.EPERM}} {
		for _, size := range []int{1, 0} {
			t.Run(c.name+"/pool="+itoa(size), func(t *testing.T) { startWithout(t, size, c.name, c.nr, c.errno) })
		}
	}
}

func startWithout(t *testing.T, size int, name string, nr uintptr, errno unix.Errno) {
	m := v1Root(t)
	var logged testkit.Buffer
	m.log = slog.New(slog.NewTextHandler(&logged, nil))
	m.SetThreadSetup(func() error { return testkit.DenySyscall(nr, errno) })
	p := m.NewForkPool(size)
	defer p.Close()
	// Three starts; every forking thread asks for a table of its own.
	for _, id := range []string{"w", "x", "y"} {
		testkit.Eventually(t, "pool groups", func() bool { return len(poolGroups(m)) == size*len(m.hiers) })
		g, err := p.Create(id, Limits{})
		must(t, err)
		r, w, err := os.Pipe()
		must(t, err)
		cmd := exec.Command("/bin/sh", "-c", "cat /proc/self/cgroup")
		cmd.Stdout = w
		err = g.Start(cmd)
		w.Close()
		if err != nil {
			r.Close()
			t.Fatalf("start without %s: %v", name, err)
		}
		b, err := io.ReadAll(r)
		r.Close()
		must(t, err)
		must(t, cmd.Wait())
		wantBornIn(t, m, b, id, "child")
		must(t, g.Remove())
	}
	// One warning for the process, not one a forking thread.
	if n := strings.Count(logged.String(), "keep the process's descriptor table"); n != 1 {
		t.Errorf("%d warnings that threads keep the process's table, want 1:\n%s", n, logged.String())
	}
}

// TestV1ForkPoolPidFD: a caller that asks for the child's pidfd (SysProcAttr.PidFD)
// gets one numbered in the process's table, which signals the child: a thread with a
// table of its own would hand out a number of its table (nothing, or another
// file, in the process's) and keep that pidfd open there.
func TestV1ForkPoolPidFD(t *testing.T) {
	for _, size := range []int{1, 0} {
		t.Run("pool="+itoa(size), func(t *testing.T) { startPidFD(t, size) })
	}
}

func startPidFD(t *testing.T, size int) {
	m := v1Root(t)
	// As the native nexlet's: a thread moved into a group (pool=0) is not used again,
	// so it forks from a table of its own too.
	m.SetThreadSetup(func() error { return unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
	p := m.NewForkPool(size)
	defer p.Close()
	testkit.Eventually(t, "pool groups", func() bool { return len(poolGroups(m)) == size*len(m.hiers) })
	g, err := p.Create("w", Limits{})
	must(t, err)
	pidfd := -1
	cmd := exec.Command("/bin/sleep", "60")
	cmd.SysProcAttr = &syscall.SysProcAttr{PidFD: &pidfd}
	must(t, g.Start(cmd))
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait(); _ = g.Remove() }()
	if pidfd < 0 {
		t.Fatal("no pidfd")
	}
	defer unix.Close(pidfd)
	if err := unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0); err != nil {
		t.Fatalf("signal through the pidfd %d Start gave: %v", pidfd, err)
	}
	if err := cmd.Wait(); cmd.ProcessState == nil || cmd.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("Wait: %v, %v (want killed by the pidfd's SIGKILL)", cmd.ProcessState, err)
	}
}
