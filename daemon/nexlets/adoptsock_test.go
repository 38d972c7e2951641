package nexlets

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/localchan"
)

// TestAdoptedSocketAdmitsOnlyTheAdoptedProcess: the socket for adopted nexlets, on a
// real Unix socket, with the test process playing the process that connects. Recorded
// as the adopted nexlet (pid and start time), it is admitted and its connection handed
// to the node as that nexlet's. Recorded with another start time (the record of a
// process whose pid this one reused), or with another live process's pid, it is
// refused: closed at once, counted. The socket's directory is made 0700 even when it
// existed with another mode, a killed nexd's socket file is replaced, and Stop removes
// it and waits for the accepting goroutine.
func TestAdoptedSocketAdmitsOnlyTheAdoptedProcess(t *testing.T) {
	dir := t.TempDir()
	if err := os.MkdirAll(filepath.Join(dir, "supervise"), 0o755); err != nil {
		t.Fatal(err)
	}
	path := AdoptedSocketPath(dir)
	if err := os.WriteFile(path, nil, 0o600); err != nil { // a killed nexd's leftover
		t.Fatal(err)
	}
	self, err := procid.Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = other.Process.Kill(); _ = other.Wait() })
	otherID, err := procid.Of(other.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	var refused atomic.Int32
	reg := newRegistry()
	m := &Manager{log: slog.New(slog.DiscardHandler), reg: reg,
		o:         Options{RuntimeDir: dir, OnSocketRefused: func() { refused.Add(1) }},
		specs:     []Spec{{Name: NativeName, AgentID: "A1"}},
		adoptKeys: map[string]string{NativeName: "UKEY"},
		adopted:   map[string]procid.ID{NativeName: self},
		locals:    map[string]*localchan.Client{}}
	m.listenAdopted()
	defer m.stopAdoptedSocket()
	if st, err := os.Stat(filepath.Dir(path)); err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("the socket's directory: %v %v, want 0700", st.Mode(), err)
	}

	// dial connects as the test process; closed reports whether nexd closed the
	// connection within wait (a refusal), and not merely whether it had by then.
	dial := func() net.Conn {
		t.Helper()
		f, _, err := localchan.Dial(t.Context(), path)
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	closed := func(c net.Conn, wait time.Duration) bool {
		_ = c.SetReadDeadline(time.Now().Add(wait))
		_, err := c.Read(make([]byte, 1))
		return errors.Is(err, io.EOF) || err != nil && strings.Contains(err.Error(), "reset")
	}

	// Admitted: handed to the node (waited for: the accepting goroutine may not have
	// run yet on a loaded machine), and then left open.
	c := dial()
	if !testkit.WaitFor(testkit.DefaultWait, func() bool { return reg.adoptedLocal("A1") != "" }) {
		t.Fatalf("the adopted process's connection was not handed to the node within %v", testkit.DefaultWait)
	}
	if got := reg.adoptedLocal("A1"); got != "UKEY" {
		t.Fatalf("the node was handed the adopted nexlet's connection with key %q, want UKEY", got)
	}
	if closed(c, 200*time.Millisecond) {
		t.Fatal("the adopted process was refused")
	}
	for _, rec := range []procid.ID{{PID: self.PID, Start: self.Start + 1}, otherID} {
		m.mu.Lock()
		m.adopted[NativeName] = rec
		m.mu.Unlock()
		if !closed(dial(), testkit.DefaultWait) {
			t.Errorf("recorded as %s, the test process (%s) was admitted", rec, self)
		}
	}
	// Counted before the close that the test has seen.
	if k := refused.Load(); k != 2 {
		t.Errorf("%d refusals counted, want 2", k)
	}
	m.stopAdoptedSocket()
	if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the socket is left after the stop: %v", err)
	}
	if _, _, err := localchan.Dial(context.Background(), path); err == nil {
		t.Error("the socket still accepts after the stop")
	}
}

// TestAdoptedSocketPathTooLong: a runtime directory whose socket path does not fit
// sun_path gets no socket (the adopted nexlet then goes over NATS), not a truncated one.
func TestAdoptedSocketPathTooLong(t *testing.T) {
	if _, err := listenPrivate(filepath.Join(t.TempDir(), strings.Repeat("d", 100), "s.sock"), "unix"); err == nil {
		t.Fatal("listened on a path over sun_path's size")
	}
}
