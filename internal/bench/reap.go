package bench

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/dirlock"
	"github.com/nexd-project/nexd/internal/procid"
)

// A run's leftovers are found by its names, which only nexbench makes: the cgroup
// directory nexbench-<pid>-<6 of [0-9a-z]> in each v1 hierarchy (every node's
// --cgroup-root is below it, so its nexlets and workloads are too; upstream and floor
// nodes are moved into it once ready), nexd processes whose --cgroup-root is below it,
// and the temp dir nexbench-<pid>-<6>-*. The run holds a flock on its cgroup directory
// while it lives; a run whose pid is gone and whose directory nobody holds was killed
// (kill -9) and is reaped by the next run. A kill -9'd run's nexd gets SIGTERM from its
// parent-death signal but cannot drain: its NATS server was inside nexbench.

const runPrefix = "nexbench-"

// isRunName says whether name is a run's cgroup directory name, and its pid.
func isRunName(name string) (pid int, ok bool) {
	rest, ok := strings.CutPrefix(name, runPrefix)
	if !ok {
		return 0, false
	}
	p, id, ok := strings.Cut(rest, "-")
	if !ok || len(id) != 6 || strings.Trim(id, "0123456789abcdefghijklmnopqrstuvwxyz") != "" {
		return 0, false
	}
	pid, err := strconv.Atoi(p)
	if err != nil || pid <= 0 || strconv.Itoa(pid) != p {
		return 0, false
	}
	return pid, true
}

// runGroups lists the run's cgroup directories, one per v1 hierarchy that has it.
func runGroups(runID string) []string {
	dirs, _ := filepath.Glob("/sys/fs/cgroup/*/" + runPrefix + runID)
	return dirs
}

// procsHierarchy is the v1 hierarchy that started upstream and floor nodes are moved
// into (the run's group there, <name>/): pids, which limits nothing here and costs
// least, else memory; "" when neither is writable.
func procsHierarchy() string {
	for _, h := range []string{"/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory"} {
		if unix.Access(filepath.Join(h, "cgroup.procs"), unix.W_OK) == nil {
			return h
		}
	}
	return ""
}

// holdRun makes the run's cgroup directory in the procs hierarchy and holds it for the
// run's life (the kernel lets go when nexbench dies, however it dies); nil when there
// is no writable v1 hierarchy.
func holdRun(runID string) (*dirlock.Lock, error) {
	h := procsHierarchy()
	if h == "" {
		return nil, nil
	}
	dir := filepath.Join(h, runPrefix+runID)
	if err := os.Mkdir(dir, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("run cgroup: %w", err)
	}
	l, err := dirlock.Hold(dir, "", 0)
	if err != nil {
		return nil, fmt.Errorf("run cgroup: %w", err)
	}
	return l, nil
}

