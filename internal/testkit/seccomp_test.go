package testkit

import (
	"errors"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// TestDenySyscall: the filter fails the named call with the errno asked for on the
// filtered thread only; with a flag argument, only calls with a flag fail.
func TestDenySyscall(t *testing.T) {
	if runtime.GOARCH != "amd64" {
		t.Skip("the filter is written for amd64")
	}
	pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
	if err != nil {
		t.Skipf("pidfd_open: %v", err)
	}
	defer unix.Close(pidfd)
	signal := func(flags int) error { return unix.PidfdSendSignal(pidfd, 0, nil, flags) }
	closeRange := func() error { return unix.CloseRange(^uint(0), ^uint(0), 0) } // closes nothing
	if err := closeRange(); err != nil {
		t.Skipf("close_range: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // never unlocked: the filtered thread ends with the goroutine
		if err := DenySyscall(unix.SYS_CLOSE_RANGE, unix.ENOSYS); err != nil {
			t.Errorf("DenySyscall: %v", err)
			return
		}
		if err := DenySyscall(unix.SYS_PIDFD_SEND_SIGNAL, unix.EINVAL, 3); err != nil {
			t.Errorf("DenySyscall with a flag argument: %v", err)
			return
		}
		if err := closeRange(); !errors.Is(err, unix.ENOSYS) {
			t.Errorf("close_range under the filter = %v, want ENOSYS", err)
		}
		if err := signal(0); err != nil {
			t.Errorf("pidfd_send_signal without flags under the filter = %v, want nil", err)
		}
		if err := signal(unix.PIDFD_SIGNAL_PROCESS_GROUP); !errors.Is(err, unix.EINVAL) {
			t.Errorf("pidfd_send_signal with a flag under the filter = %v, want EINVAL", err)
		}
	}()
	<-done
	if err := closeRange(); err != nil {
		t.Errorf("close_range outside the filter, after = %v", err)
	}
	if err := DenySyscall(unix.SYS_CLOSE_RANGE, unix.ENOSYS, 6); err == nil {
		t.Error("DenySyscall took argument index 6")
	}
}
