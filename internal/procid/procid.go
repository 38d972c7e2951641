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
	State byte // R, S, D, Z, ...
	PPID  int
	Start uint64
}

// ReadStat parses /proc/<pid>/stat after the last ')' (comm may hold anything).
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return Stat{}, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return Stat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); start time is field 22, f[19].
	if len(f) < 20 || len(f[0]) == 0 {
		return Stat{}, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return Stat{}, fmt.Errorf("/proc/%d/stat: ppid: %w", pid, err)
	}
	st, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return Stat{}, fmt.Errorf("/proc/%d/stat: start time: %w", pid, err)
	}
	return Stat{State: f[0][0], PPID: ppid, Start: st}, nil
}

// Of returns the identity of a live (or zombie) pid.
func Of(pid int) (ID, error) {
	st, err := ReadStat(pid)
	if err != nil {
		return ID{}, err
	}
	return ID{PID: pid, Start: st.Start}, nil
}

// Alive reports whether the process id names still runs (not a zombie): the pid exists
// and has the same start time, so a reused pid is never taken for it.
func (id ID) Alive() bool {
	st, err := ReadStat(id.PID)
	return err == nil && st.Start == id.Start && st.State != 'Z' && st.State != 'X'
}

// Exit is how a process ended, as its reaper saw it.
type Exit struct {
	Code   int    // exit code, or 128+signal
	Reason string // "exited with code 3", "killed by signal killed"
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
func WriteExit(dir string, id ID, e Exit) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	// A temporary file of this call's own: nexd's reaper, its orphan watcher and the
	// nexlet may record the same end at once, and a shared name let one rename the
	// other's file away ("no such file or directory").
	f, err := os.CreateTemp(dir, "."+id.String()+".*")
	if err != nil {
		return err
	}
	_, err = f.WriteString(strconv.Itoa(e.Code) + " " + e.Reason)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, id.String()))
	}
	if err != nil {
		_ = os.Remove(f.Name())
	}
	return err
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
	code, reason, _ := strings.Cut(string(b), " ")
	c, err := strconv.Atoi(code)
	if err != nil {
		return Exit{}, fmt.Errorf("exit record %s: %q is not an exit code", id, code)
	}
	return Exit{Code: c, Reason: reason}, nil
}

// RemoveExit deletes the exit record of id, once consumed.
func RemoveExit(dir string, id ID) {
	_ = os.Remove(filepath.Join(dir, id.String()))
}