// adopt moves pid (a started upstream or floor node, once ready: its workloads come
// later and are forked into the group) into the run's group name in the procs
// hierarchy, so that a killed run's next run finds it and what it started.
func adopt(runID, name string, pid int) error {
	h := procsHierarchy()
	if h == "" {
		return nil
	}
	dir := filepath.Join(h, runPrefix+runID, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("adopt %s: %w", name, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		return fmt.Errorf("adopt %s (pid %d): %w", name, pid, err)
	}
	return nil
}

// reapDead reaps every run of nexbench that is gone without cleaning up (its pid is
// not running; another reaper at work on it is waited for): the nexd processes, nexlets,
// workloads, upstream nodes and their workloads it started, its cgroup directories and
// its temp dir. Runs still going (any other nexbench's) and anything not named as a
// run's are left alone.
func reapDead(self string, log *slog.Logger) {
	all, _ := filepath.Glob("/sys/fs/cgroup/*/" + runPrefix + "*")
	seen := map[string]bool{}
	for _, d := range all {
		name := filepath.Base(d)
		pid, ok := isRunName(name)
		if !ok || seen[name] || name == runPrefix+self {
			continue
		}
		seen[name] = true
		if err := unix.Kill(pid, 0); err == nil || errors.Is(err, unix.EPERM) {
			continue // its nexbench runs (or the pid is another's now: left alone)
		}
		runID := strings.TrimPrefix(name, runPrefix)
		locks, err := holdDeadRun(runID, deadRunWait)
		if err != nil {
			log.Warn("left a killed nexbench run alone: its cgroup stays held", "run", runID, "err", err)
			continue
		}
		killed, err := reapRun(runID, false)
		log.Warn("reaped what a killed nexbench run left", "run", runID, "killed", killed, "err", err)
		for _, l := range locks {
			l.Release()
		}
	}
}

// deadRunWait bounds holdDeadRun's wait for another reaper: reapRun's kills take 10 s
// at most, then it removes the groups.
const deadRunWait = 15 * time.Second

// holdDeadRun holds each cgroup directory of run runID, whose nexbench is gone, waiting
// up to wait for a holder to let go. With the run's nexbench gone, a holder is another
// run's reaper at work on it (every run reaps every dead run on the host at its start:
// other nexbench runs, other bench tests): skipped as a live run, as before, the run's
// processes that reaper had not killed yet outlived this run's start, beside it (the
// CI's TestStoppedRunLeavesNothing/killed: 13 of 25 left, its groups and temp dir).
// A group gone meanwhile (that reaper removed it) is passed over.
func holdDeadRun(runID string, wait time.Duration) ([]*dirlock.Lock, error) {
	deadline := time.Now().Add(wait)
	var locks []*dirlock.Lock
	for _, g := range runGroups(runID) {
		for {
			l, err := dirlock.Hold(g, "", 0)
			if err == nil {
				locks = append(locks, l)
				break
			}
			if !errors.Is(err, dirlock.ErrHeld) {
				break // removed meanwhile
			}
			if time.Now().After(deadline) {
				for _, l := range locks {
					l.Release()
				}
				return nil, fmt.Errorf("still held after %v: %w", wait, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return locks, nil
}

// reapRun kills what is left of run runID and removes its cgroup directories and,
// unless ownRun (Close removes its own, or keeps it: --keep), its temp dir. It returns
// how many processes it killed.
func reapRun(runID string, ownRun bool) (killed int, err error) {
	groups := runGroups(runID)
	me := os.Getpid()
	// nexd first, so that none restarts a nexlet while they go.
	for _, pid := range nexdsBelow(groups) {
		if pid != me && killIf(pid, func(pid int) bool { return nexdBelow(pid, groups) }) {
			killed++
		}
	}
	// Then every process in the run's groups, again until none is left (a process may
	// fork while its group is killed), for 10 s at most.
	deadline := time.Now().Add(10 * time.Second)
	var left []int
	for {
		left = procsBelow(groups)
		left = slices.DeleteFunc(left, func(p int) bool { return p == me })
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		for _, p := range left {
			if killIf(p, func(pid int) bool { return inRun(pid, runID) }) {
				killed++
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	var errs []error
	if len(left) > 0 {
		errs = append(errs, fmt.Errorf("processes %v of run %s survive SIGKILL", left, runID))
	}
	for _, g := range groups {
		errs = append(errs, removeTree(g))
	}
	if !ownRun {
		tmps, _ := filepath.Glob(filepath.Join(os.TempDir(), runPrefix+runID+"-*"))
		for _, t := range tmps {
			// Only a directory of this user's: anyone may make a name that matches in
			// /tmp (a symlink, another user's directory), and the run made neither.
			if ownedDir(t) {
				errs = append(errs, os.RemoveAll(t))
			}
		}
	}
	return killed, errors.Join(errs...)
}

// ownedDir says whether path is a directory (not a symlink) of this process's user.
func ownedDir(path string) bool {
	fi, err := os.Lstat(path)
	if err != nil || !fi.IsDir() {
		return false
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	return ok && int(st.Uid) == os.Geteuid()
}

// killIf sends SIGKILL to pid if it is (still) what member says, through a pidfd: the
// pid was listed a moment ago (cgroup.procs, /proc), and the process it named may have
// ended and its pid gone to another process since. member is asked once the pidfd
// pins the listed process (procid.SignalIf), so a reused pid is never killed.
func killIf(pid int, member func(pid int) bool) bool {
	sent, _ := procid.SignalIf(pid, unix.SIGKILL, member)
	return sent
}

// inRun says whether pid is in one of run runID's cgroups (in any v1 hierarchy).
func inRun(pid int, runID string) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cgroup"))
	if err != nil {
		return false
	}
	top := "/" + runPrefix + runID
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && (f[2] == top || strings.HasPrefix(f[2], top+"/")) {
			return true
		}
	}
	return false
}

// procsBelow lists the processes in the groups and their descendants.
func procsBelow(groups []string) []int {
	var out []int
	for _, g := range groups {
		_ = filepath.WalkDir(g, func(p string, d fs.DirEntry, err error) error {
			if err != nil || !d.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && !slices.Contains(out, pid) {
					out = append(out, pid)
				}
			}
			return nil
		})
	}
	return out
}

// nexdsBelow lists the processes started with a --cgroup-root inside one of the groups:
// the run's nexd processes, which live outside the run's groups.
func nexdsBelow(groups []string) []int {
	ents, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range ents {
		if pid, err := strconv.Atoi(e.Name()); err == nil && nexdBelow(pid, groups) {
			out = append(out, pid)
		}
	}
	return out
}

// nexdBelow says whether pid was started with a --cgroup-root inside one of groups.
func nexdBelow(pid int, groups []string) bool {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "cmdline"))
	if err != nil {
		return false
	}
	args := strings.Split(string(b), "\x00")
	for i, a := range args {
		root, ok := strings.CutPrefix(a, "--cgroup-root=")
		if !ok && a == "--cgroup-root" && i+1 < len(args) {
			root, ok = args[i+1], true
		}
		if ok && slices.ContainsFunc(groups, func(g string) bool {
			return root == g || strings.HasPrefix(root, g+"/")
		}) {
			return true
		}
	}
	return false
}

// removeTree removes dir's cgroup directories, deepest first.
func removeTree(dir string) error {
	var dirs []string
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
