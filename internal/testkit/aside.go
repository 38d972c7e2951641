package testkit

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// asidePrefix starts the names of the directories AsideDir makes:
// nexd-test-aside-<pid>-<start time>-<random>, naming the test process that made them.
const asidePrefix = "nexd-test-aside-"

// asideParents are the host's shared directories a test's native nexlet moves
// leftover trees aside in (the native nexlet's leftoverDirs; testkit may not import
// it), where its tests make their own aside directories (AsideDir).
func asideParents() []string {
	var dirs []string
	for _, d := range [...]string{"/dev/shm", "/dev/mqueue", "/tmp", "/var/tmp", "/run/lock", "/var/lock"} {
		if r, err := filepath.EvalSymlinks(d); err == nil && !slices.Contains(dirs, r) {
			dirs = append(dirs, r)
		}
	}
	return dirs
}

// AsideDir makes a directory of the test's own in parent (a host's shared directory),
// removed at the test's end. Its name records this process (pid and start time): a
// test binary killed before its end leaves it behind, and the next test binary's
// Binaries.Run removes it once that process is gone (sweepAside).
func AsideDir(t testing.TB, parent string) (string, error) {
	t.Helper()
	self := strconv.Itoa(os.Getpid())
	start, ok := procStart(self)
	if !ok || start == "" {
		return "", fmt.Errorf("this process's start time: /proc/%s/stat unreadable", self)
	}
	dir, err := os.MkdirTemp(parent, asidePrefix+self+"-"+start+"-")
	if err != nil {
		return "", err
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir, nil
}

// asideOwner is the pid and start time an aside directory's name records; false for a
// name of another form (another prefix, an older MkdirTemp name).
func asideOwner(name string) (pid, start string, ok bool) {
	rest, ok := strings.CutPrefix(name, asidePrefix)
	if !ok {
		return "", "", false
	}
	f := strings.Split(rest, "-")
	if len(f) != 3 || f[2] == "" {
		return "", "", false
	}
	for _, n := range f[:2] {
		if _, err := strconv.ParseUint(n, 10, 64); err != nil {
			return "", "", false
		}
	}
	return f[0], f[1], true
}

// sweepAside removes the aside directories (AsideDir) in parents whose test process is
// gone: no process runs with the pid and start time in the name. Only directories (not
// symlinks) of this process's effective uid, named in AsideDir's form, are looked at;
// it returns what it removed.
func sweepAside(parents []string) (removed []string, err error) {
	var errs []error
	for _, parent := range parents {
		ents, _ := os.ReadDir(parent)
		for _, e := range ents {
			pid, start, ok := asideOwner(e.Name())
			if !ok {
				continue
			}
			path := filepath.Join(parent, e.Name())
			fi, err := os.Lstat(path)
			if err != nil || !fi.IsDir() {
				continue
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); !ok || int(st.Uid) != os.Geteuid() {
				continue
			}
			if now, running := procStart(pid); running && now == start {
				continue // its test binary still runs
			}
			if err := os.RemoveAll(path); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, path)
		}
	}
	return removed, errors.Join(errs...)
}
