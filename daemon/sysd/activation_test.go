package sysd

import (
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestControlListenerWithoutActivation(t *testing.T) {
	t.Setenv("LISTEN_FDS", "1")
	t.Setenv("LISTEN_PID", "1") // not us: a variable inherited from someone else
	l, err := ControlListener()
	if l != nil || err != nil {
		t.Fatalf("ControlListener for another pid = %v, %v; want nil, nil", l, err)
	}
}

// TestControlListener re-runs the test binary as systemd starts a socket-activated
// service: the socket as fd 3, LISTEN_PID its own pid (sh execs, keeping $$).
func TestControlListener(t *testing.T) {
	if want := os.Getenv("NEXD_TEST_ACTIVATION"); want != "" {
		activatedChild(t, want)
		return
	}
	dir := t.TempDir()
	unixLn, err := net.ListenUnix("unix", &net.UnixAddr{Name: filepath.Join(dir, "nexd.sock"), Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer unixLn.Close()
	tcpLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer tcpLn.Close()
	for name, ln := range map[string]interface{ File() (*os.File, error) }{
		"unix:" + unixLn.Addr().String(): unixLn,
		"error":                          tcpLn.(*net.TCPListener),
	} {
		f, err := ln.File()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("/bin/sh", "-c", `export LISTEN_PID=$$ LISTEN_FDS=1; exec "$0" "$@"`,
			os.Args[0], "-test.run=^TestControlListener$", "-test.v", "-test.count=1")
		cmd.Env = append(os.Environ(), "NEXD_TEST_ACTIVATION="+name)
		cmd.ExtraFiles = []*os.File{f}
		out, err := cmd.CombinedOutput()
		f.Close()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestControlListener") {
			t.Errorf("%s: activated child: %v\n%s", name, err, out)
		}
	}
}

func activatedChild(t *testing.T, want string) {
	l, err := ControlListener()
	if want == "error" {
		if err == nil || !strings.Contains(err.Error(), "want exactly one Unix stream socket") {
			t.Fatalf("TCP socket passed: %v, %v; want an error asking for the Unix control socket", l, err)
		}
		return
	}
	if err != nil || l == nil {
		t.Fatalf("ControlListener: %v, %v", l, err)
	}
	if got := "unix:" + l.Addr().String(); got != want {
		t.Errorf("listener on %s, want %s", got, want)
	}
	for _, k := range []string{"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} {
		if v, ok := os.LookupEnv(k); ok {
			t.Errorf("%s=%s still set: children would see it", k, v)
		}
	}
	// systemd's fd 3 is closed or close-on-exec, and so is the listener's own.
	if flags, err := unix.FcntlInt(3, unix.F_GETFD, 0); err == nil && flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("fd 3 still open and not close-on-exec: children would inherit the socket")
	}
	raw, err := l.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	raw.Control(func(fd uintptr) {
		if flags, err := unix.FcntlInt(fd, unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
			t.Errorf("listener fd %d flags %#x, %v: not close-on-exec", fd, flags, err)
		}
	})
}
