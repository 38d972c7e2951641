package dirlock

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// A helper process: holds the lock given in the environment, says so, then either
// waits to be killed or execs sleep (the re-exec of a holder).
func TestMain(m *testing.M) {
	if p := os.Getenv("DIRLOCK_TEST_SQUAT"); p != "" {
		// A local user's process: opens what it may read (no write needed) and flocks it.
		f, err := os.Open(p)
		if err == nil {
			err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		}
		if err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		if os.Getenv("DIRLOCK_TEST_SQUAT_HANDOFF") != "" {
			// Hands the flocked descriptor to a child and exits: /proc/locks still
			// names this pid, which is gone (or, later, another process's).
			c := exec.Command("/bin/sleep", "600")
			c.ExtraFiles = []*os.File{f}
			if err := c.Start(); err != nil {
				os.Stdout.WriteString("error: " + err.Error() + "\n")
				os.Exit(1)
			}
			os.Stdout.WriteString("held\n")
			os.Stdout.WriteString(strconv.Itoa(c.Process.Pid) + "\n")
			os.Exit(0)
		}
		os.Stdout.WriteString("held\n")
		time.Sleep(10 * time.Minute)
		os.Exit(0)
	}
	if fd := os.Getenv("DIRLOCK_TEST_INHERIT"); fd != "" {
		n, _ := strconv.Atoi(fd)
		if _, err := Inherit(n, os.Getenv("DIRLOCK_TEST_HOLD"), "test.lock", 0o700); err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("inherited\n")
		time.Sleep(10 * time.Minute)
		os.Exit(0)
	}
	if dir := os.Getenv("DIRLOCK_TEST_HOLD"); dir != "" {
		l, err := Hold(dir, "test.lock", 0o700)
		if err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("held\n")
		if os.Getenv("DIRLOCK_TEST_KEEP") != "" {
			// Re-execute itself keeping the lock, as nexd's re-exec does.
			fd, err := l.KeepAcrossExec()
			if err == nil {
				time.Sleep(50 * time.Millisecond) // the test tries to take it meanwhile
				err = syscall.Exec(os.Args[0], os.Args, append(os.Environ(), "DIRLOCK_TEST_INHERIT="+strconv.Itoa(fd)))
			}
			os.Stdout.WriteString("exec: " + err.Error() + "\n")
			os.Exit(1)
		}
		if os.Getenv("DIRLOCK_TEST_EXEC") != "" {
			err := syscall.Exec("/bin/sleep", []string{"sleep", "600"}, nil)
			os.Stdout.WriteString("exec: " + err.Error() + "\n")
			os.Exit(1)
		}
		time.Sleep(10 * time.Minute)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// startHolder starts a helper process that holds dir's lock.
func startHolder(t *testing.T, dir string, reexec bool) *exec.Cmd {
	t.Helper()
	cmd, _ := startHolderEnv(t, dir, map[bool]string{true: "DIRLOCK_TEST_EXEC=1"}[reexec])
	return cmd
}

// startHolderEnv is startHolder with env added (if not empty); it returns the
// helper's output after its "held" line.
func startHolderEnv(t *testing.T, dir, env string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DIRLOCK_TEST_HOLD="+dir)
	if env != "" {
		cmd.Env = append(cmd.Env, env)
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	return cmd, waitHeld(t, cmd)
}

// waitHeld starts cmd (this binary as a TestMain helper), ends it with the test, and
// waits for its "held" line; it returns the rest of its output.
func waitHeld(t *testing.T, cmd *exec.Cmd) *bufio.Reader {
	t.Helper()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := bufio.NewReader(out)
	if line, err := r.ReadString('\n'); line != "held\n" {
		t.Fatalf("helper %v: %q %v", cmd.Args, line, err)
	}
	return r
}

func TestHeldByAnotherProcessUntilItDies(t *testing.T) {
	dir := t.TempDir()
	cmd := startHolder(t, dir, false)
	_, err := Hold(dir, "test.lock", 0o700)
	if !errors.Is(err, ErrHeld) || !strings.Contains(err.Error(), dir) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(cmd.Process.Pid)) {
		t.Fatalf("Hold while another process holds it: %v; want ErrHeld naming %s and pid %d", err, dir, cmd.Process.Pid)
	}
	// A holder killed -9 never blocks its successor.
	cmd.Process.Kill()
	cmd.Wait()
	l, err := Hold(dir, "test.lock", 0o700)
	if err != nil {
		t.Fatalf("Hold after the holder died: %v", err)
	}
	// Within one process too, a second hold is refused until the first lets go.
	if _, err := Hold(dir, "test.lock", 0o700); !errors.Is(err, ErrHeld) {
		t.Fatalf("second Hold in the same process: %v, want ErrHeld", err)
	}
	l.Release()
	l2, err := Hold(dir, "test.lock", 0o700)
	if err != nil {
		t.Fatalf("Hold after release: %v", err)
	}
	l2.Release()
}

// A holder that re-executes lets go at the execve: the new image can take it again.
func TestReleasedAtExec(t *testing.T) {
	dir := t.TempDir()
	startHolder(t, dir, true)
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		var l *Lock
		if l, err = Hold(dir, "test.lock", 0o700); err == nil {
			l.Release()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("still held after the holder exec'd sleep: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestMakesTheDirectory(t *testing.T) {
	dir := t.TempDir() + "/a/b"
	l, err := Hold(dir, "x.lock", 0o711)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Fatalf("dir not made: %v", err)
	}
	if b, _ := os.ReadFile(dir + "/x.lock"); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file says %q, want this pid", b)
	}
}

// TestKeptAcrossExec: a holder that re-executes itself keeping the lock
// (KeepAcrossExec, then Inherit in the new image) holds it throughout: no other
// process can take it between the two images (nexd's re-exec: a second nexd taking
// the dir there adopted the first's nexlets and made the re-executed one exit).
func TestKeptAcrossExec(t *testing.T) {
	dir := t.TempDir()
	cmd, out := startHolderEnv(t, dir, "DIRLOCK_TEST_KEEP=1")
	next := make(chan string, 1)
	go func() {
		line, err := out.ReadString('\n')
		if err != nil {
			line += err.Error()
		}
		next <- line
	}()
	tries := 0
	for done := false; !done; tries++ {
		select {
		case line := <-next:
			if line != "inherited\n" {
				t.Fatalf("the re-executed helper: %q", line)
			}
			done = true
		default:
		}
		if l, err := Hold(dir, "test.lock", 0o700); err == nil {
			l.Release()
			t.Fatalf("taken by another process while its holder re-executed (try %d)", tries+1)
		} else if !errors.Is(err, ErrHeld) || !strings.Contains(err.Error(), "pid "+strconv.Itoa(cmd.Process.Pid)) {
			t.Fatalf("Hold while the holder re-executes: %v; want ErrHeld naming pid %d", err, cmd.Process.Pid)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	l, err := Hold(dir, "test.lock", 0o700)
	if err != nil {
		t.Fatalf("Hold after the re-executed holder died: %v", err)
	}
	l.Release()
}

// TestInheritOtherDescriptor: a descriptor that is not the lock file (a wrong number
// in the environment) is left alone and the lock taken as Hold takes it.
func TestInheritOtherDescriptor(t *testing.T) {
	dir := t.TempDir()
	other, err := os.Create(t.TempDir() + "/other")
	if err != nil {
		t.Fatal(err)
	}
	fd, err := syscall.Dup(int(other.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	other.Close()
	defer syscall.Close(fd)
	l, err := Inherit(fd, dir, "test.lock", 0o700)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if err := syscall.Fstat(fd, &syscall.Stat_t{}); err != nil {
		t.Errorf("the other descriptor %d, not a lock file, was closed: %v", fd, err)
	}
	if _, err := Hold(dir, "test.lock", 0o700); !errors.Is(err, ErrHeld) {
		t.Fatalf("Hold after Inherit took it: %v, want ErrHeld", err)
	}
}

// TestDirectoryItself: with no lock file name the directory itself is locked (a
// cgroup, which holds no files); a kept descriptor of it is taken back by Inherit, and
// Forget closes a directory but leaves any other descriptor alone.
func TestDirectoryItself(t *testing.T) {
	dir := t.TempDir()
	l, err := Hold(dir, "", 0o700)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Hold(dir, "", 0o700); !errors.Is(err, ErrHeld) || !strings.Contains(err.Error(), dir) {
		t.Fatalf("second Hold of the directory: %v, want ErrHeld naming it", err)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 0 {
		t.Fatalf("locking the directory itself wrote %v into it", entries)
	}
	fd, err := l.KeepAcrossExec()
	if err != nil {
		t.Fatal(err)
	}
	l.Release() // the kept descriptor still holds it, as across an execve
	if _, err := Hold(dir, "", 0o700); !errors.Is(err, ErrHeld) {
		t.Fatalf("Hold with the lock kept: %v, want ErrHeld", err)
	}
	l, err = Inherit(fd, dir, "", 0o700)
	if err != nil {
		t.Fatalf("Inherit the kept directory lock: %v", err)
	}
	if _, err := Hold(dir, "", 0o700); !errors.Is(err, ErrHeld) {
		t.Fatalf("Hold after Inherit: %v, want ErrHeld", err)
	}
	l.Release()
	l, err = Hold(dir, "", 0o700)
	if err != nil {
		t.Fatalf("Hold after release: %v", err)
	}
	kept, _ := l.KeepAcrossExec()
	l.Release()
	Forget(kept, "")
	if l, err := Hold(dir, "", 0o700); err != nil {
		t.Fatalf("Hold after Forget: %v", err)
	} else {
		l.Release()
	}
	other, err := os.Create(t.TempDir() + "/other")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	Forget(int(other.Fd()), "")
	if err := syscall.Fstat(int(other.Fd()), &syscall.Stat_t{}); err != nil {
		t.Errorf("Forget closed a descriptor that is no directory: %v", err)
	}
	var nilLock *Lock
	nilLock.Release() // nothing held: no panic
}

// newSquatter makes a real local user and a directory she may enter, with this test
// binary copied there; squat has her flock path (env added to hers) and returns once
// she holds it, with her process and its output.
func newSquatter(t *testing.T) (u *testkit.User, pub string, squat func(path string, env ...string) (*exec.Cmd, *bufio.Reader)) {
	t.Helper()
	u = testkit.NewUser(t)
	pub = testkit.PublicDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := testkit.CopyFile(t, self, filepath.Join(pub, "dirlock.test"), 0o755)
	return u, pub, func(path string, env ...string) (*exec.Cmd, *bufio.Reader) {
		t.Helper()
		cmd := u.Command(bin, "-test.run=^$")
		cmd.Env = append(cmd.Env, append([]string{"DIRLOCK_TEST_SQUAT=" + path}, env...)...)
		return cmd, waitHeld(t, cmd)
	}
}

// TestAttackLocalUserHoldsTheLock: nexd's runtime directory (/run/nex, 0755 as
// packaged) held nexd-runtime.lock 0644, and its cgroup root is a directory others may
// read: a local user outside group nex opened either read-only, flocked it, and every
// nexd start after that failed ("held by another process ... another nexd runs on
// it"), for as long as she liked. A holder that is no nexd (another uid than root's
// and this process's) is now gone past: the lock file is made again, 0600, and held;
// the directory is taken without its lock; Note says so. A holder of root's uid still
// refuses (TestHeldByAnotherProcessUntilItDies).
func TestAttackLocalUserHoldsTheLock(t *testing.T) {
	u, pub, squat := newSquatter(t)

	// The lock file as an older nexd left it: 0644 in a directory others may enter.
	dir := filepath.Join(pub, "run")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	lockFile := filepath.Join(dir, "test.lock")
	if err := os.WriteFile(lockFile, []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	squat(lockFile)
	l, err := Hold(dir, "test.lock", 0o755)
	if err != nil {
		t.Fatalf("Hold with %s (uid %d) flocking the lock file: %v", u.Name, u.UID, err)
	}
	if n := l.Note(); !strings.Contains(n, "uid "+strconv.Itoa(int(u.UID))) || !strings.Contains(n, "replaced") {
		t.Errorf("note %q: want her uid and that the file was replaced", n)
	}
	if fi, err := os.Stat(lockFile); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("lock file after Hold: %v %v, want 0600", fi.Mode(), err)
	}
	// The new file is held: a second Hold (as a second nexd would) is refused.
	if _, err := Hold(dir, "test.lock", 0o755); !errors.Is(err, ErrHeld) {
		t.Errorf("second Hold after the replacement: %v, want ErrHeld", err)
	}
	l.Release()

	// The directory itself (a cgroup root, which holds no file).
	cg := filepath.Join(pub, "cgroup")
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	squat(cg)
	l, err = Hold(cg, "", 0o755)
	if err != nil {
		t.Fatalf("Hold of a directory %s flocks: %v", u.Name, err)
	}
	if n := l.Note(); !strings.Contains(n, "uid "+strconv.Itoa(int(u.UID))) || !strings.Contains(n, "without its lock") {
		t.Errorf("note %q: want her uid and that the lock was not taken", n)
	}
	l.Release()
}

// TestSquattedDirectoryStillExcludes: a directory a local user flocks is gone past
// without its lock; a second Hold (a second nexd on the same cgroup root) is still
// refused, as the first holds the directory open. Before, it went past the same
// squatter too, and two nexds ran on one cgroup root.
func TestSquattedDirectoryStillExcludes(t *testing.T) {
	_, pub, squat := newSquatter(t)
	cg := filepath.Join(pub, "cgroup")
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	squat(cg)
	l, err := Hold(cg, "", 0o755)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Release()
	if l2, err := Hold(cg, "", 0o755); !errors.Is(err, ErrHeld) {
		l2.Release()
		t.Errorf("second Hold of a squatted directory: %v, want ErrHeld", err)
	}
}

// TestAttackSquatterHandsOffItsLock: the local user flocks a directory, hands the
// descriptor to a child and exits, so the pid /proc/locks names is gone (or, later,
// another process's). The child is found by its open descriptor and gone past; before,
// the gone pid could not be told and every Hold was refused for as long as she liked.
func TestAttackSquatterHandsOffItsLock(t *testing.T) {
	u, pub, squat := newSquatter(t)
	cg := filepath.Join(pub, "cgroup")
	if err := os.Mkdir(cg, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd, r := squat(cg, "DIRLOCK_TEST_SQUAT_HANDOFF=1")
	line, _ := r.ReadString('\n')
	child, _ := strconv.Atoi(strings.TrimSpace(line))
	t.Cleanup(func() {
		if child > 0 {
			syscall.Kill(child, syscall.SIGKILL)
		}
	})
	cmd.Wait()
	l, err := Hold(cg, "", 0o755)
	if err != nil {
		t.Fatalf("Hold of a directory whose squatter handed its lock to a child: %v", err)
	}
	if n := l.Note(); !strings.Contains(n, "pid "+strconv.Itoa(child)+" (uid "+strconv.Itoa(int(u.UID))+")") {
		t.Errorf("note %q: want the child, pid %d, uid %d", n, child, u.UID)
	}
	l.Release()
}
