package testkit

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The host directories native nexlets share, where a test's nexlet may leave entries
// behind (the native nexlet's WorkloadsBase, DefaultLeaseDir and
// DefaultSystemdUIDDir; testkit may not import it: its tests import testkit).
const (
	hostWorkloadsBase = "/run/nex-workloads"
	hostLeaseDir      = "/run/nex-dynamic-uid"
	hostSystemdUIDDir = "/run/systemd/dynamic-uid"
	runtimeDirRecord  = ".runtime-dir" // <dir>.runtime-dir beside each directory of hostWorkloadsBase
)

// envListing marks the test binary's own -test.list run (debrisCheck), which must not
// check again.
const envListing = "NEXD_TESTKIT_LISTING"

// hostEntries are the names in the host directories, by directory.
type hostEntries map[string][]string

// counts is the number of entries of each directory, in hostDebris's order.
func (h hostEntries) counts() string {
	return fmt.Sprintf("%d/%d/%d", len(h[hostWorkloadsBase]), len(h[hostLeaseDir]), len(h[hostSystemdUIDDir]))
}

func readHostEntries() hostEntries {
	h := hostEntries{}
	for _, d := range []string{hostWorkloadsBase, hostLeaseDir, hostSystemdUIDDir} {
		ents, _ := os.ReadDir(d)
		for _, e := range ents {
			h[d] = append(h[d], e.Name())
		}
	}
	return h
}

// hostDebris lists what this test binary's run left in the host directories, of what
// was not there before: a directory of /run/nex-workloads that no nexlet holds, whose
// runtime directory (its record) is gone and was a temp dir of one of tests (t.TempDir
// names its directory after its test), and the uid leases that name a path in such a
// runtime or workloads directory. others are the entries added that its check cannot
// tie to this binary (binaries run side by side share these directories) but which
// look left behind: leases whose owner is gone, systemd lock files that are empty,
// unleased and unlocked, unheld directories without a record or of another runtime
// directory that is gone.
func hostDebris(before hostEntries, tests []string) (ours, others []string) {
	had := map[string]bool{}
	for d, names := range before {
		for _, n := range names {
			had[filepath.Join(d, n)] = true
		}
	}
	// t.TempDir makes its directories in $GOTMPDIR or the temp dir, named after the test
	// (its first 64 bytes, here of letters, digits and '_') and random digits.
	tmp := os.Getenv("GOTMPDIR")
	if tmp == "" {
		tmp = os.TempDir()
	}
	isOurs := func(rt string) bool {
		rel, err := filepath.Rel(filepath.Clean(tmp), rt)
		if err != nil || strings.HasPrefix(rel, "..") {
			return false
		}
		first, _, _ := strings.Cut(rel, string(filepath.Separator))
		return slices.ContainsFunc(tests, func(name string) bool {
			return strings.HasPrefix(first, name[:min(len(name), 64)])
		})
	}
	var ourDirs []string // runtime and workloads directories of ours, to tie leases to
	now := readHostEntries()
	for _, n := range now[hostWorkloadsBase] {
		p := filepath.Join(hostWorkloadsBase, n)
		if had[p] || strings.HasSuffix(n, runtimeDirRecord) || !unlocked(p) {
			continue
		}
		b, _ := os.ReadFile(p + runtimeDirRecord)
		rt := strings.TrimSpace(string(b))
		if rt != "" {
			if _, err := os.Lstat(rt); err == nil {
				continue // its runtime directory is there: a node that may start again
			}
		}
		if rt != "" && isOurs(rt) {
			ours = append(ours, fmt.Sprintf("%s (of %s): %s", p, rt, dirSummary(p)))
			ourDirs = append(ourDirs, p, rt)
		} else {
			others = append(others, fmt.Sprintf("%s (of %q): %s", p, rt, dirSummary(p)))
		}
	}
	leased := map[string]bool{}
	for _, n := range now[hostLeaseDir] {
		p := filepath.Join(hostLeaseDir, n)
		leased[n] = true
		if had[p] {
			continue
		}
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		owner, _, _ := strings.Cut(string(b), "\n")
		owner = strings.TrimSpace(owner)
		if slices.ContainsFunc(ourDirs, func(d string) bool { return strings.HasPrefix(owner, d+"/") }) {
			ours = append(ours, fmt.Sprintf("lease %s naming %s", p, owner))
			continue
		}
		if _, err := os.Lstat(owner); err != nil {
			others = append(others, fmt.Sprintf("lease %s naming %s, gone", p, owner))
		}
	}
	for _, n := range now[hostSystemdUIDDir] {
		p := filepath.Join(hostSystemdUIDDir, n)
		if had[p] || leased[n] || strings.Trim(n, "0123456789") != "" {
			continue
		}
		if fi, err := os.Stat(p); err == nil && fi.Size() == 0 && unlocked(p) {
			others = append(others, "systemd lock file "+p+", empty, unleased and unlocked")
		}
	}
	return ours, others
}

