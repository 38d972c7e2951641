package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

func itoa(n int) string { return strconv.Itoa(n) }

// writeFile writes one value to a cgroup interface file (which must exist: cgroupfs
// creates them, and creating a stray file would hide a missing controller).
func writeFile(path, val string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, werr := f.WriteString(val)
	cerr := f.Close()
	if werr != nil {
		return fmt.Errorf("write %q to %s: %w", val, path, werr)
	}
	if cerr != nil {
		return fmt.Errorf("write %q to %s: %w", val, path, cerr)
	}
	return nil
}

func readPids(path string) ([]int, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out []int
	for f := range strings.FieldsSeq(string(b)) {
		if n, err := strconv.Atoi(f); err == nil && n > 0 {
			out = append(out, n)
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
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), " ")
		if ok && k == key {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64)
			if err != nil {
				return 0, fmt.Errorf("%s: %s %q is not a number", path, key, v)
			}
			return n, nil
		}
	}
	return 0, nil
}

// subtreeDirs lists dir and every cgroup below it, parents first.
func subtreeDirs(dir string) ([]string, error) {
	out := []string{dir}
	for i := 0; i < len(out); i++ {
		ents, err := os.ReadDir(out[i])
		if err != nil {
			if i > 0 && errors.Is(err, os.ErrNotExist) {
				continue // removed meanwhile
			}
			return nil, err
		}
		for _, e := range ents {
			if e.IsDir() {
				out = append(out, filepath.Join(out[i], e.Name()))
			}
		}
	}
	return out, nil
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

// procStat returns the state and process group of pid from /proc/<pid>/stat.
func procStat(pid int) (state byte, pgrp int, err error) {
	b, err := os.ReadFile("/proc/" + itoa(pid) + "/stat")
	if err != nil {
		return 0, 0, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 3 {
		return 0, 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	pgrp, err = strconv.Atoi(f[2])
	return f[0][0], pgrp, err
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return false
	}
	st, _, err := procStat(pid)
	return err == nil && st != 'Z' && st != 'X'
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
		st, pg, err := procStat(pid)
		if err == nil && st != 'Z' && st != 'X' && slices.Contains(pgids, pg) {
			out = append(out, pid)
		}
	}
	return out
}
