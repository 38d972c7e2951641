package control

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Environment of the helper process that plays an unprivileged nexctl.
const (
	helperEnvOp     = "NEXD_CONTROL_TEST_OP"
	helperEnvSocket = "NEXD_CONTROL_TEST_SOCKET"
)

func TestMain(m *testing.M) {
	if op := os.Getenv(helperEnvOp); op != "" {
		os.Exit(runHelper(op, os.Getenv(helperEnvSocket)))
	}
	os.Exit(m.Run())
}

// runHelper performs one client call and prints "ok" or "status <code>" / "error <text>".
func runHelper(op, socket string) int {
	c := NewClient(socket)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var err error
	switch op {
	case "status":
		_, err = c.Status(ctx)
	case "reload":
		_, err = c.Reload(ctx)
	case "secrets":
		_, err = c.ListSecrets(ctx, "default")
	default:
		err = fmt.Errorf("unknown op %q", op)
	}
	var ae *APIError
	switch {
	case err == nil:
		fmt.Println("ok")
	case errors.As(err, &ae):
		fmt.Printf("status %d %s\n", ae.Status, ae.Message)
	default:
		fmt.Printf("error %v\n", err)
	}
	return 0
}

func randSuffix(t *testing.T) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v: %s", name, args, err, out)
	}
}

// TestPeerCredentials runs the client as a real unprivileged user created for the test.
func TestPeerCredentials(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create an unprivileged test user with useradd and run a client as it")
	}
	for _, tool := range []string{"useradd", "userdel", "groupadd", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed: cannot create a test user", tool)
		}
	}
	sfx := randSuffix(t)
	uname, gname := "nexd-test-"+sfx, "nexd-tg-"+sfx
	run(t, "groupadd", "-r", gname)
	t.Cleanup(func() { _ = exec.Command("groupdel", gname).Run() })
	run(t, "useradd", "-M", "-r", "-N", "-s", "/usr/sbin/nologin", uname)
	t.Cleanup(func() { _ = exec.Command("userdel", uname).Run() })
	u, err := user.Lookup(uname)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroup(gname)
	if err != nil {
		t.Fatal(err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	pgid, _ := strconv.ParseUint(u.Gid, 10, 32)
	tgid, _ := strconv.ParseUint(g.Gid, 10, 32)

	// A world-traversable directory holding a copy of this test binary and the sockets:
	// the go build cache and t.TempDir() are private to root.
	dir, err := os.MkdirTemp("", "nexd-control-peer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper.test")
	copyFile(t, self, bin, 0o755)

	call := func(socket, op string, groups []uint32) string {
		t.Helper()
		cmd := exec.Command(bin)
		cmd.Env = []string{helperEnvOp + "=" + op, helperEnvSocket + "=" + socket}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(uid), Gid: uint32(pgid), Groups: groups}}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("helper as %s (%s): %v: %s", uname, op, err, out)
		}
		return strings.TrimSpace(string(out))
	}

	tests := []struct {
		name   string
		allow  string
		groups []uint32 // the helper's supplementary groups
		want   map[string]string
	}{
		{"others may read status", AllowStatus, nil,
			map[string]string{"status": "ok", "reload": "status 403", "secrets": "status 403"}},
		{"others may do nothing", AllowNone, nil,
			// With mode 0660 the kernel already refuses the connect.
			map[string]string{"status": "permission denied"}},
		{"supplementary group member may do everything", AllowNone, []uint32{uint32(tgid)},
			map[string]string{"status": "ok", "reload": "ok", "secrets": "ok"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			socket := filepath.Join(dir, fmt.Sprintf("s%d", i), "nexd.sock")
			s, err := Listen(socket, ServerOptions{Backend: newTestBackend(), AllowOthers: tt.allow, Group: gname})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- s.Serve(ctx) }()
			defer func() { cancel(); <-done }()

			fi, err := os.Stat(socket)
			if err != nil {
				t.Fatal(err)
			}
			if st := fi.Sys().(*syscall.Stat_t); st.Gid != uint32(tgid) {
				t.Fatalf("socket group = %d, want %s (%d)", st.Gid, gname, tgid)
			}
			for op, want := range tt.want {
				if got := call(socket, op, tt.groups); !strings.Contains(got, want) {
					t.Errorf("%s as %s (groups %v) = %q, want %q", op, uname, tt.groups, got, want)
				}
			}
		})
	}

	// And with the socket opened up, AllowNone still refuses others by their credentials.
	socket := filepath.Join(dir, "open", "nexd.sock")
	s, err := Listen(socket, ServerOptions{Backend: newTestBackend(), AllowOthers: AllowNone, Group: gname})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(socket, 0o666); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	defer func() { cancel(); <-done }()
	if got := call(socket, "status", nil); !strings.Contains(got, "status 403") {
		t.Errorf("status as %s with AllowNone on a 0666 socket = %q, want 403", uname, got)
	}
}

func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, mode)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
