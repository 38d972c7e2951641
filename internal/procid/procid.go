// Package procid identifies processes across restarts of whoever watches them: a pid
// alone can be reused, so a process is named by its pid and its start time (field 22 of
// /proc/<pid>/stat, clock ticks since boot). It also holds the exit records that nexd,
// the child subreaper, writes for workloads whose nexlet died, so that the nexlet that
// adopts them later learns how they ended.
package procid

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// ID names one process: pid plus start time.
type ID struct {
	PID   int
	Start uint64 // clock ticks since boot
}

func (id ID) String() string { return strconv.Itoa(id.PID) + "-" + strconv.FormatUint(id.Start, 10) }

// Parse reads the "<pid> <start>" form written by Format.
func Parse(s string) (ID, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return ID{}, fmt.Errorf("process id %q: want \"<pid> <start time>\"", s)
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil || pid <= 1 {
		return ID{}, fmt.Errorf("process id %q: bad pid", s)
	}
	st, err := strconv.ParseUint(f[1], 10, 64)
	if err != nil {
		return ID{}, fmt.Errorf("process id %q: bad start time", s)
	}
	return ID{PID: pid, Start: st}, nil
}

// Format is the text form Parse reads.
func (id ID) Format() string {
	return strconv.Itoa(id.PID) + " " + strconv.FormatUint(id.Start, 10)
}

// Stat is what /proc/<pid>/stat says about a process.
type Stat struct {
	State   byte // R, S, D, Z, ...
	PPID    int
	PGRP    int // its process group
	Threads int // its threads, a zombie main thread among them
	Start   uint64
}

// Runs reports whether the process still runs code: not a zombie, or a zombie only by
// its main thread, which ended alone (exit(2), not exit_group(2)) while its other
// threads run on (Threads counts them with it). Such a process says State Z, but it is
// no process that ended: a signal to its pid (SIGTERM, SIGKILL) reaches every thread,
// and only once they all ended is it waited for (TestAliveCountsThreadsOfExitedLeader).
func (st Stat) Runs() bool {
	switch st.State {
	case 'X':
		return false
	case 'Z':
		return st.Threads > 1
	}
	return true
}

// ReadStat parses /proc/<pid>/stat after the last ')' (comm may hold anything).
func ReadStat(pid int) (Stat, error) {
	var buf [statBuf]byte
	b, err := ReadInto("/proc/"+strconv.Itoa(pid)+"/stat", buf[:])
	if err != nil {
		return Stat{}, err
	}
	st, err := parseStat(b)
	if err != nil {
		return Stat{}, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return st, nil
}

// statBuf holds a /proc/<pid>/stat (about 300 bytes; comm is at most 64).
const statBuf = 1024

// ReadInto reads a small file the kernel generates (/proc, cgroupfs) to its end into
// buf, without an os.File, its stat and its heap buffer, or, when it does not fit, the
// whole file into a new buffer. It reads until a read returns nothing: a seq_file
// (cgroup.procs) returns whole lines a read, not always a full buffer.
func ReadInto(path string, buf []byte) ([]byte, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	for err == unix.EINTR {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: path, Err: err}
	}
	n := 0
	for n < len(buf) {
		k, err := unix.Read(fd, buf[n:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			unix.Close(fd)
			return nil, &os.PathError{Op: "read", Path: path, Err: err}
		}
		if k == 0 {
			unix.Close(fd)
			return buf[:n], nil
		}
		n += k
	}
	unix.Close(fd)
	// Full: read again from the start, whole (such files are generated on each open).
	return os.ReadFile(path)
}

// parseStat reads the fields of a /proc/<pid>/stat after the last ')': state (field
// 3), ppid (4), process group (5), threads (20) and start time (22), without
// allocating.
func parseStat(b []byte) (Stat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, errors.New("malformed")
	}
	var st Stat
	field := 2 // the one before the first after ')'
	for b = b[i+1:]; len(b) > 0 && field < 22; {
		for len(b) > 0 && b[0] == ' ' {
			b = b[1:]
		}
		j := 0
		for j < len(b) && b[j] != ' ' && b[j] != '\n' {
			j++
		}
		if j == 0 {
			break
		}
		v := b[:j]
		b = b[j:]
		field++
		switch field {
		case 3:
			st.State = v[0]
		case 4, 5, 20, 22:
			n, ok := atou(v)
			if !ok {
				return Stat{}, fmt.Errorf("field %d: %q is not a number", field, v)
			}
			switch field {
			case 4:
				st.PPID = int(n)
			case 5:
				st.PGRP = int(n)
			case 20:
				st.Threads = int(n)
			default:
				st.Start = n
			}
		}
	}
	if field < 22 {
		return Stat{}, errors.New("malformed")
	}
	return st, nil
}

