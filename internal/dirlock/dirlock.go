// Package dirlock gives one process at a time a directory: a flock on a file in it,
// or on the directory itself for one that cannot hold a file (a cgroup: name ""),
// which the kernel releases when the holder dies however it dies, so a crashed holder
// never blocks its successor. The file is opened close-on-exec; a holder that
// re-executes itself (same pid, new image) keeps it across the execve instead
// (KeepAcrossExec, Inherit), so no other process can take it in between.
package dirlock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrHeld is wrapped by Hold when another process holds the directory.
var ErrHeld = errors.New("held by another process")

// Lock is a held directory.
type Lock struct {
	f    *os.File
	note string
}

// Note says, when not empty, what Hold found in the way and went past: a local user's
// process (not root's, not this uid's: no nexd) holding the lock. The holder logs it.
func (l *Lock) Note() string {
	if l == nil {
		return ""
	}
	return l.note
}

// Release lets go (closing the file); the kernel does the same when the process ends.
// A nil Lock (nothing held) is fine.
func (l *Lock) Release() {
	if l != nil {
		l.f.Close()
	}
}

// KeepAcrossExec returns a descriptor of the lock, numbered above 3 (where socket
// activation puts a listener), that an execve of this process keeps open: the lock
// stays held through the exec, and the new image takes it back with Inherit. Release
// still closes the lock's own descriptor (close-on-exec).
func (l *Lock) KeepAcrossExec() (int, error) {
	fd, err := unix.FcntlInt(l.f.Fd(), unix.F_DUPFD, 4) // F_DUPFD: without close-on-exec
	if err != nil {
		return -1, fmt.Errorf("keep the lock of %s across exec: %w", l.f.Name(), err)
	}
	return fd, nil
}

// Hold makes dir (mode perm when missing) and takes its lock file name exclusively,
// without waiting. The file then says the holder's pid, which a refused Hold names.
// With name "" the lock is on dir itself, which must exist, and nothing says the
// holder.
func Hold(dir, name string, perm os.FileMode) (*Lock, error) {
	if name == "" {
		f, err := os.Open(dir)
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", dir, err)
		}
		return take(f, dir, filepath.Clean(dir), false)
	}
	if err := os.MkdirAll(dir, perm); err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	path := filepath.Join(dir, name)
	// 0600: a file others may open, they may flock (a read-only descriptor will do)
	// and so keep every nexd from the directory. One made 0644 by an older nexd is
	// narrowed; a holder that opened it before is gone past in take.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	_ = f.Chmod(0o600)
	return take(f, dir, path, true)
}

// Inherit takes back, as Hold would take it, the lock of dir/name that this process
// kept across its execve (fd, from KeepAcrossExec). When fd is not that lock file
// (another dir's: the configuration changed), Forget drops it and Hold decides.
func Inherit(fd int, dir, name string, perm os.FileMode) (*Lock, error) {
	path := filepath.Join(dir, name)
	var got, want unix.Stat_t
	if fd < 3 || unix.Fstat(fd, &got) != nil || unix.Stat(path, &want) != nil || got.Dev != want.Dev || got.Ino != want.Ino {
		Forget(fd, name)
		return Hold(dir, name, perm)
	}
	unix.CloseOnExec(fd)
	// The file says this pid already: the same process wrote it before its exec.
	return take(os.NewFile(uintptr(fd), path), dir, path, false)
}

// Forget closes fd, kept across an execve (KeepAcrossExec) but not taken back, when it
// is a lock file called name (with name "": a directory); any other descriptor (a
// wrong number) is left alone.
func Forget(fd int, name string) {
	if fd < 3 {
		return
	}
	if name == "" {
		var st unix.Stat_t
		if unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			unix.Close(fd)
		}
		return
	}
	if l, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); err == nil && filepath.Base(l) == name {
		unix.Close(fd)
	}
}

// take flocks f, the lock file path of dir (and writes this pid there when say); f is
// closed when it cannot.
func take(f *os.File, dir, path string, say bool) (*Lock, error) {
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		if errors.Is(err, unix.EWOULDBLOCK) {
			if sq := squatters(f); sq != "" {
				return pastSquatters(f, dir, path, sq)
			}
		}
		f.Close()
		if errors.Is(err, unix.EWOULDBLOCK) {
			if path == filepath.Clean(dir) { // the directory itself: no file says who
				return nil, fmt.Errorf("%s is %w", dir, ErrHeld)
			}
			if pid := holder(path); pid > 0 {
				return nil, fmt.Errorf("%s is %w, pid %d (lock file %s)", dir, ErrHeld, pid, path)
			}
			return nil, fmt.Errorf("%s is %w (lock file %s)", dir, ErrHeld, path)
		}
		return nil, fmt.Errorf("lock %s: %w", path, err)
	}
	if !say {
		return &Lock{f: f}, nil
	}
	// Say who holds it, for the next one refused. A failure here costs only that.
	if err := f.Truncate(0); err == nil {
		_, _ = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
	}
	return &Lock{f: f}, nil
}

