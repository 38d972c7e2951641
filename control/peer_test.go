package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
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
	helperEnvConns  = "NEXD_CONTROL_TEST_CONNS"
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
	case "hold", "pin":
		return holdConns(op, socket)
	case "bigheader":
		return bigHeader(socket)
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

// holdConns plays a local user (or a workload's dynamic uid) that keeps control
// connections open: "hold" opens them and sends nothing, "pin" sends status requests on
// them without end and never reads an answer. It prints "held N" once N are open and
// stays until its stdin closes.
func holdConns(op, socket string) int {
	n, _ := strconv.Atoi(os.Getenv(helperEnvConns))
	var conns []net.Conn
	for range n {
		c, err := net.Dial("unix", socket)
		if err != nil {
			fmt.Printf("error %v\n", err)
			return 1
		}
		conns = append(conns, c)
		if op == "pin" {
			go func() {
				req := []byte("GET /v1/status HTTP/1.1\r\nHost: nexd\r\n\r\n")
				for {
					if _, err := c.Write(req); err != nil {
						return
					}
				}
			}()
		}
	}
	fmt.Printf("held %d\n", len(conns))
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// bigHeader sends a status request with 512 KiB of headers and prints the answer's
// status line.
func bigHeader(socket string) int {
	c, err := net.Dial("unix", socket)
	if err != nil {
		fmt.Printf("error %v\n", err)
		return 1
	}
	defer c.Close()
	go func() {
		_, _ = c.Write([]byte("GET /v1/status HTTP/1.1\r\nHost: nexd\r\nX-Pad: " + strings.Repeat("x", 512<<10) + "\r\n\r\n"))
	}()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		fmt.Printf("error %v\n", err)
		return 1
	}
	fmt.Print(line)
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

// holders starts, as each of users, a helper that keeps conns control connections to
// socket open (op "hold" or "pin", see holdConns) and waits until each says so. They end
// with the test.
func holders(t *testing.T, bin, socket, op string, conns int, users ...*testkit.User) {
	t.Helper()
	for _, u := range users {
		cmd := u.Command(bin)
		cmd.Env = []string{helperEnvOp + "=" + op, helperEnvSocket + "=" + socket, helperEnvConns + "=" + strconv.Itoa(conns)}
		stdin, err := cmd.StdinPipe()
		if err != nil {
			t.Fatal(err)
		}
		var out testkit.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stdin.Close(); _ = cmd.Process.Kill(); _ = cmd.Wait() })
		want := fmt.Sprintf("held %d", conns)
		testkit.EventuallyWithin(t, 30*time.Second, u.Name+" holds its connections", func() bool { return out.Contains(want) || out.Contains("error") })
		if !out.Contains(want) {
			t.Fatalf("%s as %s: %s", op, u.Name, out.String())
		}
	}
}

