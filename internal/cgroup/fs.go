package cgroup

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

func itoa(n int) string { return strconv.Itoa(n) }

// writeFile writes one value to a cgroup interface file (which must exist: cgroupfs
// creates them, and creating a stray file would hide a missing controller). Raw system
// calls, as readInto: an os.File of a cgroupfs file (kernfs supports poll) is added to
// the runtime's poller and removed at its close, two epoll_ctl calls a write (a fork
// pool group's entry writes one file a hierarchy, and a start its limits).
func writeFile(path, val string) error {
	fd, err := unix.Open(path, unix.O_WRONLY|unix.O_TRUNC|unix.O_CLOEXEC, 0)
	for err == unix.EINTR {
		fd, err = unix.Open(path, unix.O_WRONLY|unix.O_TRUNC|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	b := []byte(val)
	for len(b) > 0 {
		k, err := unix.Write(fd, b)
		if err == unix.EINTR {
			continue
		}
		if err == nil && k == 0 {
			err = io.ErrShortWrite
		}
		if err != nil {
			unix.Close(fd)
			return fmt.Errorf("write %q to %s: %w", val, path, err)
		}
		b = b[k:]
	}
	if err := unix.Close(fd); err != nil && err != unix.EINTR {
		return fmt.Errorf("write %q to %s: %w", val, path, err)
	}
	return nil
}

func readPids(path string) ([]int, error) {
	// A workload's group lists a few pids: read them into a buffer on the stack rather
	// than os.ReadFile's file, stat and buffer (a stop reads every hierarchy's list, more
	// than once); a longer list is read whole.
	var small [512]byte
	b, err := procid.ReadInto(path, small[:])
	if err != nil {
		return nil, err
	}
	// Fields of decimal digits; any other field (none in cgroup.procs) is skipped. Not
	// bytes.FieldsSeq: its closure would move the buffer to the heap.
	var out []int
	n, ok := 0, true
	for i := 0; i <= len(b); i++ {
		if i == len(b) || b[i] == ' ' || b[i] == '\n' || b[i] == '\t' {
			if ok && n > 0 {
				out = append(out, n)
			}
			n, ok = 0, true
			continue
		}
		if c := b[i]; c < '0' || c > '9' || n > (1<<31)/10 {
			ok = false
		} else {
			n = n*10 + int(c-'0')
		}
	}
	return out, nil
}

// readUint reads a file holding one unsigned number.
func readUint(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: %q is not a number", path, s)
	}
	return n, nil
}

// readKey reads "key value" lines (memory.events, cpu.stat, memory.oom_control).
func readKey(path, key string) (uint64, error) {
	var small [512]byte
	b, err := procid.ReadInto(path, small[:])
	if err != nil {
		return 0, err
	}
	// Line by line in place: a bufio.Scanner's 4 KB buffer a call was most of what an
	// exit's OOM check (memory.oom_control of each group) allocated.
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		k, v, ok := bytes.Cut(bytes.TrimSpace(line), []byte(" "))
		if ok && string(k) == key {
			v = bytes.TrimSpace(v)
			n, err := strconv.ParseUint(string(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %s %q is not a number", path, key, string(v))
			}
			return n, nil
		}
	}
	return 0, nil
}

// subtreeDirs lists dir and every cgroup below it, parents first. It reads the
// directories raw, keeping only subdirectories' names: a stop lists a workload's group
// in every hierarchy several times over (Procs, Kill, OOMKills, Remove), and os.ReadDir's
// entry for each of the 15-35 interface files of a v1 group, with its sort, was a third
// of what the native nexlet allocated in a placement loop (BenchmarkSubtreeDirs).
func subtreeDirs(dir string) ([]string, error) {
	out := []string{dir}
	// One buffer for the whole walk; a v1 memory group's listing is about 1.4 KB.
	buf := make([]byte, 4<<10)
	for i := 0; i < len(out); i++ {
		var err error
		out, err = appendSubdirs(out, out[i], buf)
		if err != nil {
			if i > 0 && errors.Is(err, os.ErrNotExist) {
				continue // removed meanwhile
			}
			return nil, err
		}
	}
	return out, nil
}

// appendSubdirs appends dir's subdirectories to out. An entry whose type the file
// system does not report (DT_UNKNOWN) is asked with lstat, as os.DirEntry.IsDir would.
func appendSubdirs(out []string, dir string, buf []byte) ([]string, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	for err == unix.EINTR {
		fd, err = unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		return out, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	defer unix.Close(fd)
	for {
		n, err := unix.Getdents(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return out, &os.PathError{Op: "readdirent", Path: dir, Err: err}
		}
		if n <= 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) >= 19; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(b[16]) | int(b[17])<<8
			if reclen < 19 || reclen > len(b) {
				break
			}
			typ, name := b[18], b[19:reclen]
			if k := bytes.IndexByte(name, 0); k >= 0 {
				name = name[:k]
			}
			b = b[reclen:]
			if typ != unix.DT_DIR && typ != unix.DT_UNKNOWN || isDots(name) {
				continue
			}
			path := filepath.Join(dir, string(name))
			if typ == unix.DT_UNKNOWN {
				var st unix.Stat_t
				if unix.Lstat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
					continue
				}
			}
			out = append(out, path)
		}
	}
}

func isDots(name []byte) bool {
	return len(name) == 1 && name[0] == '.' || len(name) == 2 && name[0] == '.' && name[1] == '.'
}

// enableControllers writes the missing controllers into dir's cgroup.subtree_control and
// returns those enabled afterwards (of want).
func (m *Manager) enableControllers(dir string, want []string) (enabled []string, err error) {
	if len(want) == 0 {
		return nil, nil
	}
	ctl := filepath.Join(dir, "cgroup.subtree_control")
	cur := func() []string {
		b, _ := os.ReadFile(ctl)
		return strings.Fields(string(b))
	}
	missing := minus(want, cur())
	if len(missing) == 0 {
		return want, nil
	}
	all := "+" + strings.Join(missing, " +")
	if err = m.ops.write(ctl, all); err == nil {
		return want, nil
	}
	// One refused controller fails the whole write; find out which.
	var errs []error
	for _, c := range missing {
		if e := m.ops.write(ctl, "+"+c); e != nil {
			errs = append(errs, fmt.Errorf("enable %s in %s: %w", c, ctl, e))
		}
	}
	now := cur()
	for _, c := range want {
		if slices.Contains(now, c) {
			enabled = append(enabled, c)
		}
	}
	if len(errs) == 0 {
		return want, nil // a fake or racy tree: every single write worked
	}
	return enabled, errors.Join(errs...)
}

// alive reports whether pid exists and runs: not a zombie, or one only by its main
// thread, whose other threads run on in the group (procid.Stat.Runs); cgroup.procs
// lists such a process, and Kill must reach it (TestKillReachesThreadsOfExitedLeader).
func alive(pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return false
	}
	st, err := procid.ReadStat(pid)
	return err == nil && st.Runs()
}

// pgrpMembers lists the live processes whose process group is one of pgids.
func pgrpMembers(pgids []int) []int {
	if len(pgids) == 0 {
		return nil
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := procid.ReadStat(pid)
		if err == nil && st.Runs() && slices.Contains(pgids, st.PGRP) {
			out = append(out, pid)
		}
	}
	return out
}
