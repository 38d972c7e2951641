package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// Binaries builds main packages for a test package at most once each, on first use,
// into one directory that Run removes at the end. Declare one per test package:
//
//	var bins testkit.Binaries
//
//	func TestMain(m *testing.M) { os.Exit(bins.Run(m)) }
//
//	func TestX(t *testing.T) { nexd := bins.Path(t, "github.com/nexd-project/nexd/cmd/nexd") }
//
// The binaries get -race when the test binary has it, and the directory is
// world-readable so processes run as a test user (NewUser) may execute them.
type Binaries struct {
	mu    sync.Mutex
	dir   string
	err   error
	built map[string]*build
}

type build struct {
	once sync.Once
	out  string // where it is built
	path string
	err  error
}

// Run runs the tests and then removes the built binaries; it returns m.Run's code.
// Before the tests it removes the aside directories (AsideDir) of test processes that
// are gone (killed before their end).
// Tests that passed fail (code 1) when they left native nexlets' entries in the
// host's shared directories (hostDebris: a /run/nex-workloads directory of a temp dir
// of one of its tests, with the uid leases naming what is in it); entries left there
// that it cannot tie to this binary are reported on stderr.
func (b *Binaries) Run(m *testing.M) int {
	listing := os.Getenv(envListing) != ""
	var before hostEntries
	if !listing {
		before = readHostEntries()
	}
	// A copy of the binary in a pid namespace of its own (InPidNamespace) sees its own
	// /proc, where every owner on the host is gone: its sweeps removed live binaries'
	// directories (a CI's e2e binary lost its nexd and nexctl builds mid-run) and would
	// kill their cgroups' processes. Only a binary on the host's /proc sweeps.
	if !listing && os.Getenv(envPidns) == "" {
		// Aside directories of test binaries killed before their end (AsideDir).
		if removed, err := sweepAside(asideParents()); err != nil {
			fmt.Fprintf(os.Stderr, "testkit: removing aside directories of gone test processes: %v\n", err)
		} else if len(removed) > 0 { // rare: said always (the flags are not parsed yet)
			fmt.Fprintf(os.Stderr, "testkit: removed %d aside directories of gone test processes: %s\n", len(removed), strings.Join(removed, " "))
		}
		// Temp directories and cgroups of test binaries killed before their end
		// (OwnedTempDir, OwnedName).
		if removed, err := sweepOwned(os.TempDir(), cgroupRoots()); err != nil {
			fmt.Fprintf(os.Stderr, "testkit: removing leftovers of gone test processes: %v\n", err)
		} else if len(removed) > 0 {
			fmt.Fprintf(os.Stderr, "testkit: removed %d leftovers of gone test processes: %s\n", len(removed), strings.Join(removed, " "))
		}
	}
	code := m.Run()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
	if listing || code != 0 {
		return code
	}
	ours, others := hostDebris(before, testNames())
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "testkit: host nexlet directories (%s): %s entries before the tests, %s after; %d left by these tests, %d left that cannot be tied to them\n",
			strings.Join([]string{hostWorkloadsBase, hostLeaseDir, hostSystemdUIDDir}, ", "), before.counts(), readHostEntries().counts(), len(ours), len(others))
	}
	if len(others) > 0 {
		fmt.Fprintf(os.Stderr, "testkit: left in the host's native nexlet directories during this run, not tied to these tests (binaries run beside them share the directories):\n  %s\n", strings.Join(others, "\n  "))
	}
	if len(ours) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: testkit: these tests left %d entries in the host's native nexlet directories (stop or clean up their nodes):\n  %s\n", len(ours), strings.Join(ours, "\n  "))
		return 1
	}
	return code
}

// Path returns the path of the binary built from the main package pkg (an import
// path, or a path relative to the test's package directory), building it on first
// use. Parallel callers of one pkg wait for one build.
func (b *Binaries) Path(t testing.TB, pkg string) string {
	t.Helper()
	p, err := b.path(pkg, Race)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// PathNoRace is Path built without -race whatever the test binary has: for tests
// that measure the binary's memory, which the race detector's shadow memory inflates
// (nexctl's peak RSS under a flood of answers: 170-180 MiB as shipped, 470-540 MiB
// with -race).
func (b *Binaries) PathNoRace(t testing.TB, pkg string) string {
	t.Helper()
	p, err := b.path(pkg, false)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (b *Binaries) path(pkg string, race bool) (string, error) {
	b.mu.Lock()
	if b.dir == "" && b.err == nil {
		b.dir, b.err = ownedTempDir("nexd-test-bin-")
		if b.err == nil {
			b.err = os.Chmod(b.dir, 0o755)
		}
		b.built = map[string]*build{}
	}
	if b.err != nil {
		b.mu.Unlock()
		return "", b.err
	}
	key := fmt.Sprintf("%s race=%v", pkg, race)
	bd := b.built[key]
	if bd == nil {
		// Each package gets its own subdirectory so two packages named alike
		// (cmd/nexd, testdata/nexd) cannot overwrite each other.
		bd = &build{out: filepath.Join(b.dir, fmt.Sprint(len(b.built)), path.Base(filepath.ToSlash(pkg)))}
		b.built[key] = bd
	}
	b.mu.Unlock()

	bd.once.Do(func() {
		bd.path, bd.err = goBuild(bd.out, pkg, race)
	})
	return bd.path, bd.err
}

// goBuild builds pkg into out, with -race if race.
func goBuild(out, pkg string, race bool) (string, error) {
	if err := os.MkdirAll(filepath.Dir(out), 0o755); err != nil {
		return "", err
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		if root := os.Getenv("GOROOT"); root != "" {
			gobin = filepath.Join(root, "bin", "go")
		} else {
			return "", fmt.Errorf("build %s: no go toolchain on PATH: %w", pkg, err)
		}
	}
	args := []string{"build"}
	if race {
		args = append(args, "-race")
	}
	args = append(args, "-o", out, pkg)
	if outb, err := exec.Command(gobin, args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %v: %w\n%s", args, err, outb)
	}
	return out, nil
}