// unlocked says whether no process holds path's flock (a file, or a directory: a live
// native nexlet holds its workloads directory's shared lock).
func unlocked(path string) bool {
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	return unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB) == nil
}

// dirSummary names what is in dir, for the report.
func dirSummary(dir string) string {
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) == 0 {
		return "empty"
	}
	if len(names) > 6 {
		names = append(names[:6], fmt.Sprintf("and %d more", len(names)-6))
	}
	return strings.Join(names, ", ")
}

// testNames lists this test binary's tests that the run's -test.run selects
// (-test.list with its top-level part), for hostDebris to tie the temp dirs t.TempDir
// made to them; nil when it cannot. Only those: another run of the same package beside
// this one (another checkout's, make test's beside a developer's) names its temp dirs
// alike, and a child that runs one test of the binary (a probe, a pid namespace's copy)
// took what the other run left meanwhile of a test it did not run for its own, and
// failed (nexlet/native TestAttackSystemdDynamicUserGetsAWorkloadsUID's probe, which
// runs TestSystemdUIDProbe only, for another run's TestCgroupDriverRefused's).
func testNames() []string {
	run := "."
	if f := flag.Lookup("test.run"); f != nil && f.Value.String() != "" {
		run = topLevelPattern(f.Value.String())
	}
	return testNamesMatching(run)
}

// testNamesMatching lists this test binary's tests that match the regexp run.
func testNamesMatching(run string) []string {
	cmd := exec.Command(os.Args[0], "-test.list", run)
	cmd.Env = append(os.Environ(), envListing+"=1")
	out, err := cmd.Output()
	if err != nil {
		return nil
	}
	var names []string
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		if l := strings.TrimSpace(sc.Text()); strings.HasPrefix(l, "Test") {
			names = append(names, l)
		}
	}
	return names
}

// topLevelPattern is the part of a -test.run pattern that top-level test names are
// matched against: up to its first '/' outside brackets and parentheses, as the
// testing package splits it.
func topLevelPattern(run string) string {
	depth, escaped := 0, false
	for i, c := range run {
		switch {
		case escaped:
			escaped = false
		case c == '\\':
			escaped = true
		case c == '[' || c == '(':
			depth++
		case c == ']' || c == ')':
			depth = max(depth-1, 0)
		case c == '/' && depth == 0:
			return run[:i]
		}
	}
	return run
}

// CleanNexletDirs removes, at the end of t (registered now, it runs after the cleanups
// registered later: call it right after making runtimeDir, before the node that uses it
// starts), what native nexlets of runtimeDir left in the host's shared directories: the
// workloads directory it names (<runtimeDir>/workloads-dir, one of /run/nex-workloads)
// when no nexlet holds it any more (waiting out another nexlet's sweep of it), the uid leases naming what is in it or a nexlet that
// made directories ahead in it and is gone, and those uids' systemd lock files that are
// empty and unlocked. A node killed at the end of a test (or left running with
// live_restore and killed with its cgroup) leaves them; the next nexlet of the host
// would sweep them, but a test must not rely on one coming.
func CleanNexletDirs(t testing.TB, runtimeDir string) {
	t.Helper()
	t.Cleanup(func() { RemoveNexletDirs(runtimeDir) })
}

// RemoveNexletDirs removes now what CleanNexletDirs removes at a test's end, for a
// clean-up of its own that stops the nexlets of runtimeDir first.
func RemoveNexletDirs(runtimeDir string) {
	hostNexletDirs().remove(runtimeDir, sweepWait)
}

// sweepWait bounds the wait for another nexlet's sweep of a workloads directory (its
// exclusive lock, held across its walk of /proc, which takes long on a loaded host).
const sweepWait = 10 * time.Second

// nexletDirs are the directories native nexlets share: the host's (hostNexletDirs), or
// a test's own.
type nexletDirs struct {
	workloads   string // where workloads directories are (/run/nex-workloads)
	leases      string // uid leases, with their .lock (/run/nex-dynamic-uid)
	systemdUIDs string // systemd's uid lock files (/run/systemd/dynamic-uid)
}

func hostNexletDirs() nexletDirs {
	return nexletDirs{workloads: hostWorkloadsBase, leases: hostLeaseDir, systemdUIDs: hostSystemdUIDDir}
}