// atou parses a decimal number of at most 19 digits.
func atou(b []byte) (uint64, bool) {
	if len(b) == 0 || len(b) > 19 {
		return 0, false
	}
	var n uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		n = n*10 + uint64(c-'0')
	}
	return n, true
}

// Of returns the identity of a live (or zombie) pid.
func Of(pid int) (ID, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return ID{}, err
	}
	return ID{PID: pid, Start: st.Start}, nil
}

// Alive reports whether the process id names still runs (not a zombie, or one only by
// its main thread: Stat.Runs): the pid exists and has the same start time, so a reused
// pid is never taken for it.
func (id ID) Alive() bool {
	st, err := ReadStat(id.PID)
	return err == nil && st.Start == id.Start && st.Runs()
}

// Exit is how a process ended, as its reaper saw it.
type Exit struct {
	Code   int    // exit code, or 128+signal
	Reason string // "exited with code 3", "killed by signal killed"
	// UID is the process's real uid, when HasUID (nexd's reaper reads it from the
	// zombie): the native nexlet matches a relaunch forked before its pid record was
	// written to its end by it (a dynamic uid is its workload's alone).
	UID    uint32
	HasUID bool
}

// Ticks is the current time in the unit of a process's start time (clock ticks since
// boot, CLOCK_BOOTTIME at USER_HZ 100): a process forked after it started at Ticks()
// or later.
func Ticks() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("clock_gettime(CLOCK_BOOTTIME): %w", err)
	}
	return uint64(ts.Sec)*100 + uint64(ts.Nsec)/10_000_000, nil
}

// UID returns the real uid of a live or zombie process (/proc/<pid>/status).
func UID(pid int) (uint32, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Uid:"); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			u, err := strconv.ParseUint(f[0], 10, 32)
			if err != nil {
				return 0, fmt.Errorf("/proc/%d/status: uid %q: %w", pid, f[0], err)
			}
			return uint32(u), nil
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no Uid line", pid)
}

// ExitOf turns a wait status into an Exit, with the same wording the native nexlet uses.
func ExitOf(ws syscall.WaitStatus) Exit {
	switch {
	case ws.Signaled():
		return Exit{Code: 128 + int(ws.Signal()), Reason: "killed by signal " + ws.Signal().String()}
	case ws.ExitStatus() != 0:
		return Exit{Code: ws.ExitStatus(), Reason: "exited with code " + strconv.Itoa(ws.ExitStatus())}
	}
	return Exit{Reason: "exited"}
}

// WriteExit records the exit of id in dir (atomically: a reader never sees half a record).
// It writes into id's reserve (ReserveExit) when there is one, in place, and renames it
// to the record: no new space is needed, so an exit is recorded on a full file system
// too (nexd's reaper, for a workload whose nexlet died). Without one it writes a new
// file.
func WriteExit(dir string, id ID, e Exit) error {
	text := strconv.Itoa(e.Code) + " " + e.Reason
	if e.HasUID {
		text += "\nuid=" + strconv.FormatUint(uint64(e.UID), 10)
	}
	err := writeReserved(dir, id, text)
	if err == nil || !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// A temporary file of this call's own: nexd's reaper, its orphan watcher and the
	// nexlet may record the same end at once, and a shared name let one rename the
	// other's file away ("no such file or directory").
	f, err := os.CreateTemp(dir, "."+id.String()+".*")
	if err != nil {
		return recorded(dir, id, err)
	}
	_, err = f.WriteString(text)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, id.String()))
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return recorded(dir, id, err)
}

// recorded is err, a failed write of id's exit record, unless another writer of the
// same end (nexd's reaper, its orphan watch, the nexlet) recorded it already, into the
// reserve a full file system left this one no room beside: nil then.
func recorded(dir string, id ID, err error) error {
	if err == nil {
		return nil
	}
	if _, serr := os.Lstat(filepath.Join(dir, id.String())); serr == nil {
		return nil
	}
	return err
}

// ExitReserveSize is the size of an exit record's reserve: more than any record
// WriteExit writes (a code, an ExitOf or OOM reason, a uid).
const ExitReserveSize = 256

// reservePrefix starts the name of an exit record's reserve in an exits directory.
const reservePrefix = ".reserve-"

