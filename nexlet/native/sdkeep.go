package native

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// nexd keeps a copy of every systemd uid lock the native nexlet holds (sdLocks), so
// that the lock outlives the nexlet: flock belongs to the open file, and a descriptor
// passed over a Unix socket (SCM_RIGHTS) is that same open file. Before, from a
// nexlet's crash (or kill -9) until the next one adopted the workloads, nobody held
// their uids' locks, and a DynamicUser= service that started then could be given a
// running workload's uid (e2e TestNexletKillKeepsSystemdUIDLocks).
//
// The nexlet dials nexd's socket (EnvUIDLockSocket, a SOCK_SEQPACKET one in nexd's
// runtime directory that only the native nexlets nexd runs may use) and sends each lock
// as it takes it (HOLD: the uid and the descriptor) and each release once its file is
// unlinked (DROP: the uid); nexd closes its copy then. When it connects, nexd first
// hands it the copies it keeps for that nexlet (those of the nexlet that died before
// it, taken over, or its own: a dup changes nothing), then END; the nexlet then sends
// every lock it holds, so a nexd that came since (a restart with live_restore, a
// re-exec, whose copies went with the old process) has them all again. The connection
// lost, the nexlet dials again (every second at most) until it stops.

// EnvUIDLockSocket names the socket on which nexd keeps the copies of the nexlet's
// systemd uid locks; unset: nobody keeps them.
const EnvUIDLockSocket = "NEX_NATIVE_UID_LOCK_SOCKET"

// The messages on the uid lock socket: the op, then the uids (4 bytes each, big
// endian); a HOLD carries one descriptor per uid, in order.
const (
	UIDLockHold byte = 'H'
	UIDLockDrop byte = 'D'
	UIDLockEnd  byte = 'E' // nexd: its hand-over is done
)

// maxUIDLockBatch is how many uids one message carries: the kernel passes at most 253
// descriptors in one (SCM_MAX_FD).
const maxUIDLockBatch = 250

// SendUIDLocks sends op for uids (and, for a HOLD, files, one per uid) in as many
// messages as it takes.
func SendUIDLocks(c *net.UnixConn, op byte, uids []uint32, files []*os.File) error {
	for len(uids) > 0 || op == UIDLockEnd {
		n := min(len(uids), maxUIDLockBatch)
		b := make([]byte, 1, 1+4*n)
		b[0] = op
		for _, u := range uids[:n] {
			b = binary.BigEndian.AppendUint32(b, u)
		}
		var oob []byte
		if op == UIDLockHold {
			fds := make([]int, n)
			for i, f := range files[:n] {
				fds[i] = int(f.Fd())
			}
			oob = unix.UnixRights(fds...)
		}
		if err := c.SetWriteDeadline(time.Now().Add(2 * time.Second)); err != nil {
			return err
		}
		if _, _, err := c.WriteMsgUnix(b, oob, nil); err != nil {
			return fmt.Errorf("uid lock socket: %w", err)
		}
		if op == UIDLockEnd {
			return nil
		}
		uids = uids[n:]
		if op == UIDLockHold {
			files = files[n:]
		}
	}
	return nil
}

