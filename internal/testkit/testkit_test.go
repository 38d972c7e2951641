package testkit

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var bins Binaries

func TestMain(m *testing.M) { os.Exit(bins.Run(m)) }

func TestWaitFor(t *testing.T) {
	n := 0
	if !WaitFor(time.Second, func() bool { n++; return n == 3 }) {
		t.Fatal("condition true on the third poll was not seen")
	}
	start := time.Now()
	if WaitFor(50*time.Millisecond, func() bool { return false }) {
		t.Fatal("a false condition held")
	}
	if d := time.Since(start); d < 50*time.Millisecond {
		t.Fatalf("gave up after %v, before the bound", d)
	}
}

func TestBufferConcurrent(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Go(func() { fmt.Fprintf(&b, "w%d\n", i) })
	}
	wg.Wait()
	for i := range 8 {
		if !b.Contains(fmt.Sprintf("w%d\n", i)) {
			t.Fatalf("missing w%d in %q", i, b.String())
		}
	}
}

func TestWriteFile(t *testing.T) {
	p := WriteFile(t, filepath.Join(t.TempDir(), "a", "b", "f"), "x")
	if b, err := os.ReadFile(p); err != nil || string(b) != "x" {
		t.Fatalf("read back %q, %v", b, err)
	}
	WriteExecutable(t, p, "#!/bin/sh\necho hi\n")
	if out, err := exec.Command(p).Output(); err != nil || string(out) != "hi\n" {
		t.Fatalf("run %s: %q, %v", p, out, err)
	}
}

func TestBinariesBuiltOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a binary")
	}
	const dir = "./testdata/hello"
	var wg sync.WaitGroup
	paths := make([]string, 4)
	for i := range paths {
		wg.Go(func() {
			p, err := bins.path(dir, Race)
			if err != nil {
				t.Error(err)
			}
			paths[i] = p
		})
	}
	wg.Wait()
	for _, p := range paths[1:] {
		if p != paths[0] {
			t.Fatalf("one package built to %v", paths)
		}
	}
	if out, err := exec.Command(paths[0]).CombinedOutput(); err != nil || !strings.Contains(string(out), "hello") {
		t.Fatalf("run: %q, %v", out, err)
	}
}

// A test user really is another uid: it cannot read a root-only file, can read a
// file of its supplementary group, and is gone after the test.
func TestNewUser(t *testing.T) {
	var name string
	t.Run("user", func(t *testing.T) {
		g := NewGroup(t)
		u := NewUser(t, g)
		name = u.Name
		if u.UID == 0 || u.GID == 0 || u.GID == g.GID {
			t.Fatalf("user %+v, group %+v", u, g)
		}
		dir := PublicDir(t)
		private := WriteFile(t, filepath.Join(dir, "private"), "secret")
		if err := os.Chmod(private, 0o600); err != nil {
			t.Fatal(err)
		}
		shared := WriteFile(t, filepath.Join(dir, "shared"), "ok")
		if err := os.Chmod(shared, 0o640); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(shared, 0, int(g.GID)); err != nil {
			t.Fatal(err)
		}
		if out, err := u.Command("cat", private).CombinedOutput(); err == nil {
			t.Fatalf("user %s read a root-only file: %q", u.Name, out)
		}
		if out, err := u.Command("cat", shared).CombinedOutput(); err != nil || string(out) != "ok" {
			t.Fatalf("user %s could not read its group's file: %q, %v", u.Name, out, err)
		}
		cmd := u.Command("id", "-u")
		cmd.SysProcAttr.Credential = u.Credential(u.GID) // without the supplementary group
		if out, err := cmd.Output(); err != nil || strings.TrimSpace(string(out)) != fmt.Sprint(u.UID) {
			t.Fatalf("id -u as %s: %q, %v", u.Name, out, err)
		}
		if cmd.ProcessState.Sys().(syscall.WaitStatus).ExitStatus() != 0 {
			t.Fatal("id failed")
		}
	})
	if name == "" {
		return // skipped
	}
	if err := exec.Command("id", name).Run(); err == nil {
		t.Fatalf("user %s outlived its test", name)
	}
}

func TestStablePortOutsideEphemeralRange(t *testing.T) {
	lo, hi := 32768, 60999
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &lo, &hi)
	}
	for range 20 {
		p := StablePort(t)
		if p >= lo && p <= hi {
			t.Fatalf("port %d inside the ephemeral range %d-%d", p, lo, hi)
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			t.Fatalf("port %d not free: %v", p, err)
		}
		l.Close()
	}
}
