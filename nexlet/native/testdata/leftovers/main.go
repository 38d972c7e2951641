// Command leftovers is a test workload that plays two tenants sharing a reused dynamic
// uid. "plant <tag> <secret>" leaves the secret where a process's end does not remove
// it: a System V shared memory segment and message queue, a POSIX shared memory file
// (/dev/shm), files in /tmp, /var/tmp and /run/lock (every user's on Debian and
// Ubuntu, 1777, and /run stays writable under nexd.service) and keys in its user and
// persistent keyrings. "steal <tag>" prints "uid <its uid>", reads whatever of those its
// uid can still reach and prints each as "stolen <where> <secret>", then "done".
package main

import (
	"bufio"
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: leftovers plant TAG SECRET | steal TAG")
		os.Exit(2)
	}
	tag := os.Args[2]
	files := []string{"/dev/shm/nexd-left-" + tag, "/tmp/nexd-left-" + tag, "/var/tmp/nexd-left-" + tag, "/run/lock/nexd-left-" + tag}
	switch os.Args[1] {
	case "plant":
		secret := os.Args[3]
		id, err := unix.SysvShmGet(unix.IPC_PRIVATE, 4096, unix.IPC_CREAT|0o600)
		must(err)
		b, err := unix.SysvShmAttach(id, 0, 0)
		must(err)
		copy(b, secret)
		must(unix.SysvShmDetach(b))
		q, _, errno := unix.Syscall(unix.SYS_MSGGET, unix.IPC_PRIVATE, unix.IPC_CREAT|0o600, 0)
		if errno != 0 {
			must(errno)
		}
		msg := append(make([]byte, 8), secret...)
		msg[0] = 1 // mtype
		if _, _, errno := unix.Syscall6(unix.SYS_MSGSND, q, uintptr(unsafe.Pointer(&msg[0])), uintptr(len(secret)), unix.IPC_NOWAIT, 0, 0); errno != 0 {
			must(errno)
		}
		// The uid's user and persistent keyrings (keyctl(2)), which outlive its processes.
		if _, err := unix.AddKey("user", "nexd-left-"+tag, []byte(secret), unix.KEY_SPEC_USER_KEYRING); err != nil {
			fmt.Println("cannot plant a key", err)
		}
		if id, err := unix.KeyctlInt(unix.KEYCTL_GET_PERSISTENT, -1, unix.KEY_SPEC_PROCESS_KEYRING, 0, 0); err == nil {
			if _, err := unix.AddKey("user", "nexd-left-p-"+tag, []byte(secret), id); err != nil {
				fmt.Println("cannot plant a persistent key", err)
			}
		}
		for _, f := range files {
			if err := os.WriteFile(f, []byte(secret), 0o600); err != nil {
				fmt.Println("cannot plant", f, err) // /var/tmp or /run/lock may be absent or read-only
			}
		}
		fmt.Println("planted")
	case "steal":
		me := os.Getuid()
		fmt.Printf("uid %d\n", me)
		for _, id := range owned("/proc/sysvipc/shm", "shmid", me) {
			if b, err := unix.SysvShmAttach(id, 0, unix.SHM_RDONLY); err == nil {
				fmt.Printf("stolen shm %s\n", cstr(b))
				_ = unix.SysvShmDetach(b)
			}
		}
		for _, id := range owned("/proc/sysvipc/msg", "msqid", me) {
			buf := make([]byte, 8+4096)
			n, _, errno := unix.Syscall6(unix.SYS_MSGRCV, uintptr(id), uintptr(unsafe.Pointer(&buf[0])), 4096, 0, unix.IPC_NOWAIT, 0)
			if errno == 0 {
				fmt.Printf("stolen msg %s\n", buf[8:8+n])
			}
		}
		for _, f := range files {
			if b, err := os.ReadFile(f); err == nil {
				fmt.Printf("stolen %s %s\n", f, b)
			}
		}
		rings := []int{unix.KEY_SPEC_USER_KEYRING}
		if id, err := unix.KeyctlInt(unix.KEYCTL_GET_PERSISTENT, -1, unix.KEY_SPEC_PROCESS_KEYRING, 0, 0); err == nil {
			rings = append(rings, id)
		}
		for _, ring := range rings {
			for _, desc := range []string{"nexd-left-" + tag, "nexd-left-p-" + tag} {
				if id, err := unix.KeyctlSearch(ring, "user", desc, 0); err == nil {
					buf := make([]byte, 4096)
					if n, err := unix.KeyctlBuffer(unix.KEYCTL_READ, id, buf, 0); err == nil {
						fmt.Printf("stolen keyring %s %s\n", desc, buf[:min(n, len(buf))])
					}
				}
			}
		}
		fmt.Println("done")
	}
}

// owned lists the ids in a /proc/sysvipc table whose owner is uid.
func owned(table, idCol string, uid int) []int {
	f, err := os.Open(table)
	if err != nil {
		return nil
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Scan()
	head := strings.Fields(sc.Text())
	col := func(name string) int {
		for i, h := range head {
			if h == name {
				return i
			}
		}
		return -1
	}
	ic, uc := col(idCol), col("uid")
	var out []int
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if ic < 0 || uc < 0 || len(f) <= max(ic, uc) {
			continue
		}
		if u, _ := strconv.Atoi(f[uc]); u == uid {
			id, _ := strconv.Atoi(f[ic])
			out = append(out, id)
		}
	}
	return out
}

func cstr(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

func must(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "leftovers:", err)
		os.Exit(1)
	}
}