// holder is the pid the lock file says, 0 if it says none (yet).
func holder(path string) int {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return 0
	}
	return pid
}

// pastSquatters goes past holders that are no nexd (squatters): a lock file is
// replaced by a fresh one, 0600, which this process holds (their descriptors keep the
// old one, unlinked, which no nexd opens again); a directory, which cannot be
// replaced, is taken without its lock. f (the lock's descriptor) is closed or kept.
func pastSquatters(f *os.File, dir, path, sq string) (*Lock, error) {
	if path == filepath.Clean(dir) {
		return &Lock{f: f, note: fmt.Sprintf("%s is flocked by %s, no nexd (another user's): taken without its lock", dir, sq)}, nil
	}
	f.Close()
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("lock %s: held by %s, no nexd, and cannot be replaced: %w", path, sq, err)
	}
	nf, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		// Another process made it meanwhile: whoever it is, it is not to be gone past.
		return nil, fmt.Errorf("%s is %w (lock file %s, made again meanwhile): %w", dir, ErrHeld, path, err)
	}
	l, err := take(nf, dir, path, true)
	if err != nil {
		return nil, err
	}
	l.note = fmt.Sprintf("lock file %s was flocked by %s, no nexd (another user's): replaced", path, sq)
	return l, nil
}

// squatters names the processes holding the flock of f's file when none of them can
// be a nexd: each runs as a uid other than root and this process's own (a local user
// who opened a lock file or directory others may read, and flocked it). It is "" when
// any holder could be a nexd, or cannot be told (gone, or /proc unreadable).
//
// The holders are every process with a descriptor open on the file (but f), not only
// the pid /proc/locks names: that is the pid that flocked, which may have handed its
// descriptor to a child and exited (a squatter nexd would refuse for ever), and a
// nexd that went past a squatted directory holds no flock there, only its descriptor
// (a second nexd on the same directory must see it and refuse).
func squatters(f *os.File) string {
	var st unix.Stat_t
	if unix.Fstat(int(f.Fd()), &st) != nil {
		return ""
	}
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return ""
	}
	id := fmt.Sprintf("%02x:%02x:%d", unix.Major(st.Dev), unix.Minor(st.Dev), st.Ino)
	me := os.Geteuid()
	locked := false
	for line := range strings.Lines(string(b)) {
		// "1: FLOCK  ADVISORY  WRITE 6615 fe:00:811643 0 EOF"; waiters have "->" second.
		fs := strings.Fields(line)
		if len(fs) < 6 || fs[1] != "FLOCK" || fs[5] != id {
			continue
		}
		locked = true
		pid, err := strconv.Atoi(fs[4])
		if err != nil || pid <= 0 {
			return ""
		}
		if uid, ok := procUID(pid); ok && (uid == 0 || uid == me) {
			return "" // a live holder that could be a nexd (a gone one: see openers)
		}
	}
	if !locked {
		return ""
	}
	return openers(f, me)
}

// openers names the processes, this one's f aside, with a descriptor open on f's file
// (its /proc/<pid>/fd link names the same path), when none runs as root or me; "" if
// any does, none is found, or a process's descriptors cannot be read. Links are
// compared, not stat'ed: a stat follows the link into the file system (a local user's
// FUSE mount could hold it for ever).
func openers(f *os.File, me int) string {
	self := strconv.Itoa(os.Getpid())
	fd := strconv.Itoa(int(f.Fd()))
	target, err := os.Readlink("/proc/self/fd/" + fd)
	if err != nil || strings.HasSuffix(target, " (deleted)") {
		return ""
	}
	procs, err := os.ReadDir("/proc")
	if err != nil {
		return ""
	}
	var who []string
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil || pid <= 0 {
			continue
		}
		fds, err := os.ReadDir("/proc/" + p.Name() + "/fd")
		if errors.Is(err, os.ErrNotExist) {
			continue // gone meanwhile
		}
		uid, ok := procUID(pid)
		if !ok {
			continue // gone meanwhile
		}
		if err != nil {
			if uid == 0 || uid == me {
				return "" // its descriptors cannot be told: it may hold the file
			}
			continue
		}
		holds := false
		for _, e := range fds {
			if p.Name() == self && e.Name() == fd {
				continue
			}
			if l, err := os.Readlink("/proc/" + p.Name() + "/fd/" + e.Name()); err == nil && l == target {
				holds = true
				break
			}
		}
		if !holds {
			continue
		}
		if uid == 0 || uid == me {
			return ""
		}
		who = append(who, fmt.Sprintf("pid %d (uid %d)", pid, uid))
	}
	return strings.Join(who, ", ")
}

// procUID is pid's effective uid, from its status.
func procUID(pid int) (int, bool) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, false
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			fs := strings.Fields(rest)
			if len(fs) < 2 {
				return 0, false
			}
			uid, err := strconv.Atoi(fs[1])
			return uid, err == nil
		}
	}
	return 0, false
}
