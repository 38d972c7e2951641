package testkit

import (
	"fmt"
	"runtime"
	"unsafe"

	"golang.org/x/sys/unix"
)

// DenySyscall installs on the calling thread (and what it forks) a seccomp filter
// that fails system call nr with errno: a kernel without the call (ENOSYS), or a
// service manager's or container's filter that forbids it (EPERM). With flagArg
// (an argument's index, 0 to 5), only calls whose argument flagArg is non-zero in
// its low 32 bits fail: a kernel that knows the call but none of its flags (EINVAL).
//
// The filter stays on the thread for good: the caller runs it on a goroutine of its
// own that has called runtime.LockOSThread and never unlocks, so that the thread ends
// with the goroutine. The filter is written for amd64; elsewhere it installs nothing
// and returns an error (tests skip there).
func DenySyscall(nr uintptr, errno unix.Errno, flagArg ...int) error {
	if runtime.GOARCH != "amd64" {
		return fmt.Errorf("seccomp filter is written for amd64, not %s", runtime.GOARCH)
	}
	if len(flagArg) > 1 || len(flagArg) == 1 && (flagArg[0] < 0 || flagArg[0] > 5) {
		return fmt.Errorf("seccomp filter: flagArg %v, want at most one index from 0 to 5", flagArg)
	}
	deny := []unix.SockFilter{
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ERRNO | uint32(errno)},
		{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW},
	}
	var test []unix.SockFilter
	if len(flagArg) == 1 {
		// struct seccomp_data: nr (4 bytes), arch (4), instruction pointer (8),
		// args (8 each); the low word of an argument comes first on amd64.
		test = []unix.SockFilter{
			{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 16 + uint32(flagArg[0])*8},
			{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: 0, Jt: 1, Jf: 0}, // 0: allow
		}
	}
	// Whatever is not the call on this arch jumps to the final allow.
	toAllow := uint8(len(test) + len(deny) - 1)
	prog := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 4}, // arch
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: unix.AUDIT_ARCH_X86_64, Jt: 0, Jf: toAllow + 2},
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: 0}, // nr
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, K: uint32(nr), Jt: 0, Jf: toAllow},
	}
	prog = append(append(prog, test...), deny...)
	// Unprivileged threads may filter themselves only under no_new_privs.
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("no_new_privs: %w", err)
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if err := unix.Prctl(unix.PR_SET_SECCOMP, unix.SECCOMP_MODE_FILTER, uintptr(unsafe.Pointer(&fprog)), 0, 0); err != nil {
		return fmt.Errorf("seccomp filter: %w", err)
	}
	return nil
}
