package testkit

import (
	"bufio"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// envLeaderExit turns a copy of the test binary into LeaderExitCommand's process.
const envLeaderExit = "NEXD_TESTKIT_LEADER_EXIT"

// init runs on the process's main thread (the runtime keeps package initialisation
// there), the thread that is to end alone.
func init() {
	if os.Getenv(envLeaderExit) != "1" {
		return
	}
	signal.Ignore(syscall.SIGTERM)
	ready := make(chan struct{})
	go func() {
		runtime.LockOSThread() // a thread of its own, which stays
		close(ready)
		for {
			time.Sleep(time.Hour)
		}
	}()
	<-ready
	_, _ = os.Stdout.WriteString("ready\n")
	// exit(2), not exit_group(2): the main thread ends, the other runs on.
	_, _, _ = syscall.RawSyscall(syscall.SYS_EXIT, 0, 0, 0)
}

// LeaderExitCommand is a copy of the test binary whose main thread exits alone
// (exit(2), not exit_group(2)) while another thread runs on, ignoring SIGTERM: its
// /proc/<pid>/stat and status then say State Z, a zombie, while it still runs code
// (and as its uid). Only SIGKILL, or a signal it does not ignore, to its pid ends it.
// Start it, then LeaderExited.
func LeaderExitCommand() *exec.Cmd {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envLeaderExit+"=1")
	return cmd
}

// LeaderExited waits until the LeaderExitCommand process pid, whose stdout is out,
// said it was ready and its main thread ended, another still running.
func LeaderExited(t testing.TB, pid int, out *bufio.Reader) {
	t.Helper()
	if line, err := out.ReadString('\n'); err != nil || line != "ready\n" {
		t.Fatalf("leader-exit process %d: %q %v", pid, line, err)
	}
	Eventually(t, "the main thread of "+strconv.Itoa(pid)+" ended alone", func() bool {
		n, _ := strconv.Atoi(StatusField(pid, "Threads"))
		return strings.HasPrefix(StatusField(pid, "State"), "Z") && n > 1
	})
}

// StatusField is the value of the line key of /proc/<pid>/status ("" without it, or
// without the process).
func StatusField(pid int, key string) string {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), key+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