// ReadUIDLocks reads one message: its op, uids and (a HOLD's) descriptors, close-on-exec.
// A message whose descriptors do not match its uids is an error (the descriptors it
// carried are closed).
func ReadUIDLocks(c *net.UnixConn) (byte, []uint32, []*os.File, error) {
	b := make([]byte, 1+4*maxUIDLockBatch+1)
	oob := make([]byte, unix.CmsgSpace(4*(maxUIDLockBatch+3)))
	n, oobn, flags, _, err := c.ReadMsgUnix(b, oob) // MSG_CMSG_CLOEXEC: no workload inherits one
	if err != nil {
		return 0, nil, nil, err
	}
	if n == 0 {
		return 0, nil, nil, errors.New("uid lock socket: closed")
	}
	var files []*os.File
	if oobn > 0 {
		cms, perr := unix.ParseSocketControlMessage(oob[:oobn])
		if perr != nil {
			return 0, nil, nil, fmt.Errorf("uid lock socket: %w", perr)
		}
		for _, cm := range cms {
			fds, rerr := unix.ParseUnixRights(&cm)
			if rerr != nil {
				continue
			}
			for _, fd := range fds {
				files = append(files, os.NewFile(uintptr(fd), "uid-lock"))
			}
		}
	}
	bad := func(why string) (byte, []uint32, []*os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return 0, nil, nil, fmt.Errorf("uid lock socket: %s", why)
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 || (n-1)%4 != 0 {
		return bad("malformed message")
	}
	op := b[0]
	uids := make([]uint32, (n-1)/4)
	for i := range uids {
		uids[i] = binary.BigEndian.Uint32(b[1+4*i:])
	}
	switch {
	case op == UIDLockHold && len(files) != len(uids):
		return bad(fmt.Sprintf("%d descriptors for %d uids", len(files), len(uids)))
	case op != UIDLockHold && len(files) > 0:
		return bad("descriptors on a message without locks")
	case op != UIDLockHold && op != UIDLockDrop && op != UIDLockEnd:
		return bad(fmt.Sprintf("unknown op %q", op))
	}
	return op, uids, files, nil
}

// SameFile says whether a and b are the same file (device and inode).
func SameFile(a, b *os.File) bool {
	var sa, sb unix.Stat_t
	return unix.Fstat(int(a.Fd()), &sa) == nil && unix.Fstat(int(b.Fd()), &sb) == nil && sa.Dev == sb.Dev && sa.Ino == sb.Ino
}

// Unlinked says whether f's file was unlinked (a released lock, whose copy is
// worthless).
func Unlinked(f *os.File) bool {
	var st unix.Stat_t
	return unix.Fstat(int(f.Fd()), &st) != nil || st.Nlink == 0
}

// sdKeeper is the nexlet's connection to nexd's copies of its locks.
type sdKeeper struct {
	path string
	log  *slog.Logger
	// synced is closed once the first connection's hand-over was taken (or the first
	// dial failed): an adoption's lock waits for it (sdLocks.waitSynced).
	synced   chan struct{}
	syncOnce sync.Once
	stop     chan struct{}
	wg       sync.WaitGroup
	conn     *net.UnixConn // guarded by sdLocks.mu; nil while not connected
}

// keepAt has nexd keep copies of s's locks on its socket at path, from now until
// stopKeeping. The connection is made in the background; its hand-over is waited for
// only by an adoption's lock (waitSynced), never by a deploy.
func (s *sdLocks) keepAt(path string, log *slog.Logger) {
	if s == nil || path == "" {
		return
	}
	k := &sdKeeper{path: path, log: log, synced: make(chan struct{}), stop: make(chan struct{})}
	s.keep = k
	k.wg.Go(func() { s.keepLoop(k) })
}

// stopKeeping closes the connection and waits for its goroutine; nexd keeps its
// copies (the next nexlet takes them over).
func (s *sdLocks) stopKeeping() {
	if s == nil || s.keep == nil {
		return
	}
	k := s.keep
	s.mu.Lock()
	select {
	case <-k.stop:
	default:
		close(k.stop)
	}
	if k.conn != nil {
		k.conn.Close()
	}
	s.mu.Unlock()
	k.wg.Wait()
}

// waitSynced waits (a bounded while) for the first hand-over from nexd, whose copies
// of a dead nexlet's locks an adoption takes over.
func (s *sdLocks) waitSynced() {
	if s == nil || s.keep == nil {
		return
	}
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-s.keep.synced:
	case <-s.keep.stop:
	case <-t.C:
		s.keep.log.Warn("nexd did not hand over its copies of systemd's uid locks in time; adopting without them", "socket", s.keep.path)
	}
}

