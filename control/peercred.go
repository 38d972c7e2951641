package control

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/peercred"
)

// Peer is the process on the other end of a control connection.
type Peer struct {
	PID    int32
	UID    uint32
	GID    uint32
	Groups []uint32 // supplementary groups, from /proc/<pid>/status
	Err    error    // set when the credentials could not be read
}

type peerKey struct{}

// PeerFromContext returns the peer of the request's connection.
func PeerFromContext(ctx context.Context) (Peer, bool) {
	p, ok := ctx.Value(peerKey{}).(Peer)
	return p, ok
}

// readPeer reads SO_PEERCRED of a Unix connection (internal/peercred) and the peer's supplementary groups.
func readPeer(c net.Conn, procRoot string) Peer {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{Err: fmt.Errorf("connection is %T, not a Unix socket", c)}
	}
	cred, err := peercred.Of(uc)
	if err != nil {
		return Peer{Err: err}
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{Err: fmt.Errorf("peer credentials: %w", err)}
	}
	p := Peer{PID: cred.Pid, UID: cred.Uid, GID: cred.Gid}
	// Supplementary groups as of connect(), from SO_PEERGROUPS (Linux 4.13): /proc at
	// accept time could belong to another process by then (pid reuse, or a setgid
	// exec). Only kernels without it fall back to /proc; a peer gone by then keeps its
	// primary gid alone, which can only deny more.
	var gerr error
	if err := raw.Control(func(fd uintptr) { p.Groups, gerr = peerGroups(int(fd)) }); err != nil {
		gerr = err
	}
	if errors.Is(gerr, unix.ENOPROTOOPT) {
		p.Groups, _ = procGroups(procRoot, cred.Pid)
	}
	return p
}

// peerGroups reads SO_PEERGROUPS, growing the buffer on ERANGE.
func peerGroups(fd int) ([]uint32, error) {
	n := 64
	for {
		buf := make([]uint32, n)
		size := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
		switch {
		case errno == 0:
			return buf[:size/4], nil
		case errno == unix.ERANGE && n < 1<<16:
			n = max(int(size/4), 2*n)
		default:
			return nil, fmt.Errorf("SO_PEERGROUPS: %w", errno)
		}
	}
}

// procGroups parses the "Groups:" line of /proc/<pid>/status.
func procGroups(procRoot string, pid int32) ([]uint32, error) {
	data, err := os.ReadFile(fmt.Sprintf("%s/%d/status", procRoot, pid))
	if err != nil {
		return nil, err
	}
	return parseGroupsLine(data)
}

func parseGroupsLine(status []byte) ([]uint32, error) {
	sc := bufio.NewScanner(bytes.NewReader(status))
	for sc.Scan() {
		line := sc.Text()
		rest, ok := strings.CutPrefix(line, "Groups:")
		if !ok {
			continue
		}
		var out []uint32
		for _, f := range strings.Fields(rest) {
			g, err := strconv.ParseUint(f, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("groups line %q: %w", line, err)
			}
			out = append(out, uint32(g))
		}
		return out, nil
	}
	return nil, fmt.Errorf("no Groups: line in status")
}

// inGroup reports whether the peer's primary or supplementary groups include gid.
func (p Peer) inGroup(gid uint32) bool {
	if p.GID == gid {
		return true
	}
	for _, g := range p.Groups {
		if g == gid {
			return true
		}
	}
	return false
}
