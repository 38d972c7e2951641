package sysd

import (
	"fmt"
	"net"

	"github.com/coreos/go-systemd/v22/activation"
)

// ControlListener returns the control socket systemd passed nexd (socket
// activation through nexd.socket), or nil when nexd was not socket-activated.
// It consumes LISTEN_PID, LISTEN_FDS and LISTEN_FDNAMES, and the socket is
// close-on-exec, so nexlets and workloads inherit neither. Call it once.
func ControlListener() (*net.UnixListener, error) {
	ls, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("sysd: socket activation: %w", err)
	}
	if len(ls) == 0 {
		return nil, nil
	}
	var unixLn *net.UnixListener
	for i, l := range ls {
		u, ok := l.(*net.UnixListener)
		if !ok || unixLn != nil {
			for _, l := range ls {
				if l != nil {
					l.Close()
				}
			}
			return nil, fmt.Errorf("sysd: socket activation: systemd passed %d sockets; want exactly one Unix stream socket, the control socket (fd %d is %s)", len(ls), 3+i, describe(l))
		}
		unixLn = u
	}
	return unixLn, nil
}

func describe(l net.Listener) string {
	if l == nil {
		return "not a listening stream socket"
	}
	return fmt.Sprintf("a %s listener on %s", l.Addr().Network(), l.Addr())
}
