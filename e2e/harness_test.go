// Package e2e builds the real nexd and nexctl binaries and drives them as a user would:
// a fake NOTIFY_SOCKET stands in for systemd, real nats-servers run in-process, and the
// control socket is a real Unix socket.
package e2e

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

var bins testkit.Binaries

// parallel is how many e2e tests run at once unless -parallel says otherwise. Each
// test has its own nexd, NATS, directories, socket and ports, and spends most of its
// time waiting on processes, so more than GOMAXPROCS (go test's default) pays.
const parallel = 8

// TestMain removes the nexd and nexctl binaries, built once on first use, at the end.
func TestMain(m *testing.M) {
	flag.Parse()
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "test.parallel" })
	if !set {
		_ = flag.Set("test.parallel", strconv.Itoa(parallel))
	}
	os.Exit(bins.Run(m))
}

func nexdBin(t testing.TB) string {
	return bins.Path(t, "github.com/nexd-project/nexd/cmd/nexd")
}

func nexctlBin(t testing.TB) string {
	return bins.Path(t, "github.com/nexd-project/nexd/cmd/nexctl")
}

// notifySocket is a fake systemd: it records every sd_notify datagram.
type notifySocket struct {
	path string
	conn *net.UnixConn
	mu   sync.Mutex
	msgs []string
	at   []time.Time // when each of msgs came
	ch   chan string
}

func newNotifySocket(t *testing.T) *notifySocket {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	ns := &notifySocket{path: path, conn: conn, ch: make(chan string, 1024)}
	go func() {
		buf := make([]byte, 65536)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				close(ns.ch)
				return
			}
			m := string(buf[:n])
			ns.mu.Lock()
			ns.msgs = append(ns.msgs, m)
			ns.at = append(ns.at, time.Now())
			ns.mu.Unlock()
			ns.ch <- m
		}
	}()
	t.Cleanup(func() { conn.Close() })
	return ns
}

// waitFor returns the first datagram (after those already consumed) containing want.
func (n *notifySocket) waitFor(t *testing.T, want string, timeout time.Duration) string {
	t.Helper()
	deadline := time.After(timeout)
	for {
		select {
		case m, ok := <-n.ch:
			if !ok {
				t.Fatalf("notify socket closed while waiting for %q", want)
			}
			if strings.Contains(m, want) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %q notification within %v; got %q", want, timeout, n.all())
		}
	}
}

// timed returns the datagrams so far with when each came.
func (n *notifySocket) timed() ([]string, []time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.msgs...), append([]time.Time(nil), n.at...)
}

func (n *notifySocket) all() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return append([]string(nil), n.msgs...)
}

// proc is a running nexd.
type proc struct {
	cmd  *exec.Cmd
	out  *testkit.Buffer
	done chan struct{}
	err  error
	dir  string
}

type nexdOpts struct {
	args   []string
	env    []string
	notify *notifySocket
	dir    string // working dir; a temp dir when empty
	bin    string // the nexd binary; nexdBin when empty
}

// startNexd runs the real nexd binary with a clean environment (no config files from
// the host: HOME and the working directory are temp dirs).
func startNexd(t testing.TB, o nexdOpts) *proc {
	t.Helper()
	dir := o.dir
	if dir == "" {
		dir = t.TempDir()
	}
	bin := o.bin
	if bin == "" {
		bin = nexdBin(t)
	}
	cmd := exec.Command(bin, o.args...)
	cmd.Dir = dir
	cmd.Env = append([]string{"HOME=" + dir, "PATH=" + os.Getenv("PATH")}, o.env...)
	if o.notify != nil {
		cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+o.notify.path)
	}
	return startProc(t, cmd)
}

// startProc starts a prepared nexd command (its Dir is the node's working directory),
// captures its output, and on cleanup stops it with SIGTERM (SIGKILL after 30 s),
// logging the output when the test failed.
func startProc(t testing.TB, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{out: &testkit.Buffer{}, done: make(chan struct{}), dir: cmd.Dir}
	cmd.Stdout, cmd.Stderr = p.out, p.out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p.cmd = cmd
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		select {
		case <-p.done:
		default:
			cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
			case <-time.After(30 * time.Second):
				cmd.Process.Kill()
				<-p.done
			}
		}
		if t.Failed() {
			t.Logf("nexd output:\n%s", p.out.String())
		}
	})
	return p
}

func (p *proc) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := p.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("signal %v: %v", sig, err)
	}
}

// termWithin sends SIGTERM and returns how long nexd took to exit; past bound it
// fails the test with nexd's goroutine dump (SIGQUIT) and output, saying while what.
func (p *proc) termWithin(t *testing.T, bound time.Duration, while string) time.Duration {
	t.Helper()
	p.signal(t, syscall.SIGTERM)
	start := time.Now()
	select {
	case <-p.done:
	case <-time.After(bound):
		p.signal(t, syscall.SIGQUIT)
		<-p.done
		t.Fatalf("nexd did not exit within %v of SIGTERM %s:\n%s", bound, while, p.out.String())
	}
	return time.Since(start)
}

// wait returns the exit code, failing the test if nexd does not exit in time.
func (p *proc) wait(t *testing.T, timeout time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(timeout):
		t.Fatalf("nexd did not exit within %v", timeout)
	}
	if p.err == nil {
		return 0
	}
	if ee, ok := p.err.(*exec.ExitError); ok {
		return ee.ExitCode()
	}
	t.Fatalf("wait: %v", p.err)
	return -1
}

// run executes a binary to completion and returns stdout, stderr and the exit code.
func run(t testing.TB, env []string, bin string, args ...string) (string, string, int) {
	t.Helper()
	so, se, code, err := runIn(t.TempDir(), env, bin, args...)
	if err != nil {
		t.Fatal(err)
	}
	return so, se, code
}

// runIn is run with dir as HOME and working directory, and without t, for callers
// on other goroutines; err is only for a binary that could not run.
func runIn(dir string, env []string, bin string, args ...string) (string, string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}, env...)
	cmd.Dir = dir
	var so, se bytes.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	err := cmd.Run()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			return "", "", 0, fmt.Errorf("run %s %v: %w", bin, args, err)
		}
		code = ee.ExitCode()
	}
	return so.String(), se.String(), code, nil
}

// logAttr waits for nexd's text log line with message msg and returns the value of
// its attribute key: how a test learns an address nexd bound on port 0.
func (p *proc) logAttr(t *testing.T, msg, key string) string {
	t.Helper()
	re := regexp.MustCompile(`msg="?` + regexp.QuoteMeta(msg) + `"?\s.*\b` + regexp.QuoteMeta(key) + `=("(?:[^"\\]|\\.)*"|\S+)`)
	var val string
	testkit.EventuallyWithin(t, 30*time.Second, "log line "+msg, func() bool {
		m := re.FindStringSubmatch(p.out.String())
		if m == nil {
			return false
		}
		val = m[1]
		if uq, err := strconv.Unquote(val); err == nil {
			val = uq
		}
		return true
	})
	return val
}