// publicServer serves a status-only socket (mode 0666, as packaged) in a directory every
// test user can reach, with a copy of this test binary there for them to run.
func publicServer(t *testing.T, opts ServerOptions) (s *Server, bin string) {
	t.Helper()
	dir := testkit.PublicDir(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	bin = testkit.CopyFile(t, self, filepath.Join(dir, "helper.test"), 0o755)
	opts.Backend, opts.AllowOthers = newTestBackend(), AllowStatus
	s, err = Listen(filepath.Join(dir, "nexd.sock"), opts)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	return s, bin
}

// TestAttackManyUsersLockOutAdmins: the socket is open to every local uid (status), and
// a tenant gets one dynamic uid per workload, each allowed 16 connections. Uids that
// each stay within their own bound filled the bound on all connections, which admins
// counted against too: 64 workloads held 1024 connections and root's nexctl was refused.
// Here the bounds are shrunk (2 a uid, 4 in all) and two real users fill them; root is
// still served, and a third user gets nothing past the shared bound.
func TestAttackManyUsersLockOutAdmins(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	s, bin := publicServer(t, ServerOptions{MaxConns: 4, MaxConnsPerUser: 2})
	holders(t, bin, s.Path(), "hold", 2, testkit.NewUser(t), testkit.NewUser(t))
	c := NewClient(s.Path())
	defer c.Close()
	for i := range 3 {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := c.Status(ctx)
		cancel()
		if err != nil {
			t.Fatalf("root's status %d while other uids hold every connection: %v", i, err)
		}
	}
}

// TestAttackClientThatNeverReadsIsDropped: a local user sends status requests without
// end and reads no answer. The server's writes then block; with no write deadline they
// blocked for good and held the connections (and their goroutines) until nexd stopped.
// Now a non-admin connection whose answer cannot be written within the request timeout
// is closed.
func TestAttackClientThatNeverReadsIsDropped(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	s, bin := publicServer(t, ServerOptions{ReadTimeout: time.Second, MaxConnsPerUser: 4})
	u := testkit.NewUser(t)
	holders(t, bin, s.Path(), "pin", 4, u)
	open := func() int {
		s.lim.mu.Lock()
		defer s.lim.mu.Unlock()
		return s.lim.per[u.UID]
	}
	if !testkit.WaitFor(30*time.Second, func() bool { return open() == 0 }) {
		t.Fatalf("%d connections of a client that never reads still open after 30 s", open())
	}
}

// TestAttackLargeHeadersRefused: request headers are read before the peer is
// authorized, and net/http holds up to its default 1 MiB of them per connection: with
// the dynamic uids of many workloads (16 connections each, 1024 for non-admins in all)
// that is about 1 GiB of nexd's memory for a header timeout at a time. A control
// request needs a few hundred bytes, so more than MaxHeaderBytes is refused (431) as a
// real user sends it; before, 512 KiB of headers were read and answered 200.
func TestAttackLargeHeadersRefused(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	s, bin := publicServer(t, ServerOptions{})
	cmd := testkit.NewUser(t).Command(bin)
	cmd.Env = []string{helperEnvOp + "=bigheader", helperEnvSocket + "=" + s.Path()}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v: %s", err, out)
	}
	if got := strings.TrimSpace(string(out)); !strings.Contains(got, " 431 ") {
		t.Errorf("status with 512 KiB of headers from another user: %q, want 431", got)
	}
}

// TestAttackWorkloadsLockOutLocalUsers: a tenant's workloads each run as a dynamic uid of
// their own, and each uid may hold 16 connections, so 64 workloads held all 1024 that
// non-admins shared and another local user's `nexctl status` was refused. Workloads'
// uids (ServerOptions.WorkloadUIDs) now have a bound of their own. Here the bounds are
// shrunk (2 a uid, 4 a class): two uids of the range (no passwd entry, as a dynamic
// uid has none) fill theirs, a real local user is still served; a third uid of the
// range is not (its class stays bounded).
func TestAttackWorkloadsLockOutLocalUsers(t *testing.T) {
	testkit.RequireUsers(t)
	t.Parallel()
	// Fresh uids for each run (a run's holders may still be on their way out while
	// the next run of the same process starts).
	lo := testkit.UIDs(t, 3)
	rng := [2]uint32{lo, lo + 2}
	s, bin := publicServer(t, ServerOptions{MaxConns: 4, MaxConnsPerUser: 2, WorkloadUIDs: rng})
	workload := func(i uint32) *testkit.User {
		uid := lo + i
		return &testkit.User{Name: fmt.Sprintf("dynamic uid %d", uid), UID: uid, GID: uid}
	}
	// The user is made first: the server drops a holder's silent connections after
	// 10 s (ReadHeaderTimeout), and a useradd under load inside that window let them
	// go before the checks below, which then saw a free bound.
	local := testkit.NewUser(t)
	holders(t, bin, s.Path(), "hold", 2, workload(0), workload(1))
	status := func(u *testkit.User) string {
		t.Helper()
		cmd := u.Command(bin)
		cmd.Env = []string{helperEnvOp + "=status", helperEnvSocket + "=" + s.Path()}
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("status as %s: %v: %s", u.Name, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := status(local); got != "ok" {
		t.Errorf("a local user's status while workloads' uids hold their every connection: %q, want ok", got)
	}
	if got := status(workload(2)); got == "ok" {
		t.Errorf("a third workload uid's status past the workloads' bound: ok, want refused")
	}
}
