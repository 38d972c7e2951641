package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// startActivated runs the real nexd as systemd does for nexd.socket: the listening
// socket as fd 3, LISTEN_FDS=1 and LISTEN_PID set to nexd's own pid (sh sets it to
// $$ and execs nexd, which keeps the pid).
func startActivated(t *testing.T, sock *os.File, args []string) *proc {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("/bin/sh", append([]string{"-c",
		`export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=nexd.socket; exec "$0" "$@"`, nexdBin(t)}, args...)...)
	cmd.Dir = dir
	cmd.Env = []string{"HOME=" + dir, "PATH=" + os.Getenv("PATH")}
	cmd.ExtraFiles = []*os.File{sock}
	return startProc(t, cmd)
}

// TestSocketActivation: nexd serves the control socket systemd passes it, applies
// the configured mode, hands it to no child, and leaves it in place when it exits,
// so a client that connects while nexd restarts is answered by the next nexd.
func TestSocketActivation(t *testing.T) {
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	path := filepath.Join(t.TempDir(), "nexd.sock")
	ln := testkit.ActivationSocket(t, path)
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}
	sock, err := ln.File() // systemd's copy, kept across nexd restarts
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	var st syscall.Stat_t
	if err := syscall.Fstat(int(sock.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	sockLink := fmt.Sprintf("socket:[%d]", st.Ino)

	args := []string{"--state-dir", t.TempDir(), "--control-socket", path, "--node-name", "e2e",
		"--startup-timeout", "60s", "--nats.servers", s.ClientURL()}
	if cg := cgroupRoot(t); cg != "" {
		args = append(args, "--cgroup-root", cg)
	}
	status := func(p *proc) (control.Status, bool) {
		select {
		case <-p.done:
			t.Fatalf("nexd exited: %v\n%s", p.err, p.out.String())
		default:
		}
		out, _, code := run(t, nil, nexctlBin(t), "--control-socket", path, "status", "--json")
		var cs control.Status
		if code != 0 || json.Unmarshal([]byte(out), &cs) != nil {
			return cs, false
		}
		return cs, true
	}

	p1 := startActivated(t, sock, args)
	testkit.EventuallyWithin(t, 90*time.Second, "first nexd running on systemd's socket", func() bool {
		cs, ok := status(p1)
		return ok && cs.State == "running"
	})
	if !strings.Contains(p1.out.String(), "socket_activated=true") {
		t.Errorf("nexd did not log serving a socket-activated control socket:\n%s", p1.out.String())
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm() != 0o666 {
		t.Errorf("socket mode %v (%v), want 0666 for the default control_allow_others=status", fi.Mode().Perm(), err)
	}
	// No child (the native nexlet) holds systemd's socket or sees LISTEN_*.
	children := childPIDs(t, p1.cmd.Process.Pid)
	if len(children) == 0 {
		t.Fatal("nexd has no children; expected the native nexlet")
	}
	for _, pid := range children {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, fd := range fds {
			if l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); l == sockLink {
				t.Errorf("child %d inherited the control socket as fd %s", pid, fd.Name())
			}
		}
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if strings.Contains(string(env), "LISTEN_") {
			t.Errorf("child %d inherited LISTEN_* variables", pid)
		}
	}

	// Restart: between the two nexds the socket stays and connections queue.
	p1.signal(t, syscall.SIGTERM)
	if code := p1.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("the first nexd exited %d on SIGTERM", code)
	}
	if _, err := os.Stat(path); err != nil {
		t.Fatalf("nexd removed systemd's socket on exit: %v", err)
	}
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("connect while no nexd runs: %v", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("GET /v1/status HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	viaCtl := make(chan int, 1)
	go func() {
		_, _, code := run(t, nil, nexctlBin(t), "--control-socket", path, "status")
		viaCtl <- code
	}()

	p2 := startActivated(t, sock, args)
	conn.SetReadDeadline(time.Now().Add(90 * time.Second))
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "HTTP/1.0 200") {
		t.Fatalf("request queued during the restart: %q, %v; want HTTP/1.0 200 from the next nexd", line, err)
	}
	if code := <-viaCtl; code != 0 {
		t.Errorf("nexctl status during the restart exited %d, want 0", code)
	}
	testkit.EventuallyWithin(t, 90*time.Second, "second nexd running", func() bool {
		cs, ok := status(p2)
		return ok && cs.State == "running"
	})
}

// childPIDs lists pid's direct children.
func childPIDs(t *testing.T, pid int) []int {
	t.Helper()
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	if err != nil {
		t.Fatal(err)
	}
	var out []int
	for _, f := range tasks {
		b, _ := os.ReadFile(f)
		for _, s := range strings.Fields(string(b)) {
			var c int
			if _, err := fmt.Sscan(s, &c); err == nil {
				out = append(out, c)
			}
		}
	}
	return out
}

// TestStatusAcrossActivatedRestarts: under socket activation no status call fails while
// nexd restarts. Clients call status without pause while the real nexd is stopped with
// SIGTERM and the next one started on systemd's socket, several times: a call is
// answered by the nexd that accepted it or, queued on the socket, by the next. Before
// the control server's drain, a request read just after the stop began was dropped
// unanswered (EOF), as `systemctl restart nexd` showed in the nspawn suite. Some
// clients are plain HTTP clients, which never ask again (nexctl asks a dropped GET
// again, so through it alone the test would pass without the drain).
func TestStatusAcrossActivatedRestarts(t *testing.T) {
	t.Parallel()
	activatedRestarts(t, 6, nil, true, func(p *proc) {
		p.cmd.Process.Signal(syscall.SIGTERM)
		if code := p.wait(t, 60*time.Second); code != 0 {
			t.Fatalf("nexd exited %d on SIGTERM", code)
		}
	})
}

// TestStatusAcrossActivatedCrash: nexd killed (kill -9, as a crash or a watchdog abort
// would) while clients call status, with live_restore as packaged: the calls it had
// accepted and not answered are dropped with it, and the client asks again, which
// waits on systemd's socket for the next nexd. No status call fails.
func TestStatusAcrossActivatedCrash(t *testing.T) {
	t.Parallel()
	state := t.TempDir()
	t.Cleanup(func() { // the last nexd leaves its native nexlet (live_restore)
		if r, ok := supervise.ReadRecord(filepath.Join(state, "nexlets"), "native"); ok {
			_ = syscall.Kill(r.PID, syscall.SIGKILL)
		}
	})
	activatedRestarts(t, 4, []string{"--state-dir", state, "--state", "kv", "--live-restore"}, false, func(p *proc) {
		p.cmd.Process.Kill()
		p.wait(t, 30*time.Second)
	})
}

// activatedRestarts runs the real nexd on a systemd-style socket, ends it with end and
// starts the next one, restarts times, while clients call status without pause (a
// fresh connection each, as each nexctl is, plus the real nexctl in a loop; with plain,
// half of them are plain HTTP clients, which never ask again). No call may fail.
func activatedRestarts(t *testing.T, restarts int, extra []string, plain bool, end func(*proc)) {
	s := testnats.Start(t, testnats.Options{})
	path := filepath.Join(t.TempDir(), "nexd.sock")
	ln := testkit.ActivationSocket(t, path)
	sock, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sock.Close() })
	args := append([]string{"--control-socket", path, "--node-name", "e2e",
		"--startup-timeout", "60s", "--nats.servers", s.ClientURL()}, extra...)
	if !slices.Contains(extra, "--state-dir") {
		args = append(args, "--state-dir", t.TempDir())
	}
	if cg := cgroupRoot(t); cg != "" {
		args = append(args, "--cgroup-root", cg)
	}
	running := func(st control.Status) bool { return st.State == "running" }

	p := startActivated(t, sock, args)
	waitStatus(t, p, path, 90*time.Second, "the first nexd running on systemd's socket", running)

	var (
		mu       sync.Mutex
		calls    int
		failures []string
	)
	record := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		if err != nil {
			failures = append(failures, err.Error())
		}
	}
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	var wg sync.WaitGroup
	for i := range 6 {
		wg.Go(func() {
			for !stopped() {
				ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
				var err error
				if plain && i%2 == 1 {
					err = plainStatus(ctx, path)
				} else {
					c := control.NewClient(path)
					_, err = c.Status(ctx)
					c.Close()
				}
				cancel()
				record(err)
			}
		})
	}
	wg.Go(func() {
		for !stopped() {
			_, se, code, err := runIn(t.TempDir(), nil, nexctlBin(t), "--control-socket", path, "status")
			if err == nil && code != 0 {
				err = fmt.Errorf("nexctl status exited %d: %s", code, strings.TrimSpace(se))
			}
			record(err)
		}
	})

	for i := range restarts {
		time.Sleep(300 * time.Millisecond) // calls answered by a running nexd too
		end(p)
		p = startActivated(t, sock, args)
		waitStatus(t, p, path, 90*time.Second, fmt.Sprintf("nexd %d running on systemd's socket", i+2), running)
	}
	close(stop)
	wg.Wait()
	t.Logf("%d status calls across %d restarts", calls, restarts)
	if len(failures) > 0 {
		t.Errorf("%d of %d status calls failed across %d restarts; first: %s",
			len(failures), calls, restarts, strings.Join(failures[:min(len(failures), 3)], " | "))
	}
}

// plainStatus GETs /v1/status over the socket with a plain HTTP client (curl, a
// metrics scraper), which never asks again when the connection closes unanswered.
func plainStatus(ctx context.Context, sock string) error {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://nexd/v1/status", nil)
	if err != nil {
		return err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return fmt.Errorf("plain client: %w", err)
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return fmt.Errorf("plain client: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("plain client: GET /v1/status: %s", resp.Status)
	}
	return nil
}
