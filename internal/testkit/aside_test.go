package testkit

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// envAsideHelper makes the test binary run as TestAsideHelper's killed test process:
// it makes an aside directory in the named parent, prints it and waits to be killed.
const envAsideHelper = "NEXD_TESTKIT_ASIDE_HELPER"

func TestAsideHelper(t *testing.T) {
	parent := os.Getenv(envAsideHelper)
	if parent == "" {
		t.Skip("run by TestSweepAsideRemovesKilledBinarysDirs")
	}
	dir, err := AsideDir(t, parent)
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString(dir + "\n")
	select {} // killed (-9): its cleanup never runs
}

// TestSweepAsideRemovesKilledBinarysDirs: a test binary killed (-9) leaves the aside
// directory it made (AsideDir); nothing removed it before. The next binary's sweep
// (Binaries.Run's, here on a parent of the test's own, so that no other binary's sweep
// runs in it) removes it, and leaves alone a live process's, names of other forms
// (another prefix, an older random-only name, one naming a gone process but not a
// directory: a symlink) and what a symlink points to.
func TestSweepAsideRemovesKilledBinarysDirs(t *testing.T) {
	parent := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestAsideHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), envAsideHelper+"="+parent)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("the helper's aside directory: %v", err)
	}
	killed := line[:len(line)-1]
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if _, err := os.Stat(killed); err != nil {
		t.Fatalf("the killed binary's aside directory: %v", err)
	}
	live, err := AsideDir(t, parent)
	if err != nil {
		t.Fatal(err)
	}
	target := t.TempDir()
	WriteFile(t, filepath.Join(target, "kept"), "kept")
	keep := []string{live, filepath.Join(parent, "other-1-2-3"), filepath.Join(parent, asidePrefix+"123456")}
	for _, d := range keep[1:] {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	link := filepath.Join(parent, filepath.Base(killed)+"x")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	keep = append(keep, link, filepath.Join(target, "kept"))

	before := countAside(parent)
	removed, err := sweepAside([]string{parent})
	if err != nil {
		t.Fatal(err)
	}
	after := countAside(parent)
	t.Logf("aside directories of the killed binary: %d before the sweep, %d after; removed %v", before, after, removed)
	if before != 1 || after != 0 || len(removed) != 1 || removed[0] != killed {
		t.Errorf("the killed binary's aside directory %s: %d before the sweep, %d after (removed %v), want 1 and 0", killed, before, after, removed)
	}
	for _, p := range keep {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("the sweep removed %s, not a gone test process's aside directory: %v", p, err)
		}
	}
}

// countAside counts the aside directories in parent whose process is gone.
func countAside(parent string) int {
	ents, _ := os.ReadDir(parent)
	n := 0
	for _, e := range ents {
		if pid, start, ok := asideOwner(e.Name()); ok && e.IsDir() {
			if now, running := procStart(pid); !running || now != start {
				n++
			}
		}
	}
	return n
}

// TestRunSweepsBeforeFlagsParsed: Binaries.Run sweeps before m.Run parses the test
// flags. A first version said what it removed only under testing.Verbose, which
// panics before the flags are parsed ("Verbose called before Parse"): every test
// binary started while a gone process's aside directory was left exited 2. A test
// binary (this one, running no test) started with one planted in /tmp exits 0.
func TestRunSweepsBeforeFlagsParsed(t *testing.T) {
	if os.Getenv(envAsideHelper) != "" {
		t.Skip("in the helper")
	}
	stale := filepath.Join("/tmp", asidePrefix+"999999999-1-planted")
	if err := os.Mkdir(stale, 0o700); err != nil && !os.IsExist(err) {
		t.Fatal(err)
	}
	defer os.RemoveAll(stale)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), envAsideHelper+"=") // set empty: the helper test skips
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("a test binary started beside a gone process's aside directory: %v\n%s", err, out)
	}
	t.Logf("%s", out)
}
