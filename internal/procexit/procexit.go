// Package procexit reports process exits, with their wait status, through the kernel's
// process events connector (cn_proc, NETLINK_CONNECTOR), also for processes that are
// not the listener's children. It is the only way to learn how a process ended that was
// reparented to init: its status goes to init, and a pidfd of a process that is not
// one's child says that it ended, not how. Listening needs CAP_NET_ADMIN in the initial
// user and pid namespaces (a host's root); in a container Listen fails (it checks that
// an event arrives).
package procexit

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Exit is one process (thread group) that ended.
type Exit struct {
	PID    int
	Parent int                // its parent's pid when it ended (1 after a reparenting to init)
	Status syscall.WaitStatus // as wait(2) would have returned it to that parent
}

// Listener receives exits; one goroutine calls Next, another may Close it.
type Listener struct {
	f    *os.File
	buf  []byte
	rest []byte // what of the last datagram is not returned yet
	// early are the exits the probe read that were not its own: Next returns them
	// first, so none that happened while Listen probed is lost.
	early []Exit
}

// Kernel ABI (include/uapi/linux/connector.h, cn_proc.h).
const (
	cnIdxProc         = 1
	cnValProc         = 1
	procCnMcastListen = 1
	procEventExit     = 0x80000000
	nlHdrLen          = 16
	cnMsgLen          = 20
	eventOff          = nlHdrLen + cnMsgLen // struct proc_event
	exitDataOff       = eventOff + 16       // after what, cpu, timestamp_ns
	exitDataLen       = 24                  // pid, tgid, exit_code, exit_signal, parent_pid, parent_tgid
	recvBuffer        = 4 << 20
	probeTimeout      = 2 * time.Second
)

// Listen subscribes to the kernel's process events, filtered to exits in the socket
// (a classic BPF filter, so forks and execs never wake the reader).
func Listen() (*Listener, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_CONNECTOR)
	if err != nil {
		return nil, fmt.Errorf("process events: netlink connector socket: %w", err)
	}
	fail := func(what string, err error) (*Listener, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("process events: %s: %w", what, err)
	}
	// Only PROC_EVENT_EXIT: BPF loads are big-endian, the field is host order
	// (little-endian on every architecture nexd ships for).
	what := binary.BigEndian.Uint32(binary.NativeEndian.AppendUint32(nil, procEventExit))
	filter := []unix.SockFilter{
		{Code: unix.BPF_LD | unix.BPF_W | unix.BPF_ABS, K: eventOff},
		{Code: unix.BPF_JMP | unix.BPF_JEQ | unix.BPF_K, Jt: 0, Jf: 1, K: what},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0xffffffff},
		{Code: unix.BPF_RET | unix.BPF_K, K: 0},
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(filter)), Filter: &filter[0]}); err != nil {
		return fail("attach filter", err)
	}
	// A busy host ends many processes; a larger buffer loses fewer (ENOBUFS) while
	// the reader is slow. Best effort: FORCE needs CAP_NET_ADMIN, which Listen needs anyway.
	_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, recvBuffer)
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: cnIdxProc}); err != nil {
		return fail("bind", err)
	}
	msg := make([]byte, nlHdrLen+cnMsgLen+4)
	binary.NativeEndian.PutUint32(msg[0:], uint32(len(msg)))
	binary.NativeEndian.PutUint16(msg[4:], unix.NLMSG_DONE)
	binary.NativeEndian.PutUint32(msg[nlHdrLen:], cnIdxProc)
	binary.NativeEndian.PutUint32(msg[nlHdrLen+4:], cnValProc)
	binary.NativeEndian.PutUint16(msg[nlHdrLen+16:], 4)
	binary.NativeEndian.PutUint32(msg[nlHdrLen+cnMsgLen:], procCnMcastListen)
	if err := unix.Sendto(fd, msg, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fail("subscribe", err)
	}
	// Non-blocking: os.File puts it in the runtime's poller, so Close ends a Next.
	l := &Listener{f: os.NewFile(uintptr(fd), "cn_proc"), buf: make([]byte, 64<<10)}
	if err := l.probe(probeTimeout); err != nil {
		l.Close()
		return nil, err
	}
	return l, nil
}

