package nexlets

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/nexlet/native"
)

// nexd keeps a copy of each systemd uid lock its native nexlets hold
// (/run/systemd/dynamic-uid/<uid>, flock on the open file), passed over a socket
// (SCM_RIGHTS: the same open file, so the same lock): a nexlet killed leaves its
// running workloads' uids locked by these copies until the next nexlet takes them over
// at its connection, and a DynamicUser= service is never given one meanwhile (before,
// nobody held them in that window; e2e TestNexletKillKeepsSystemdUIDLocks). The
// nexlet's side and the messages: nexlet/native/sdkeep.go.

// uidLockSocketName is the socket's name in <runtime_dir>/supervise.
const uidLockSocketName = "uidlocks.sock"

// UIDLockSocketPath is where nexd keeps its native nexlets' uid locks.
func UIDLockSocketPath(runtimeDir string) string {
	return filepath.Join(runtimeDir, "supervise", uidLockSocketName)
}

// admitWait bounds how long a connection waits to be known as a native nexlet's: one
// that dials right after its fork may come before the supervisor noted its pid.
const admitWait = 2 * time.Second

// uidKeeper holds the copies, by the native nexlet's name and uid.
type uidKeeper struct {
	log *slog.Logger
	// nameOf names the native nexlet whose process pid is ("" none).
	nameOf func(pid int) string
	ln     *net.UnixListener
	wg     sync.WaitGroup

	mu     sync.Mutex
	held   map[string]map[uint32]*os.File
	conns  map[*net.UnixConn]bool
	closed bool
}

// listenUIDLocks serves the uid lock socket, once, before the native nexlet starts
// (StartEarly or Start).
func (m *Manager) listenUIDLocks() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.locks != nil || !slices.ContainsFunc(m.specs, func(s Spec) bool { return isNative(s.Name) }) {
		return
	}
	path := UIDLockSocketPath(m.o.RuntimeDir)
	ln, err := listenPrivate(path, "unixpacket")
	if err != nil {
		m.log.Warn("no socket to keep the native nexlet's systemd uid locks: a DynamicUser= service started while a killed nexlet is replaced may be given a workload's uid", "path", path, "err", err)
		return
	}
	m.locks = newUIDKeeper(ln, m.nativeOf, m.log)
}

// newUIDKeeper serves ln, admitting the nexlets nameOf names, until stop.
func newUIDKeeper(ln *net.UnixListener, nameOf func(pid int) string, log *slog.Logger) *uidKeeper {
	k := &uidKeeper{log: log, nameOf: nameOf, ln: ln, held: map[string]map[uint32]*os.File{}, conns: map[*net.UnixConn]bool{}}
	k.wg.Go(k.accept)
	return k
}

// nativeOf names the native nexlet the supervisor runs as pid, "" when none.
func (m *Manager) nativeOf(pid int) string {
	for _, st := range m.sup.Statuses() {
		if st.PID == pid && isNative(st.Name) {
			return st.Name
		}
	}
	return ""
}

func (k *uidKeeper) accept() {
	for {
		c, err := k.ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			k.log.Warn("accepting on the uid lock socket failed", "err", err)
			time.Sleep(50 * time.Millisecond) // out of descriptors: not a busy loop
			continue
		}
		k.mu.Lock()
		if k.closed {
			k.mu.Unlock()
			c.Close()
			return
		}
		k.conns[c] = true
		k.mu.Unlock()
		k.wg.Go(func() {
			k.serve(c)
			k.mu.Lock()
			delete(k.conns, c)
			k.mu.Unlock()
			c.Close()
		})
	}
}

