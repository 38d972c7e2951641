package testkit

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Owned leftovers: what a test binary makes on the host outside its t.TempDir (temp
// directories other users must reach, cgroups) is named for the process that made it,
// <prefix><pid>-<start time>-<random>, so that when a test binary is killed (-9: no
// cleanup runs) the next test binary's Binaries.Run can tell its leftovers from a live
// binary's and remove them (sweepOwned), as it does aside directories (AsideDir).

// ownedTempPrefixes are the prefixes of the owned directories in os.TempDir().
var ownedTempPrefixes = [...]string{"nexlet-bench-", "nexd-test-bin-", "nexd-test-public-"}

// ownedCgroupPrefix starts the names of the cgroups tests make at the top of a
// hierarchy (OwnedName("nexd-test-<what>-")).
const ownedCgroupPrefix = "nexd-test-"

// ownerTag is this process's "<pid>-<start time>".
func ownerTag() (string, error) {
	self := strconv.Itoa(os.Getpid())
	start, ok := procStart(self)
	if !ok || start == "" {
		return "", fmt.Errorf("this process's start time: /proc/%s/stat unreadable", self)
	}
	return self + "-" + start, nil
}

// OwnedName returns prefix followed by this process's pid and start time and a random
// number: the name of a cgroup a test makes at the top of a hierarchy (prefix
// "nexd-test-<what>-"), which the next test binary's sweep removes once this process
// is gone.
func OwnedName(t testing.TB, prefix string) string {
	t.Helper()
	tag, err := ownerTag()
	if err != nil {
		t.Fatal(err)
	}
	return prefix + tag + "-" + strconv.FormatUint(rand.Uint64(), 10)
}

// OwnedTempDir makes a directory in os.TempDir() named for this process (prefix one of
// ownedTempPrefixes), removed when t ends, or by the next test binary's sweep if this
// one is killed first.
func OwnedTempDir(t testing.TB, prefix string) string {
	t.Helper()
	dir, err := ownedTempDir(prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

func ownedTempDir(prefix string) (string, error) {
	if !slices.Contains(ownedTempPrefixes[:], prefix) {
		return "", fmt.Errorf("owned temp dir prefix %q is not one the sweep knows", prefix)
	}
	tag, err := ownerTag()
	if err != nil {
		return "", err
	}
	return os.MkdirTemp("", prefix+tag+"-")
}

// nameOwner is the pid and start time an owned name records (its last three
// '-'-separated fields are pid, start time and a random part); false for a name of
// another form, such as the random-only names tests used before.
func nameOwner(name string) (pid, start string, ok bool) {
	f := strings.Split(name, "-")
	if len(f) < 4 || f[len(f)-1] == "" {
		return "", "", false
	}
	pid, start = f[len(f)-3], f[len(f)-2]
	for _, n := range []string{pid, start} {
		if _, err := strconv.ParseUint(n, 10, 64); err != nil {
			return "", "", false
		}
	}
	return pid, start, true
}

// ownerGone reports whether no process runs with the pid and start time name records;
// false for a name not of the owned form.
func ownerGone(name string) bool {
	pid, start, ok := nameOwner(name)
	if !ok {
		return false
	}
	now, running := procStart(pid)
	return !running || now != start
}

// sweepOwned removes the owned leftovers of gone test processes: the directories in
// tmp named with one of ownedTempPrefixes, and the cgroups named ownedCgroupPrefix at
// the top of each hierarchy in cgroupRoots (thawed, their processes killed, removed
// from the leaves up). Only directories of this process's effective uid are looked at,
// never what a symlink points to. It returns what it removed.
func sweepOwned(tmp string, cgroupRoots []string) (removed []string, err error) {
	var errs []error
	ents, _ := os.ReadDir(tmp)
	for _, e := range ents {
		name := e.Name()
		if !slices.ContainsFunc(ownedTempPrefixes[:], func(p string) bool { return strings.HasPrefix(name, p) }) || !ownerGone(name) {
			continue
		}
		path := filepath.Join(tmp, name)
		if !ownDir(path) {
			continue
		}
		if err := os.RemoveAll(path); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, path)
	}
	for _, root := range cgroupRoots {
		ents, _ := os.ReadDir(root)
		for _, e := range ents {
			name := e.Name()
			if !strings.HasPrefix(name, ownedCgroupPrefix) || !ownerGone(name) {
				continue
			}
			path := filepath.Join(root, name)
			if !ownDir(path) {
				continue
			}
			if err := removeCgroupTree(path); err != nil {
				errs = append(errs, err)
				continue
			}
			removed = append(removed, path)
		}
	}
	return removed, errors.Join(errs...)
}

// ownDir reports whether path is a directory (not a symlink) of this process's
// effective uid.
func ownDir(path string) bool {
	fi, err := os.Lstat(path)
	if err != nil || !fi.IsDir() {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

// cgroupRoots are the mounted cgroup hierarchies: /sys/fs/cgroup itself where it is
// one (v2), and each hierarchy mounted below it (v1 controllers, a hybrid's unified).
func cgroupRoots() []string {
	const base = "/sys/fs/cgroup"
	var roots []string
	add := func(d string) {
		r, err := filepath.EvalSymlinks(d)
		if err != nil || slices.Contains(roots, r) {
			return
		}
		if _, err := os.Stat(filepath.Join(r, "cgroup.procs")); err == nil {
			roots = append(roots, r)
		}
	}
	add(base)
	ents, _ := os.ReadDir(base)
	for _, e := range ents {
		add(filepath.Join(base, e.Name()))
	}
	return roots
}

// removeCgroupTree removes the cgroup dir and those below it, leaves first: each is
// thawed (a v1 freezer group: a frozen process takes no signal, SIGKILL included), its
// processes killed until none is left (they belong to the gone test process that named
// the group; bounded, 5 s a group), then removed.
func removeCgroupTree(dir string) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil // another binary's sweep came first
		}
		return err
	}
	for _, e := range ents {
		if e.IsDir() {
			if err := removeCgroupTree(filepath.Join(dir, e.Name())); err != nil {
				return err
			}
		}
	}
	_ = os.WriteFile(filepath.Join(dir, "freezer.state"), []byte("THAWED"), 0)
	procs := func() []string {
		b, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
		return strings.Fields(string(b))
	}
	empty := WaitFor(5*time.Second, func() bool {
		pids := procs()
		for _, p := range pids {
			// Through a pidfd taken while the group still lists the pid: one that
			// ended meanwhile leaves its number to a stranger, who is not hit.
			pid, err := strconv.Atoi(p)
			if err != nil || pid <= 1 {
				continue
			}
			fd, err := unix.PidfdOpen(pid, 0)
			if err != nil {
				continue
			}
			if slices.Contains(procs(), p) {
				_ = unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0)
			}
			unix.Close(fd)
		}
		return len(pids) == 0
	})
	if err := syscall.Rmdir(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		if !empty {
			return fmt.Errorf("remove cgroup %s: processes left after 5 s of SIGKILL: %w", dir, err)
		}
		return fmt.Errorf("remove cgroup %s: %w", dir, err)
	}
	return nil
}
