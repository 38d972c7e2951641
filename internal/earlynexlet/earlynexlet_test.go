package earlynexlet

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestWanted(t *testing.T) {
	cases := []struct {
		args []string
		env  map[string]string
		want bool
	}{
		{nil, nil, true},
		{[]string{"--config", "/etc/nex/config.json"}, nil, true},
		{[]string{"node", "up", "--nats.url", "nats://x"}, nil, true},
		{[]string{"nexlet", "native"}, nil, false},
		{[]string{"version"}, nil, false},
		{[]string{"help"}, nil, false},
		{[]string{"--version"}, nil, false},
		{[]string{"--check", "--config", "c.json"}, nil, false},
		{[]string{"--check=true"}, nil, false},
		{[]string{"-h"}, nil, false},
		{[]string{"--", "--help"}, nil, true},
		{nil, map[string]string{EnvPrestart: "off"}, false},
		{nil, map[string]string{EnvPrestart: "on"}, true},
		{nil, map[string]string{"NEXD_HANDOVER_FD": "3"}, false},
		{nil, map[string]string{"NEXD_DIRLOCK_FDS": "3,4"}, false},
	}
	for _, c := range cases {
		if got := Wanted(c.args, func(k string) string { return c.env[k] }); got != c.want {
			t.Errorf("Wanted(%q, %v) = %v, want %v", c.args, c.env, got, c.want)
		}
	}
}

func TestRuntimeEnv(t *testing.T) {
	env := map[string]string{"GODEBUG": "inittrace=1"}
	if got := RuntimeEnv(func(k string) string { return env[k] }); len(got) != 0 {
		t.Errorf("GODEBUG without a profile directory: %v, want nothing passed on", got)
	}
	env[envProfileDir] = "/tmp/prof"
	if got := RuntimeEnv(func(k string) string { return env[k] }); len(got) != 1 || got["GODEBUG"] != "inittrace=1" {
		t.Errorf("with a profile directory: %v, want GODEBUG", got)
	}
}

// TestStartGivesWhatAPrestartGives: the process gets /dev/null on 0 and 1, this
// process's stderr on 2, its end of a SOCK_SEQPACKET pair on 3 and nothing else (an
// inherited descriptor without close-on-exec stays out), EnvHandoff and the given
// variables only, a process group of its own; Discard kills and reaps it, once.
func TestStartGivesWhatAPrestartGives(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	if _, err := fcntlClearCloexec(int(w.Fd())); err != nil { // as if inherited
		t.Fatal(err)
	}
	p, err := Start("/bin/sleep", []string{"60"}, map[string]string{"GOMEMLIMIT": "1000000"})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Discard()
	// Start returns once the exec closed the close-on-exec descriptors, before the
	// kernel lays out the new environment (environ reads empty until then) and before
	// the dynamic loader has closed the libraries it opens: look once sleep runs. A
	// descriptor leaked to it stays for good.
	var names []string
	var env []byte
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p.Pid))
		if err != nil {
			t.Fatal(err)
		}
		names = names[:0]
		for _, e := range fds {
			names = append(names, e.Name())
		}
		env, _ = os.ReadFile(fmt.Sprintf("/proc/%d/environ", p.Pid))
		if strings.Join(names, ",") == "0,1,2,3" && len(env) > 0 {
			break
		}
	}
	if strings.Join(names, ",") != "0,1,2,3" {
		t.Errorf("descriptors %v, want 0-3 only", names)
	}
	for fd, want := range map[int]string{0: "/dev/null", 1: "/dev/null", 3: "socket:"} {
		got, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%d", p.Pid, fd))
		if !strings.HasPrefix(got, want) {
			t.Errorf("descriptor %d is %q, want %s", fd, got, want)
		}
	}
	own, _ := os.Readlink("/proc/self/fd/2")
	if got, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/2", p.Pid)); got != own {
		t.Errorf("stderr %q, want ours %q", got, own)
	}
	if string(env) != "GOMEMLIMIT=1000000\x00"+EnvHandoff+"=3\x00" {
		t.Errorf("environment %q", env)
	}
	if pgid, _ := syscall.Getpgid(p.Pid); pgid != p.Pid {
		t.Errorf("process group %d, want its own (%d)", pgid, p.Pid)
	}
	if so, err := syscall.GetsockoptInt(int(p.Pair.Fd()), syscall.SOL_SOCKET, syscall.SO_TYPE); err != nil || so != syscall.SOCK_SEQPACKET {
		t.Errorf("pair type %d (%v), want SOCK_SEQPACKET", so, err)
	}
	p.Discard()
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.Pid)); !os.IsNotExist(err) {
		t.Errorf("after Discard /proc/%d: %v, want it gone (killed and reaped)", p.Pid, err)
	}
	p.Discard() // a second is a no-op
}

func fcntlClearCloexec(fd int) (int, error) {
	r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_SETFD, 0)
	if errno != 0 {
		return 0, errno
	}
	return int(r), nil
}

// TestDiscardWaitsForWarm: while Warm's function runs, the pid it was given stays the
// process's: Discard kills the process but reaps it only once the function returned,
// so the function never acts on a pid freed for another process (daemon's cgroup
// warm-up moves it). Without the wait Discard reaped it at once.
func TestDiscardWaitsForWarm(t *testing.T) {
	p, err := Start("/bin/sleep", []string{"60"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	p.Warm(func(pid int) error {
		if pid != p.Pid {
			t.Errorf("warm-up given pid %d, want %d", pid, p.Pid)
		}
		close(entered)
		<-release
		return nil
	})
	<-entered
	var releaseOnce sync.Once
	free := func() { releaseOnce.Do(func() { close(release) }) }
	defer free()
	discarded := make(chan struct{})
	go func() { defer close(discarded); p.Discard() }()
	// Killed: a zombie, not reaped while the warm-up runs.
	for deadline := time.Now().Add(10 * time.Second); procState(p.Pid) != "Z"; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("pid %d state %q after Discard's kill, want a zombie kept for the warm-up", p.Pid, procState(p.Pid))
		}
	}
	select {
	case <-discarded:
		t.Fatal("Discard returned while the warm-up ran")
	default:
	}
	free()
	<-discarded
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", p.Pid)); !os.IsNotExist(err) {
		t.Errorf("after Discard /proc/%d: %v, want it reaped", p.Pid, err)
	}
	<-p.Warmed()
}

// procState is the state letter of /proc/<pid>/stat ("" when pid is gone).
func procState(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	if !ok || rest == "" {
		return ""
	}
	return rest[:1]
}
