// Package peercred reads the kernel's record of the process at the other end of a
// connected Unix socket (SO_PEERCRED). The control socket and the adopted nexlets'
// socket both authorise by it.
package peercred

import (
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Of returns the peer's pid, uid and gid as the kernel recorded them at its connect()
// or listen(): no process can make them name another, and they do not follow a later
// setuid or exec of the peer.
func Of(c *net.UnixConn) (unix.Ucred, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return unix.Ucred{}, fmt.Errorf("SO_PEERCRED: %w", err)
	}
	var (
		cred *unix.Ucred
		cerr error
	)
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return unix.Ucred{}, fmt.Errorf("SO_PEERCRED: %w", err)
	}
	if cerr != nil {
		return unix.Ucred{}, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return *cred, nil
}
