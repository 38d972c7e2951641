package testkit

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
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
func (b *Binaries) Run(m *testing.M) int {
	code := m.Run()
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
	return code
}

// Path returns the path of the binary built from the main package pkg (an import
// path, or a path relative to the test's package directory), building it on first
// use. Parallel callers of one pkg wait for one build.
func (b *Binaries) Path(t testing.TB, pkg string) string {
	t.Helper()
	p, err := b.path(pkg)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func (b *Binaries) path(pkg string) (string, error) {
	b.mu.Lock()
	if b.dir == "" && b.err == nil {
		b.dir, b.err = os.MkdirTemp("", "nexd-test-bin-")
		if b.err == nil {
			b.err = os.Chmod(b.dir, 0o755)
		}
		b.built = map[string]*build{}
	}
	if b.err != nil {
		b.mu.Unlock()
		return "", b.err
	}
	bd := b.built[pkg]
	if bd == nil {
		// Each package gets its own subdirectory so two packages named alike
		// (cmd/nexd, testdata/nexd) cannot overwrite each other.
		bd = &build{out: filepath.Join(b.dir, fmt.Sprint(len(b.built)), path.Base(filepath.ToSlash(pkg)))}
		b.built[pkg] = bd
	}
	b.mu.Unlock()

	bd.once.Do(func() {
		bd.path, bd.err = goBuild(bd.out, pkg)
	})
	return bd.path, bd.err
}

// goBuild builds pkg into out.
func goBuild(out, pkg string) (string, error) {
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
	if Race {
		args = append(args, "-race")
	}
	args = append(args, "-o", out, pkg)
	if outb, err := exec.Command(gobin, args...).CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %v: %w\n%s", args, err, outb)
	}
	return out, nil
}
