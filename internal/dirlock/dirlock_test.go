package dirlock

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A helper process: holds the lock given in the environment, says so, then either
// waits to be killed or execs sleep (the re-exec of a holder).
func TestMain(m *testing.M) {
	if dir := os.Getenv("DIRLOCK_TEST_HOLD"); dir != "" {
		if _, err := Hold(dir, "test.lock", 0o700); err != nil {
			os.Stdout.WriteString("error: " + err.Error() + "\n")
			os.Exit(1)
		}
		os.Stdout.WriteString("held\n")
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
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "DIRLOCK_TEST_HOLD="+dir)
	if reexec {
		cmd.Env = append(cmd.Env, "DIRLOCK_TEST_EXEC=1")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "held\n" {
		t.Fatalf("helper: %q %v", line, err)
	}
	return cmd
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
	release, err := Hold(dir, "test.lock", 0o700)
	if err != nil {
		t.Fatalf("Hold after the holder died: %v", err)
	}
	// Within one process too, a second hold is refused until the first lets go.
	if _, err := Hold(dir, "test.lock", 0o700); !errors.Is(err, ErrHeld) {
		t.Fatalf("second Hold in the same process: %v, want ErrHeld", err)
	}
	release()
	release2, err := Hold(dir, "test.lock", 0o700)
	if err != nil {
		t.Fatalf("Hold after release: %v", err)
	}
	release2()
}

// A holder that re-executes lets go at the execve: the new image can take it again.
func TestReleasedAtExec(t *testing.T) {
	dir := t.TempDir()
	startHolder(t, dir, true)
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for {
		var release func()
		if release, err = Hold(dir, "test.lock", 0o700); err == nil {
			release()
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
	release, err := Hold(dir, "x.lock", 0o711)
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
		t.Fatalf("dir not made: %v", err)
	}
	if b, _ := os.ReadFile(dir + "/x.lock"); strings.TrimSpace(string(b)) != strconv.Itoa(os.Getpid()) {
		t.Fatalf("lock file says %q, want this pid", b)
	}
}
