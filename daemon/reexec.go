package daemon

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// reasonReexec is the stop reason of SIGUSR2 and `nexctl node reexec`.
const reasonReexec = "reexec requested"

// listenFDsStart is SD_LISTEN_FDS_START, where socket activation puts the first fd.
const listenFDsStart = 3

// reexec replaces this process with the installed nexd binary (execve: same pid, so
// systemd's MainPID, the child subreaper and every reparented workload stay), with the
// same arguments and environment. Everything else was stopped before, with the
// workloads left running: the new image adopts them from the state directory and the
// exit records, as after a restart with live_restore. ctl, when set, is systemd's
// control socket, handed over as socket activation (fd 3, LISTEN_FDS=1); handoverFD,
// when not -1, the memfd with the state the new image reads first (writeHandover);
// dirLocks, when set, the dir locks kept across (envDirLocks). It returns only when the
// exec failed.
func reexec(ctl *os.File, handoverFD int, dirLocks string) error {
	exe, err := os.Executable() // the path, also when an upgrade replaced the file
	if err != nil {
		return fmt.Errorf("re-exec: find own executable: %w", err)
	}
	env := make([]string, 0, len(os.Environ())+3)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "LISTEN_") && !strings.HasPrefix(kv, envHandover+"=") && !strings.HasPrefix(kv, envDirLocks+"=") {
			env = append(env, kv)
		}
	}
	if ctl != nil && handoverFD == listenFDsStart {
		// fd 3 belongs to the control socket: move the memfd above it (F_DUPFD keeps
		// it open across the exec).
		nfd, err := unix.FcntlInt(uintptr(handoverFD), unix.F_DUPFD, listenFDsStart+1)
		if err != nil {
			return fmt.Errorf("re-exec: move the state handover: %w", err)
		}
		handoverFD = nfd
	}
	if ctl != nil {
		fd := int(ctl.Fd())
		if fd != listenFDsStart {
			// Whatever holds fd 3 now is closed by the exec anyway (close-on-exec).
			if err := unix.Dup3(fd, listenFDsStart, 0); err != nil {
				return fmt.Errorf("re-exec: move the control socket to fd %d: %w", listenFDsStart, err)
			}
		} else if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			return fmt.Errorf("re-exec: keep the control socket open: %w", err)
		}
		env = append(env, "LISTEN_FDS=1", "LISTEN_PID="+strconv.Itoa(os.Getpid()), "LISTEN_FDNAMES=nexd.socket")
	}
	if handoverFD >= 0 {
		env = append(env, envHandover+"="+strconv.Itoa(handoverFD))
	}
	if dirLocks != "" {
		env = append(env, envDirLocks+"="+dirLocks)
	}
	fmt.Fprintf(os.Stderr, "nexd: re-executing %s in place (pid %d)\n", exe, os.Getpid())
	err = syscall.Exec(exe, os.Args, env)
	return fmt.Errorf("re-exec %s: %w", exe, err)
}
