package control

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
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

// TestPeerCredentials runs the client as a real unprivileged user created for the test.
func TestPeerCredentials(t *testing.T) {
	g := testkit.NewGroup(t)
	u := testkit.NewUser(t) // g is given per call below, as a supplementary group or not
	uname, gname, tgid := u.Name, g.Name, g.GID

	// A world-traversable directory holding a copy of this test binary and the sockets:
	// the go build cache and t.TempDir() are private to root.
	dir := testkit.PublicDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "helper.test")
	testkit.CopyFile(t, self, bin, 0o755)

	call := func(socket, op string, groups []uint32) string {
		t.Helper()
		cmd := u.Command(bin)
		cmd.Env = []string{helperEnvOp + "=" + op, helperEnvSocket + "=" + socket}
		cmd.SysProcAttr.Credential = u.Credential(groups...)
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
		{"supplementary group member may do everything", AllowNone, []uint32{tgid},
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