// ReservePath is where id's exit record's reserve is in dir.
func ReservePath(dir string, id ID) string {
	return filepath.Join(dir, reservePrefix+id.String())
}

// MakeReserve makes an exit record's reserve at path: a file of ExitReserveSize bytes,
// written, so that its space is taken now (a file only truncated to a size has none on
// tmpfs or ext4) and the record is later written into it in place.
func MakeReserve(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(bytes.Repeat([]byte{'\n'}, ExitReserveSize))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		_ = os.Remove(path)
	}
	return err
}

// ReserveExit takes the space of id's exit record in dir ahead of its end, so that
// WriteExit needs none then: the reserve made at from (MakeReserve, ahead of the
// process's start, on dir's file system) is moved there, or, with from "" or gone, one
// is made. DropReserve removes it once the end needs no record.
func ReserveExit(dir string, id ID, from string) error {
	to := ReservePath(dir, id)
	if from != "" {
		err := os.Rename(from, to)
		if err == nil || !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	return MakeReserve(to)
}

// DropReserve removes id's exit record's reserve from dir, if there is one.
func DropReserve(dir string, id ID) {
	_ = os.Remove(ReservePath(dir, id))
}

// ReserveOf is the process whose exit record's reserve a name of dir's is; false for
// other names.
func ReserveOf(name string) (ID, bool) {
	rest, ok := strings.CutPrefix(name, reservePrefix)
	if !ok {
		return ID{}, false
	}
	pid, start, ok := strings.Cut(rest, "-")
	if !ok {
		return ID{}, false
	}
	id, err := Parse(pid + " " + start)
	return id, err == nil
}

// writeReserved writes text into id's reserve in dir in place and renames it to the
// record; os.ErrNotExist when there is no reserve. Another writer of the same end that
// took the reserve first (it is locked while written, and gone from its name once
// renamed) has recorded it: nil.
func writeReserved(dir string, id ID, text string) error {
	path := ReservePath(dir, id)
	f, err := os.OpenFile(path, os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		if errors.Is(err, syscall.ELOOP) {
			return os.ErrNotExist // not a reserve of ours: a new file then
		}
		return err
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	if li, err := os.Lstat(path); err != nil || !os.SameFile(fi, li) {
		// Renamed to the record by another writer of the same end meanwhile: that
		// record stands (a new file's write would need the space a full file system
		// does not have).
		return nil
	}
	if !fi.Mode().IsRegular() || fi.Size() < int64(len(text)) {
		return fmt.Errorf("exit record reserve %s: %d bytes, not a file of at least %d: %w", path, fi.Size(), len(text), os.ErrNotExist)
	}
	if _, err := f.WriteAt([]byte(text), 0); err != nil {
		return err
	}
	if err := f.Truncate(int64(len(text))); err != nil { // smaller: frees, takes nothing
		return err
	}
	return os.Rename(path, filepath.Join(dir, id.String()))
}

// ErrNoExit says no exit record exists (yet) for a process.
var ErrNoExit = errors.New("no exit record")

// ReadExit reads the exit record of id from dir; ErrNoExit when there is none.
func ReadExit(dir string, id ID) (Exit, error) {
	b, err := os.ReadFile(filepath.Join(dir, id.String()))
	if errors.Is(err, os.ErrNotExist) {
		return Exit{}, ErrNoExit
	}
	if err != nil {
		return Exit{}, err
	}
	first, rest, _ := strings.Cut(string(b), "\n")
	code, reason, _ := strings.Cut(first, " ")
	c, err := strconv.Atoi(code)
	if err != nil {
		return Exit{}, fmt.Errorf("exit record %s: %q is not an exit code", id, code)
	}
	e := Exit{Code: c, Reason: reason}
	if v, ok := strings.CutPrefix(strings.TrimSpace(rest), "uid="); ok {
		if u, err := strconv.ParseUint(v, 10, 32); err == nil {
			e.UID, e.HasUID = uint32(u), true
		}
	}
	return e, nil
}

// ListExits names the processes dir holds exit records of.
func ListExits(dir string) ([]ID, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var ids []ID
	for _, e := range ents {
		pid, start, ok := strings.Cut(e.Name(), "-")
		if !ok || strings.HasPrefix(e.Name(), ".") {
			continue // a temporary file of WriteExit
		}
		if id, err := Parse(pid + " " + start); err == nil {
			ids = append(ids, id)
		}
	}
	return ids, nil
}

// RemoveExit deletes the exit record of id, once consumed.
func RemoveExit(dir string, id ID) {
	_ = os.Remove(filepath.Join(dir, id.String()))
}