// serve admits c if a native nexlet of this nexd dialled it, hands that nexlet the
// copies kept for its name, and then keeps what it sends until c ends. The copies stay
// after that: they are what holds the locks once the nexlet is dead.
func (k *uidKeeper) serve(c *net.UnixConn) {
	peer, err := localchan.PeerOf(c)
	if err != nil {
		k.log.Warn("uid lock socket: peer unknown", "err", err)
		return
	}
	// The process that connected, as of now: a pid named a native nexlet later must
	// still be this process (one that connected and exited may have its pid reused by
	// the next nexlet while the connection waits).
	id, err := procid.Of(peer.PID)
	name := ""
	deadline := time.Now().Add(admitWait)
	for err == nil && name == "" {
		if peer.UID == uint32(os.Geteuid()) {
			name = k.nameOf(peer.PID)
		}
		if name != "" || time.Now().After(deadline) || k.isClosed() {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if name != "" && !id.Alive() {
		name = ""
	}
	if name == "" {
		k.log.Warn("connection on the uid lock socket refused: not a native nexlet of this nexd", "pid", peer.PID, "uid", peer.UID)
		return
	}
	uids, files := k.copies(name)
	err = native.SendUIDLocks(c, native.UIDLockHold, uids, files)
	for _, f := range files {
		f.Close()
	}
	if err == nil {
		err = native.SendUIDLocks(c, native.UIDLockEnd, nil, nil)
	}
	if err != nil {
		k.log.Warn("uid lock socket: hand-over to the nexlet failed", "nexlet", name, "err", err)
		return
	}
	if len(uids) > 0 {
		k.log.Info("handed the nexlet the systemd uid locks kept for it", "nexlet", name, "locks", len(uids))
	}
	k.log.Info("nexlet connected on the uid lock socket", "nexlet", name, "pid", peer.PID)
	_ = c.SetWriteDeadline(time.Time{})
	for {
		op, uids, files, err := native.ReadUIDLocks(c)
		if err != nil {
			return // its end (EOF), or a malformed message
		}
		k.apply(name, op, uids, files)
	}
}

func (k *uidKeeper) isClosed() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.closed
}

// copies lists the copies kept for name, those of released locks (unlinked) closed and
// forgotten first: duplicates, the caller's to close, since another connection of the
// nexlet's (the one before, its last messages still read) may close the keeper's own by
// a DROP while the hand-over sends them (TestUIDKeeperHandOverBesideADrop).
func (k *uidKeeper) copies(name string) ([]uint32, []*os.File) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var uids []uint32
	var files []*os.File
	for uid, f := range k.held[name] {
		if native.Unlinked(f) {
			f.Close()
			delete(k.held[name], uid)
			continue
		}
		fd, err := unix.FcntlInt(f.Fd(), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			k.log.Warn("uid lock socket: a copy not handed over", "uid", uid, "err", err)
			continue // out of descriptors: the copy still holds the lock
		}
		uids = append(uids, uid)
		files = append(files, os.NewFile(uintptr(fd), f.Name()))
	}
	return uids, files
}

// apply keeps the copies of a HOLD (a copy of the same file kept already: the new one
// is closed) and closes those a DROP names, whose files the nexlet unlinked.
func (k *uidKeeper) apply(name string, op byte, uids []uint32, files []*os.File) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.closed {
		for _, f := range files {
			f.Close()
		}
		return
	}
	held := k.held[name]
	if held == nil {
		held = map[uint32]*os.File{}
		k.held[name] = held
	}
	for i, uid := range uids {
		old := held[uid]
		switch op {
		case native.UIDLockHold:
			f := files[i]
			if old != nil && native.SameFile(old, f) {
				f.Close()
				continue
			}
			if old != nil {
				old.Close() // a released lock's file, replaced by a new one for the uid
			}
			held[uid] = f
		case native.UIDLockDrop:
			if old != nil {
				old.Close()
				delete(held, uid)
			}
		}
	}
}

// count counts the copies kept (tests).
func (k *uidKeeper) count() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	n := 0
	for _, h := range k.held {
		n += len(h)
	}
	return n
}

// stop closes the socket and every connection, waits for their goroutines, and closes
// the copies: nexd is stopping, and a nexlet left running holds its own.
func (k *uidKeeper) stop() {
	if k == nil {
		return
	}
	k.mu.Lock()
	k.closed = true
	k.ln.Close()
	for c := range k.conns {
		c.Close()
	}
	k.mu.Unlock()
	k.wg.Wait()
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, h := range k.held {
		for _, f := range h {
			f.Close()
		}
	}
	k.held = map[string]map[uint32]*os.File{}
}
