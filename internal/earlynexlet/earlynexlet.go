// Package earlynexlet execs nexd's native nexlet from nexd's package initialisation,
// before nexd's main and most of its packages' init have run, so that the second Go
// runtime's start (page faults, mostly, on a PVM guest: docs/performance-notes.md, Ready) overlaps with
// nexd's own. The process waits for its hand-off exactly as one daemon/supervise's
// Prestart makes at main does; daemon turns it into a supervise.Prestarted, or discards
// it when the configuration says it is not wanted.
//
// It imports only what package os does (no strconv, strings or fmt): Go initialises
// the ready package first in import-path order, so a package that waits for more is
// initialised after most of nexd's dependencies (about 10 ms later here).
package earlynexlet

import (
	"errors"
	"os"
	"runtime"
	"slices"
	"syscall"
)

// Names of nexd's environment variables this package reads. daemon keeps its own
// names for them; daemon's tests check they agree.
const (
	// EnvPrestart "off" makes nexd fork its native nexlet when it starts it (no
	// pre-start at all): nexbench ready's A/B switch.
	EnvPrestart = "NEXD_PRESTART"
	// EnvHandoff names the descriptor a pre-started nexlet waits on (supervise.EnvHandoff).
	EnvHandoff = "NEXD_HANDOFF_FD"
	// HandoffFD is that descriptor's number in the pre-started process.
	HandoffFD = 3
	// envProfileDir is profdump.EnvDir: with it set, GODEBUG passes on to the nexlet.
	envProfileDir = "NEXD_PROFILE_DIR"
)

// ReexecEnv are the variables a nexd re-exec'd by the one before it finds set
// (daemon's envHandover and envDirLocks): its nexlet is adopted, never pre-started.
func ReexecEnv() [2]string { return [...]string{"NEXD_HANDOVER_FD", "NEXD_DIRLOCK_FDS"} }

// Process is a native nexlet exec'd ahead, waiting for its hand-off.
type Process struct {
	Pid  int
	Pair *os.File // nexd's end of the hand-off pair (close-on-exec)
	Path string   // what it runs: NativeCommand's
	Args []string
	// Env is its exec environment without EnvHandoff: the variables its runtime
	// read before main.
	Env map[string]string
	// ProcsLimited: nexd's GOMAXPROCS was below the CPU count when it started (a CPU
	// limit on nexd's cgroup, or $GOMAXPROCS), which the process's runtime read too.
	ProcsLimited bool

	discarded bool
	warmed    chan struct{} // closed once Warm's f returned; nil without Warm
}

// Warm runs f(p.Pid) in a goroutine (daemon's cgroup warm-up, README Ready), once.
// Discard waits for it before it reaps p, and so must whoever else reaps p (Warmed):
// until then the pid f is given is p's, alive or a zombie.
func (p *Process) Warm(f func(pid int) error) {
	if p == nil || p.warmed != nil || p.discarded {
		return
	}
	p.warmed = make(chan struct{})
	go func() {
		defer close(p.warmed)
		_ = f(p.Pid)
	}()
}

// Warmed is closed once Warm's f returned; nil when Warm was not called.
func (p *Process) Warmed() <-chan struct{} { return p.warmed }

// Discard kills the process and reaps it, for a nexd that does not use it. Once: a
// second kill could hit another process given the reaped pid.
func (p *Process) Discard() {
	if p == nil || p.discarded {
		return
	}
	p.discarded = true
	p.Pair.Close()
	_ = syscall.Kill(p.Pid, syscall.SIGKILL)
	if p.warmed != nil {
		<-p.warmed // its pid is p's until reaped below
	}
	var ws syscall.WaitStatus
	for {
		if _, err := syscall.Wait4(p.Pid, &ws, 0, nil); !errors.Is(err, syscall.EINTR) {
			return
		}
	}
}

// NativeCommand is the native nexlet's command: this executable, "nexlet native".
func NativeCommand() (path string, args []string, err error) {
	exe, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	return exe, []string{"nexlet", "native"}, nil
}

// Wanted says whether nexd run with args (without the program name) and this
// environment is likely to start a node whose native nexlet may be pre-started: not a
// nexlet, a version, help or --check run, a re-exec, or with EnvPrestart off. A wrong
// yes costs a process that the daemon discards (or that exits when nexd does); a wrong
// no, the pre-start at main instead.
func Wanted(args []string, getenv func(string) string) bool {
	if getenv(EnvPrestart) == "off" {
		return false
	}
	for _, k := range ReexecEnv() {
		if getenv(k) != "" {
			return false
		}
	}
	if len(args) > 0 && slices.Contains([]string{"nexlet", "version", "help"}, args[0]) {
		return false
	}
	for _, a := range args {
		if a == "--" {
			break
		}
		for _, f := range []string{"--check", "--help", "--version", "-h"} {
			if a == f || len(a) > len(f) && a[:len(f)+1] == f+"=" {
				return false
			}
		}
	}
	return true
}

