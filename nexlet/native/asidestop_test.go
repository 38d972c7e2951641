package native

import (
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
)

// TestSweepAsideStopsWithThePool: the uid pool's filler removes, at the nexlet's start,
// the leftover trees a killed nexlet had moved aside (sweepAside). It did so before its
// first refill and with os.RemoveAll, deaf to the stop: a large tree held the first
// uids leased ahead back, and the nexlet's shutdown (stopPool) waited for the whole
// tree. Now the sweep runs beside the refills and ends at the stop between two
// entries; what is left keeps its name and the next start goes on with it.
//
// The order is the test's, not the machine's: the sweep is held at its first entry
// (sweepingAside) until the stop. Then the pool must have leased a uid ahead meanwhile
// (before: no refill while the sweep ran), and once stopPool returned every entry of
// the 3,030 must still be there (before: the sweep, once let go, removed them all
// before the stop was looked at). The next start's sweep removes the tree.
func TestSweepAsideStopsWithThePool(t *testing.T) {
	lo := testkit.UIDs(t, 2)
	// A directory of root's as a killed nexlet's release left it: named by a gone process.
	sleep := exec.Command("sleep", "60")
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	dead, err := procid.Of(sleep.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	_ = sleep.Process.Kill()
	_ = sleep.Wait()
	// In the test's own directory in /tmp (ownAsideRoots), which both its nexlets
	// sweep: in /tmp itself, any other nexlet's start on the host (another test
	// binary's, an e2e node's) removed it while the test filled it ("open
	// .../tree/d2/96: no such file or directory"; 47 of 60 runs beside e2e nodes).
	roots := ownAsideRoots(t)
	killed := filepath.Join(roots["/tmp"], asideName+dead.String()+"-test")
	if err := os.Mkdir(killed, 0o700); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(killed) })
	const dirs, files = 30, 100
	for i := range dirs {
		d := filepath.Join(killed, "tree", "d"+strconv.Itoa(i))
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		for j := range files {
			if err := os.WriteFile(filepath.Join(d, strconv.Itoa(j)), []byte("left"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	entries := func() int { return countEntries(killed) }
	all := entries()
	if want := 1 + 1 + dirs + dirs*files; all != want {
		t.Fatalf("made %d entries, want %d", all, want)
	}

	log := slog.New(slog.DiscardHandler)
	begun := make(chan struct{})
	close(begun)
	newPool := func() *users {
		t.Helper()
		us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: lo, UIDMax: lo + 1})
		us.asideRoots = roots
		return us
	}

	us := newPool()
	sweeping := make(chan struct{})
	var once sync.Once
	us.sweepingAside = func() {
		once.Do(func() { close(sweeping) })
		<-us.pool.stop // held until the nexlet's shutdown
	}
	us.startPool(2, "", false, begun, log)
	select {
	case <-sweeping:
	case <-time.After(30 * time.Second):
		us.stopPool()
		t.Fatal("the sweep never came to the killed nexlet's tree")
	}
	if !testkit.WaitFor(10*time.Second, func() bool { return len(us.pool.ch) > 0 }) {
		us.stopPool()
		t.Fatal("no uid leased ahead while the sweep of leftovers ran: the first refill waits for it")
	}
	us.stopPool()
	if n := entries(); n != all {
		t.Fatalf("%d of %d entries of the killed nexlet's tree left when the nexlet's stop returned: the sweep did not end at the stop", n, all)
	}

	// The next start goes on with it.
	next := newPool()
	next.startPool(2, "", false, begun, log)
	gone := testkit.WaitFor(30*time.Second, func() bool {
		_, err := os.Lstat(killed)
		return os.IsNotExist(err)
	})
	next.stopPool()
	if !gone {
		t.Fatalf("the next start did not remove the rest of the killed nexlet's tree: %d entries left", entries())
	}
}

// countEntries counts the entries of the tree at root, root included (0 once it is gone).
func countEntries(root string) int {
	n := 0
	_ = filepath.WalkDir(root, func(_ string, _ fs.DirEntry, err error) error {
		if err == nil {
			n++
		}
		return nil
	})
	return n
}
