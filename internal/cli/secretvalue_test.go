package cli

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestSecretSetPromptWithoutEcho: `nexctl secret set NS KEY` on a terminal (a real
// pseudo-terminal, nexctl's controlling one) asks for the value with the echo off, so
// it shows neither in the command line nor on the screen, and gives the terminal its
// echo back, also when Ctrl+C ends the prompt.
func TestSecretSetPromptWithoutEcho(t *testing.T) {
	bin := buildNexctl(t)
	b := &localBackend{secrets: map[string]string{}}
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	serveControl(t, sock, b)

	const secret = "pty-s3cret-value"
	screen, code, echo := onTerminal(t, bin, sock, "PW", func(master *os.File, screen func() string) {
		testkit.Eventually(t, "the prompt", func() bool { return strings.Contains(screen(), "Value of secret default/PW (not shown): ") })
		if _, err := master.WriteString(secret + "\n"); err != nil {
			t.Fatal(err)
		}
	})
	if code != 0 || !strings.Contains(screen, "Secret default/PW set") {
		t.Fatalf("secret set at the prompt: exit %d, terminal:\n%s", code, screen)
	}
	if strings.Contains(screen, secret) {
		t.Errorf("the value was echoed on the terminal:\n%s", screen)
	}
	if !echo {
		t.Errorf("the terminal's echo was left off")
	}
	b.mu.Lock()
	got := b.secrets["default/PW"]
	b.mu.Unlock()
	if got != secret {
		t.Errorf("secret stored as %q, want %q", got, secret)
	}

	// Ctrl+C at the prompt: nothing is set, the echo comes back.
	screen, code, echo = onTerminal(t, bin, sock, "INT", func(master *os.File, screen func() string) {
		testkit.Eventually(t, "the prompt", func() bool { return strings.Contains(screen(), "Value of secret default/INT") })
		if _, err := master.WriteString("half\x03"); err != nil {
			t.Fatal(err)
		}
	})
	if code == 0 || !echo {
		t.Errorf("Ctrl+C at the prompt: exit %d, echo on afterwards %t; want a failure and the echo back:\n%s", code, echo, screen)
	}
	b.mu.Lock()
	_, set := b.secrets["default/INT"]
	b.mu.Unlock()
	if set {
		t.Errorf("a secret was set from an interrupted prompt")
	}
}

// onTerminal runs `nexctl secret set default KEY` with a new pseudo-terminal as its
// controlling terminal, stdin and stderr; type plays the user at the terminal's other
// end. It returns what the terminal showed, nexctl's exit code and whether the
// terminal echoes once nexctl is gone.
func onTerminal(t *testing.T, bin, sock, key string, typeIn func(master *os.File, screen func() string)) (string, int, bool) {
	t.Helper()
	master, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals: %v", err)
	}
	defer master.Close()
	if err := unix.IoctlSetPointerInt(int(master.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Fatal(err)
	}
	n, err := unix.IoctlGetInt(int(master.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Fatal(err)
	}
	slave, err := os.OpenFile("/dev/pts/"+strconv.Itoa(n), os.O_RDWR|syscall.O_NOCTTY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer slave.Close() // again: a no-op on the way out
	var mu sync.Mutex
	var shown bytes.Buffer
	read := make(chan struct{})
	go func() {
		defer close(read)
		buf := make([]byte, 1024)
		for {
			n, err := master.Read(buf)
			mu.Lock()
			shown.Write(buf[:n])
			mu.Unlock()
			if err != nil {
				return
			}
		}
	}()
	screen := func() string { mu.Lock(); defer mu.Unlock(); return shown.String() }
	cmd := exec.Command(bin, "--control-socket", sock, "secret", "set", "default", key)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	typeIn(master, screen)
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Errorf("nexctl still running 60 s after the input:\n%s", screen())
	}
	tio, err := unix.IoctlGetTermios(int(slave.Fd()), unix.TCGETS)
	if err != nil {
		t.Fatal(err)
	}
	// With the last slave end closed the master reads the rest, then EIO.
	slave.Close()
	<-read
	return screen(), cmd.ProcessState.ExitCode(), tio.Lflag&unix.ECHO != 0
}
