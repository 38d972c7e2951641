package daemon

import (
	"os"

	"github.com/nats-io/nkeys"
)

// warmUp makes, while nexd builds itself (on the other core), what the native nexlet's
// start would otherwise make on the way to READY: the first ed25519 operations and os's
// pidfd check.
func warmUp() {
	warmSignatures()
	warmPidfd()
}

// warmSignatures makes this process's first ed25519 key, signature and verification
// (each builds tables or runs a self-test once per process: 0.4-1.4 ms here) while
// the native nexlet starts, not when its signed registration arrives and nexd's start
// waits on its check.
func warmSignatures() {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return
	}
	sig, err := kp.Sign([]byte("warm"))
	if err != nil {
		return
	}
	_ = kp.Verify([]byte("warm"), sig)
}

// warmPidfd makes os's once-per-process check that pidfds work, which the first
// os.StartProcess would make: it forks a child that exits at once (clone with
// CLONE_PIDFD) and asks pidfd_open, waitid and pidfd_send_signal. That first start is
// the native nexlet's fork, which READY waits for; on a machine where a fork and its
// page faults are dear (a PVM guest: 0.5-1.3 ms for the check) it is done here instead.
// os.FindProcess of this process makes the check and opens a pidfd, closed at once.
func warmPidfd() {
	if p, err := os.FindProcess(os.Getpid()); err == nil {
		_ = p.Release()
	}
}