// RuntimeEnv is what a pre-started nexlet's exec environment sets of the variables its
// runtime reads before main, as the nexlet's start will set them when the
// configuration does not (supervise compares them at the hand-off).
func RuntimeEnv(getenv func(string) string) map[string]string {
	env := map[string]string{}
	if getenv(envProfileDir) != "" {
		if g := getenv("GODEBUG"); g != "" {
			env["GODEBUG"] = g
		}
	}
	return env
}

// Start execs path with args and env (plus EnvHandoff) as a nexlet that waits for its
// hand-off on descriptor 3, the other end of a SOCK_SEQPACKET pair. Like a supervised
// start, it first raises RLIMIT_NOFILE and marks inherited descriptors close-on-exec.
// Its stderr is nexd's until the hand-off.
func Start(path string, args []string, env map[string]string) (*Process, error) {
	if err := RaiseNofile(); err != nil {
		return nil, err
	}
	if err := CloseInheritedOnExec(); err != nil {
		return nil, err
	}
	return Fork(path, args, env, os.Stderr)
}

// Fork is Start's exec alone, for callers that raised the limit and marked the
// descriptors themselves: stdin and stdout are /dev/null, stderr is stderr (/dev/null
// when nil) until the hand-off, and the process runs in a process group of its own.
func Fork(path string, args []string, env map[string]string, stderr *os.File) (*Process, error) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_SEQPACKET|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, &os.SyscallError{Syscall: "socketpair", Err: err}
	}
	defer syscall.Close(fds[1])
	null, err := syscall.Open(os.DevNull, syscall.O_RDWR|syscall.O_CLOEXEC, 0)
	if err != nil {
		syscall.Close(fds[0])
		return nil, &os.PathError{Op: "open", Path: os.DevNull, Err: err}
	}
	defer syscall.Close(null)
	errFD := uintptr(null)
	if stderr != nil {
		errFD = stderr.Fd()
	}
	cmdEnv := make([]string, 0, len(env)+1)
	for k, v := range env {
		cmdEnv = append(cmdEnv, k+"="+v)
	}
	cmdEnv = append(cmdEnv, EnvHandoff+"=3") // HandoffFD
	slices.Sort(cmdEnv)
	pid, err := syscall.ForkExec(path, append([]string{path}, args...), &syscall.ProcAttr{
		Env:   cmdEnv,
		Files: []uintptr{uintptr(null), uintptr(null), errFD, uintptr(fds[1])},
		Sys:   &syscall.SysProcAttr{Setpgid: true},
	})
	if stderr != nil {
		runtime.KeepAlive(stderr)
	}
	if err != nil {
		syscall.Close(fds[0])
		return nil, &os.PathError{Op: "fork/exec", Path: path, Err: err}
	}
	return &Process{Pid: pid, Pair: os.NewFile(uintptr(fds[0]), "handoff"), Path: path,
		Args: slices.Clone(args), Env: env, ProcsLimited: runtime.GOMAXPROCS(0) != runtime.NumCPU()}, nil
}

// RaiseNofile sets the soft RLIMIT_NOFILE to the hard one. syscall.Setrlimit (even to
// the current values) also stops Go from restoring the original soft limit in exec'd
// children, so that a nexlet inherits what nexd has.
func RaiseNofile() error {
	var r syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return &os.SyscallError{Syscall: "getrlimit RLIMIT_NOFILE", Err: err}
	}
	r.Cur = r.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &r); err != nil {
		return &os.SyscallError{Syscall: "setrlimit RLIMIT_NOFILE", Err: err}
	}
	return nil
}

const (
	sysCloseRange     = 436 // close_range(2), amd64 and arm64 alike
	closeRangeCloexec = 1 << 2
)

// CloseInheritedOnExec marks every descriptor above stderr close-on-exec: what nexd
// inherited (systemd's, a shell's) must not leak into the processes it starts, which
// get only what they are given.
func CloseInheritedOnExec() error {
	_, _, errno := syscall.Syscall(sysCloseRange, 3, uintptr(^uint32(0)), closeRangeCloexec)
	if errno == 0 {
		return nil
	}
	ents, err := os.ReadDir("/proc/self/fd") // kernels before 5.11
	if err != nil {
		return errors.Join(&os.SyscallError{Syscall: "close_range", Err: errno}, err)
	}
	for _, e := range ents {
		if fd, ok := atoi(e.Name()); ok && fd > 2 {
			syscall.CloseOnExec(fd)
		}
	}
	return nil
}

// atoi parses a descriptor's number (a /proc/self/fd entry).
func atoi(s string) (int, bool) {
	n := 0
	for _, c := range []byte(s) {
		if c < '0' || c > '9' || n > 1<<30 {
			return 0, false
		}
		n = n*10 + int(c-'0')
	}
	return n, s != ""
}
