package natsembed

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// foreignListeners names the listeners on port that a bind of 127.0.0.1:port collides
// with and that belong to a uid other than root's and euid's ("uid 1001 (mallory)"),
// read from proc's net/tcp and net/tcp6 (the owner uid of each socket). A local user may
// listen on the zero-config port while no nexd does (before boot's start, during any
// restart), and a server there is not this host's: nexd's clients would hand that user
// their messages.
func foreignListeners(proc string, port int, euid uint32) []string {
	var who []string
	for _, f := range []string{"tcp", "tcp6"} {
		for _, uid := range listenerUIDs(filepath.Join(proc, "net", f), port) {
			if uid == 0 || uid == euid {
				continue
			}
			s := "uid " + strconv.FormatUint(uint64(uid), 10)
			if u, err := user.LookupId(strconv.FormatUint(uint64(uid), 10)); err == nil {
				s += " (" + u.Username + ")"
			}
			if !slices.Contains(who, s) {
				who = append(who, s)
			}
		}
	}
	return who
}

// listenerUIDs returns the owners of the sockets in a /proc/net/tcp{,6} table that
// listen on port at 127.0.0.1 or at any address.
func listenerUIDs(table string, port int) []uint32 {
	f, err := os.Open(table)
	if err != nil {
		return nil
	}
	defer f.Close()
	var uids []uint32
	sc := bufio.NewScanner(f)
	sc.Scan() // the header
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 || fs[3] != "0A" { // TCP_LISTEN
			continue
		}
		addr, p, ok := strings.Cut(fs[1], ":")
		if !ok {
			continue
		}
		if n, err := strconv.ParseUint(p, 16, 16); err != nil || int(n) != port {
			continue
		}
		ip := procIP(addr)
		if ip == nil || !(ip.IsUnspecified() || ip.Equal(net.IPv4(127, 0, 0, 1))) {
			continue
		}
		if uid, err := strconv.ParseUint(fs[7], 10, 32); err == nil {
			uids = append(uids, uint32(uid))
		}
	}
	return uids
}

// procIP decodes an address of /proc/net/tcp{,6}: 32-bit words in the host's order.
func procIP(s string) net.IP {
	b, err := hex.DecodeString(s)
	if err != nil || (len(b) != 4 && len(b) != 16) {
		return nil
	}
	ip := make(net.IP, len(b))
	for i := 0; i < len(b); i += 4 {
		binary.NativeEndian.PutUint32(ip[i:], binary.BigEndian.Uint32(b[i:]))
	}
	return ip
}

// portTakenError is the zero-config server's error for a listen that failed: with a
// listener of another user's on the port it says so, and not to point nexd at it.
func portTakenError(err error, port int) error {
	if who := foreignListeners("/proc", port, uint32(os.Geteuid())); len(who) > 0 {
		return fmt.Errorf("%w: 127.0.0.1:%d is held by a listener of %s, not root's or nexd's own: "+
			"not a NATS server of this node's, and nexd must not be pointed at it (the node's and its workloads' "+
			"messages would go to that user); free the port, or set embedded_nats_port to another "+
			"(below 1024 only root may listen)", err, port, strings.Join(who, ", "))
	}
	return fmt.Errorf("%w (no NATS is configured, so nexd starts its own server; if one already runs here, point nexd at it with --nats.servers)", err)
}