// keepLoop connects, takes the hand-over, sends every lock, and then waits for the
// connection to end; again, until stopKeeping.
func (s *sdLocks) keepLoop(k *sdKeeper) {
	defer k.syncOnce.Do(func() { close(k.synced) })
	wait := 50 * time.Millisecond
	for {
		var d net.Dialer
		c, err := d.Dial("unixpacket", k.path)
		if err == nil {
			err = s.serveKeeper(k, c.(*net.UnixConn))
			wait = 50 * time.Millisecond
		}
		k.syncOnce.Do(func() { close(k.synced) })
		select {
		case <-k.stop:
			return
		default:
		}
		if err != nil {
			k.log.Debug("nexd's uid lock socket", "socket", k.path, "err", err)
		}
		t := time.NewTimer(wait)
		select {
		case <-k.stop:
			t.Stop()
			return
		case <-t.C:
		}
		wait = min(2*wait, time.Second)
	}
}

// serveKeeper takes nexd's hand-over on c, makes c the connection the locks go on,
// sends them all, and reads until c ends.
func (s *sdLocks) serveKeeper(k *sdKeeper, c *net.UnixConn) error {
	defer c.Close()
	for {
		op, uids, files, err := ReadUIDLocks(c)
		if err != nil {
			return err
		}
		if op == UIDLockEnd {
			break
		}
		if op == UIDLockHold {
			s.adoptCopies(uids, files, k.log)
		}
	}
	s.mu.Lock()
	select {
	case <-k.stop:
		s.mu.Unlock()
		return nil
	default:
	}
	k.conn = c
	uids := make([]uint32, 0, len(s.fds))
	files := make([]*os.File, 0, len(s.fds))
	for uid, f := range s.fds {
		uids = append(uids, uid)
		files = append(files, f)
	}
	err := SendUIDLocks(c, UIDLockHold, uids, files)
	s.mu.Unlock()
	k.syncOnce.Do(func() { close(k.synced) })
	if err != nil {
		s.lostKeeper(c)
		return err
	}
	for {
		// nexd sends nothing more; a read that ends is the connection's end.
		if _, _, files, err := ReadUIDLocks(c); err != nil {
			s.lostKeeper(c)
			return err
		} else {
			for _, f := range files {
				f.Close()
			}
		}
	}
}

// lostKeeper forgets c as the connection the locks go on.
func (s *sdLocks) lostKeeper(c *net.UnixConn) {
	s.mu.Lock()
	if s.keep.conn == c {
		s.keep.conn = nil
	}
	s.mu.Unlock()
}

// adoptCopies takes nexd's copies of locks over: each is kept when it is still the lock
// of its uid's file (the path names its file) and this nexlet holds none for the uid;
// else it is closed (a dup of one held, or a stale one).
func (s *sdLocks) adoptCopies(uids []uint32, files []*os.File, log *slog.Logger) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, uid := range uids {
		f := files[i]
		if _, held := s.fds[uid]; held || !s.names(uid, f) {
			f.Close()
			continue
		}
		s.fds[uid] = f
		log.Debug("took over systemd's uid lock from nexd", "uid", uid)
	}
}

// names says whether uid's lock file is f's file.
func (s *sdLocks) names(uid uint32, f *os.File) bool {
	var sp, sf unix.Stat_t
	if unix.Stat(s.path(uid), &sp) != nil || unix.Fstat(int(f.Fd()), &sf) != nil {
		return false
	}
	return sp.Dev == sf.Dev && sp.Ino == sf.Ino && sf.Nlink > 0
}

// tell sends op for uid (and f, a HOLD's) to nexd, when connected (s.mu held). A send
// that fails closes the connection: the next one sends every lock again.
func (s *sdLocks) tell(op byte, uid uint32, f *os.File) {
	if s.keep == nil || s.keep.conn == nil {
		return
	}
	var files []*os.File
	if f != nil {
		files = []*os.File{f}
	}
	if err := SendUIDLocks(s.keep.conn, op, []uint32{uid}, files); err != nil {
		s.keep.log.Warn("nexd's copy of a systemd uid lock not updated; connecting again", "uid", uid, "err", err)
		s.keep.conn.Close()
		s.keep.conn = nil
	}
}
