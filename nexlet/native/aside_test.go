package native

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestSweepAsideRemovesKilledNexletsLeftovers: a release moves a uid's leftover tree
// in /tmp aside into a directory of root's (moveLeftovers, under the lease lock) and
// removes it after the lock; a nexlet killed in between left that directory for good
// (454827a: nothing else ever removed a .nexd-leftovers-* directory). The directory
// now names its nexlet (pid and start time), and a nexlet's start removes those whose
// nexlet is gone (sweepAside): one made as if by a killed nexlet is removed, the live
// nexlet's (this test's own, its removal still to come) is not touched, nor is a
// directory of that name that is not root's 0700, nor a symlink of that name.
//
// The tree is a leftover in the host's /tmp; it goes aside, and the test makes its gone
// nexlet's directories, in a directory of the test's own in /tmp (ownAsideRoots), which
// the test's sweep looks in: no other nexlet of the host sweeps them meanwhile, and the
// test's sweep takes none of other tests'.
func TestSweepAsideRemovesKilledNexletsLeftovers(t *testing.T) {
	uid := testkit.UIDs(t, 1)
	roots := ownAsideRoots(t)
	tree, err := os.MkdirTemp("/tmp", "nexd-test-aside-tree-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tree)
	testkit.WriteFile(t, filepath.Join(tree, "left"), "left")
	for _, p := range []string{filepath.Join(tree, "left"), tree} {
		if err := os.Chown(p, int(uid), int(uid)); err != nil {
			t.Fatal(err)
		}
	}
	failed, trees := moveLeftovers("/proc", roots, map[uint32]bool{uid: true})
	if failed[uid] != nil {
		t.Fatal(failed[uid])
	}
	aside := trees.aside["/tmp"]
	if aside == "" || filepath.Dir(aside) != roots["/tmp"] {
		t.Fatalf("the tree was not moved aside into %s: %+v", roots["/tmp"], trees)
	}
	defer os.RemoveAll(aside)
	if !strings.HasPrefix(filepath.Base(aside), asidePrefix()) {
		t.Fatalf("aside directory %s does not name this nexlet (%s)", aside, asidePrefix())
	}

	// This nexlet runs: its aside directory stays for its own removal.
	if _, err := sweepAside(roots.dirs(), nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(aside, filepath.Base(tree), "left")); err != nil {
		t.Fatalf("a live nexlet's aside directory was touched: %v", err)
	}

	// As if its nexlet had been killed before its removal: named by a process gone.
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	dead, err := procid.Of(sleep.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	sleep.Process.Kill()
	sleep.Wait()
	killed := filepath.Join(roots["/tmp"], asideName+dead.String()+"-test")
	if err := os.Rename(aside, killed); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(killed)
	// Not root's 0700, or not a directory: left alone though named by a gone nexlet.
	open := filepath.Join(roots["/tmp"], asideName+dead.String()+"-open")
	if err := os.Mkdir(open, 0o755); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(open)
	target := t.TempDir()
	testkit.WriteFile(t, filepath.Join(target, "kept"), "kept")
	link := filepath.Join(roots["/tmp"], asideName+dead.String()+"-link")
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	defer os.Remove(link)

	n, err := sweepAside(roots.dirs(), nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(killed); !os.IsNotExist(err) {
		t.Errorf("the killed nexlet's aside directory %s is still there (err %v); %d removed", killed, err, n)
	}
	for _, p := range []string{open, link, filepath.Join(target, "kept")} {
		if _, err := os.Lstat(p); err != nil {
			t.Errorf("%s was not left alone: %v", p, err)
		}
	}
}

// TestAsideRootsOutsideTestsAreTheHosts: a nexlet's users (newUsers; Main sets no
// other) move a leftover tree aside beside it, in the host's shared directory, and
// sweep all of those (leftoverDirs), where every native nexlet of the host looks; only
// the tests give theirs directories of their own (ownAsideRoots).
func TestAsideRootsOutsideTestsAreTheHosts(t *testing.T) {
	us, err := newUsers(UserPolicy{LeaseDir: t.TempDir(), UIDMin: 1, UIDMax: 1}, "")
	if err != nil {
		t.Fatal(err)
	}
	if us.asideRoots != nil || !slices.Equal(us.asideRoots.dirs(), leftoverDirs()) || !slices.Contains(us.asideRoots.dirs(), "/tmp") {
		t.Fatalf("a nexlet's aside roots %v sweep %v, want the host's shared directories %v", us.asideRoots, us.asideRoots.dirs(), leftoverDirs())
	}
	uid := testkit.UIDs(t, 1)
	tree, err := os.MkdirTemp("/tmp", "nexd-test-aside-tree-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(tree)
	if err := os.Chown(tree, int(uid), int(uid)); err != nil {
		t.Fatal(err)
	}
	// Named by this process, which runs: no nexlet of the host sweeps it meanwhile.
	failed, trees := moveLeftovers("/proc", us.asideRoots, map[uint32]bool{uid: true})
	if failed[uid] != nil {
		t.Fatal(failed[uid])
	}
	aside := trees.aside["/tmp"]
	if aside != "" {
		defer os.RemoveAll(aside)
	}
	if aside == "" || filepath.Dir(aside) != "/tmp" || !strings.HasPrefix(filepath.Base(aside), asidePrefix()) {
		t.Fatalf("moved aside into %q, want a directory named %s* in /tmp", aside, asidePrefix())
	}
	if failed := trees.remove(nil); len(failed) > 0 {
		t.Fatal(failed)
	}
	if _, err := os.Lstat(aside); !os.IsNotExist(err) {
		t.Errorf("%s left after the removal: %v", aside, err)
	}
}