// remove is RemoveNexletDirs in d, waiting up to wait for another nexlet's sweep.
func (d nexletDirs) remove(runtimeDir string, wait time.Duration) {
	b, err := os.ReadFile(filepath.Join(runtimeDir, "workloads-dir"))
	if err != nil {
		return
	}
	wdir := strings.TrimSpace(string(b))
	if filepath.Dir(wdir) != d.workloads {
		return
	}
	hold := lockUnheld(wdir, wait)
	if hold == nil {
		return
	}
	// Held exclusively to the end, as a sweeping nexlet holds it: none sweeps it meanwhile.
	defer hold.Close()
	// The owners its leases may name: what is in it, and the nexlets that made
	// directories ahead in it (.ready-<pid>-<start>-<uid>), whose pooled leases name
	// /proc/<pid>. Such a nexlet holds the directory no more (its lock is ours): it is
	// gone, or on its way out (killed, its descriptors closed, /proc/<pid> still there,
	// its leases left when only a gone pid counted). A process of that pid started at
	// another time is a stranger, whose own leases would name it too.
	owners := []string{wdir + "/"}
	ents, _ := os.ReadDir(wdir)
	for _, e := range ents {
		if rest, ok := strings.CutPrefix(e.Name(), ".ready-"); ok {
			pid, rest, _ := strings.Cut(rest, "-")
			start, _, _ := strings.Cut(rest, "-")
			if now, running := procStart(pid); !running || now == start {
				owners = append(owners, "/proc/"+pid)
			}
		}
	}
	d.removeLeases(owners)
	_ = os.RemoveAll(wdir)
	_ = os.Remove(wdir + runtimeDirRecord)
}

// procStart is the start time (/proc/<pid>/stat's 22nd field) of process pid; false
// when no process has that pid.
func procStart(pid string) (string, bool) {
	b, err := os.ReadFile("/proc/" + pid + "/stat")
	if err != nil {
		return "", false
	}
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", true
	}
	f := strings.Fields(string(b[i+1:])) // from the 3rd field, the state, on
	if len(f) < 20 {
		return "", true
	}
	return f[19], true
}

// lockUnheld opens the workloads directory dir and takes its exclusive lock, which it
// returns held; nil when a nexlet holds the directory (its shared lock: a live one) or
// it is not there. Every nexlet's sweep of the host's workloads directories takes each
// one's exclusive lock for a while: a directory locked so is waited for, up to wait.
// (Given up at once, such a sweep beside the clean-up left the directory and its uid
// leases: the sweep keeps a directory whose runtime directory is still there, as the
// test's is until its temp dirs go after this.)
func lockUnheld(dir string, wait time.Duration) *os.File {
	f, err := os.OpenFile(dir, os.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil
	}
	fd := int(f.Fd())
	deadline := time.Now().Add(wait)
	for {
		err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB)
		if err != nil && unix.Flock(fd, unix.LOCK_SH|unix.LOCK_NB) == nil {
			// No exclusive holder: shared ones (a nexlet of it), or none left since.
			if err = unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
				break
			}
		}
		if err == nil {
			var a, b unix.Stat_t
			if unix.Fstat(fd, &a) == nil && unix.Lstat(dir, &b) == nil && a.Nlink > 0 && a.Ino == b.Ino && a.Dev == b.Dev {
				return f
			}
			break // removed (a sweep) or replaced meanwhile
		}
		if time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	f.Close()
	return nil
}

// removeLeases removes d's uid leases naming one of owners (a path ending in "/":
// anything below it), with their uids' systemd lock files that are empty and unlocked.
func (d nexletDirs) removeLeases(owners []string) {
	// Under the lease lock, as the nexlets change leases: a stale lease read here may
	// be a nexlet's again by the time it is removed otherwise.
	lf, err := os.OpenFile(filepath.Join(d.leases, ".lock"), os.O_RDWR, 0)
	if err != nil || unix.Flock(int(lf.Fd()), unix.LOCK_EX) != nil {
		return
	}
	defer lf.Close()
	leases, _ := os.ReadDir(d.leases)
	for _, e := range leases {
		p := filepath.Join(d.leases, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		owner, _, _ := strings.Cut(string(b), "\n")
		owner = strings.TrimSpace(owner)
		if !slices.ContainsFunc(owners, func(o string) bool {
			return owner == o || strings.HasSuffix(o, "/") && strings.HasPrefix(owner, o)
		}) {
			continue
		}
		_ = os.Remove(p)
		lock := filepath.Join(d.systemdUIDs, e.Name())
		if fi, err := os.Stat(lock); err == nil && fi.Size() == 0 && unlocked(lock) {
			_ = os.Remove(lock)
		}
	}
}
