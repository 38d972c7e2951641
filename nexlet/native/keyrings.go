package native

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// A uid's kernel keyrings outlive its processes: its user keyring (@u) and user session
// keyring (@us), looked up by uid in the user namespace's register since Linux 5.3, and
// its persistent keyring (kept three days after its last use). A key a workload added
// there was read by the next workload given its dynamic uid, another tenant's maybe,
// which finds them as its own (TestAttackLeftoversOfAReusedUID). A release empties them.

// keyUsers returns the uids of want that own keys (proc's key-users: a uid is listed
// while any key of its exists, so one whose workloads never touched a keyring costs
// nothing more).
func keyUsers(proc string, want map[uint32]bool) []uint32 {
	f, err := os.Open(filepath.Join(proc, "key-users"))
	if err != nil {
		return nil // no keyrings in this kernel
	}
	defer f.Close()
	var uids []uint32
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		s, _, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		if v, err := strconv.ParseUint(strings.TrimSpace(s), 10, 32); err == nil && want[uint32(v)] {
			uids = append(uids, uint32(v))
		}
	}
	return uids
}

// clearKeyrings empties uid's persistent, user and user session keyrings. The
// persistent keyring is root's (the kernel makes it so) and only its possessor may
// change it: the nexlet, root, links it into the thread keyring of a thread of its own
// (KEYCTL_GET_PERSISTENT names another uid's for a caller with CAP_SETUID), empties it
// and unlinks it. keyctl finds the user keyrings only for a caller of that uid, so
// those calls run on that thread, locked to this goroutine, once it took uid as its
// real and effective uid (setresuid by raw system call: the thread's credentials alone,
// where Go's Setresuid changes every thread's), root's kept as saved; it takes root back
// after. No process of uid runs (the release killed them), so none can reach the
// thread meanwhile. A thread that cannot take root back is never unlocked: it ends with
// its goroutine. The kernel makes the whole process non-dumpable at a change of
// credentials; it is made dumpable again once the thread is root's, when it was, so
// that a nexd without CAP_SYS_PTRACE still reads the nexlet's /proc/<pid>/exe
// (TestClearKeyringsKeepsDumpable). A kernel without persistent keyrings, or a filter
// that refuses keyctl (which then refused it the workloads too), is no error.
func clearKeyrings(uid uint32) error {
	dumpable, _ := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		var errs []error
		if id, err := unix.KeyctlInt(unix.KEYCTL_GET_PERSISTENT, int(uid), unix.KEY_SPEC_THREAD_KEYRING, 0, 0); err == nil {
			if _, err := unix.KeyctlInt(unix.KEYCTL_CLEAR, id, 0, 0, 0); err != nil {
				errs = append(errs, fmt.Errorf("clear persistent keyring: %w", err))
			}
			_, _ = unix.KeyctlInt(unix.KEYCTL_UNLINK, id, unix.KEY_SPEC_THREAD_KEYRING, 0, 0)
		} else if !keyctlAbsent(err) {
			errs = append(errs, fmt.Errorf("persistent keyring: %w", err))
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, uintptr(uid), uintptr(uid), 0); e != 0 {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("keyrings of uid %d: %w", uid, errors.Join(append(errs, fmt.Errorf("setresuid: %w", e))...))
			return
		}
		for _, k := range [...]struct {
			id   int
			name string
		}{{unix.KEY_SPEC_USER_KEYRING, "user keyring"}, {unix.KEY_SPEC_USER_SESSION_KEYRING, "user session keyring"}} {
			if _, err := unix.KeyctlInt(unix.KEYCTL_CLEAR, k.id, 0, 0, 0); err != nil && !keyctlAbsent(err) {
				errs = append(errs, fmt.Errorf("clear %s: %w", k.name, err))
			}
		}
		if _, _, e := unix.RawSyscall(unix.SYS_SETRESUID, 0, 0, 0); e != 0 {
			errc <- fmt.Errorf("keyrings of uid %d: %w", uid, errors.Join(append(errs, fmt.Errorf("back to root: %w", e))...))
			return
		}
		runtime.UnlockOSThread()
		if dumpable == 1 {
			_ = unix.Prctl(unix.PR_SET_DUMPABLE, 1, 0, 0, 0)
		}
		if err := errors.Join(errs...); err != nil {
			errc <- fmt.Errorf("keyrings of uid %d: %w", uid, err)
			return
		}
		errc <- nil
	}()
	return <-errc
}

// keyctlAbsent: keyrings, or this keyctl operation, are not there to use.
func keyctlAbsent(err error) bool {
	return errors.Is(err, unix.ENOSYS) || errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EPERM)
}