// ErrLost is returned by Next when the kernel dropped events (the receive buffer
// overflowed); listening goes on.
var ErrLost = errors.New("process events: the kernel dropped events (receive buffer full)")

// Next blocks until a process ends and returns it (threads other than a thread group's
// leader are skipped). It fails once the Listener is closed.
func (l *Listener) Next() (Exit, error) {
	if len(l.early) > 0 {
		ex := l.early[0]
		l.early = l.early[1:]
		return ex, nil
	}
	for {
		ex, tgid, err := l.next()
		if err != nil {
			return Exit{}, err
		}
		if ex.PID == tgid {
			return ex, nil
		}
	}
}

// next returns the next exit of a thread (Exit.PID is its thread id) and its thread
// group id.
func (l *Listener) next() (Exit, int, error) {
	for {
		for len(l.rest) >= nlHdrLen {
			size := int(binary.NativeEndian.Uint32(l.rest))
			if size < nlHdrLen || size > len(l.rest) {
				l.rest = nil
				break
			}
			m := l.rest[:size]
			l.rest = l.rest[min((size+3)&^3, len(l.rest)):]
			if len(m) < exitDataOff+exitDataLen || binary.NativeEndian.Uint32(m[eventOff:]) != procEventExit {
				continue
			}
			d := m[exitDataOff:]
			return Exit{
				PID:    int(binary.NativeEndian.Uint32(d)),
				Status: syscall.WaitStatus(binary.NativeEndian.Uint32(d[8:])),
				Parent: int(binary.NativeEndian.Uint32(d[20:])),
			}, int(binary.NativeEndian.Uint32(d[4:])), nil
		}
		n, err := l.f.Read(l.buf)
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				return Exit{}, 0, ErrLost
			}
			return Exit{}, 0, err
		}
		l.rest = l.buf[:n]
	}
}

// probe ends a thread of this process and waits for its exit event: the kernel takes
// a subscription from outside its initial user and pid namespaces (a container) without
// an error but never sends it anything.
func (l *Listener) probe(timeout time.Duration) error {
	tid := endThread()
	if err := l.f.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	defer l.f.SetReadDeadline(time.Time{})
	for {
		ex, tgid, err := l.next()
		if errors.Is(err, ErrLost) {
			continue
		}
		if err != nil {
			return fmt.Errorf("process events: none arrived within %s (outside the host's initial namespaces the kernel sends none): %w", timeout, err)
		}
		if ex.PID == tid {
			return nil
		}
		if ex.PID == tgid && len(l.early) < maxEarly {
			l.early = append(l.early, ex)
		}
	}
}

// maxEarly bounds the exits kept from the probe (on a host where many processes end).
const maxEarly = 4096

// endThread ends an OS thread of this process (never the main one) and returns its id.
func endThread() int {
	tids := make(chan int, 1)
	go exitThread(tids)
	return <-tids
}

// exitThread ends the calling goroutine's thread (a goroutine that ends locked to its
// thread ends the thread) after sending its id. The runtime never ends the main thread:
// it parks it for good, and no exit event ever comes (Listen then wrongly found process
// events unavailable whenever the probe's goroutine ran there). On the main thread it
// keeps the thread locked, so that a second goroutine runs on another one, has that
// one ended instead, and returns.
func exitThread(tids chan<- int) {
	runtime.LockOSThread()
	if tid := unix.Gettid(); tid != unix.Getpid() {
		tids <- tid
		return
	}
	tids <- endThread()
	runtime.UnlockOSThread()
}

// Close stops listening and ends a blocked Next.
func (l *Listener) Close() error { return l.f.Close() }
