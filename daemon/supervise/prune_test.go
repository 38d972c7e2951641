package supervise

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
)

// TestPruneExitsKeepsLiveReserves: nexd's start prunes exit records older than a day
// (no nexlet came for them). An exit record's reserve (procid.ReserveExit) is a running
// workload's, which may run for longer: it is kept while its process runs, and pruned
// like a record once it does not.
func TestPruneExitsKeepsLiveReserves(t *testing.T) {
	dir := t.TempDir()
	self, err := procid.Of(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	gone := procid.ID{PID: self.PID, Start: self.Start + 1} // this pid, another start: not running
	old := time.Now().Add(-25 * time.Hour)
	for _, id := range []procid.ID{self, gone} {
		if err := procid.ReserveExit(dir, id, ""); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(procid.ReservePath(dir, id), old, old); err != nil {
			t.Fatal(err)
		}
	}
	if err := procid.WriteExit(dir, procid.ID{PID: 4242, Start: 1}, procid.Exit{Code: 3, Reason: "exited with code 3"}); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(filepath.Join(dir, "4242-1"), old, old); err != nil {
		t.Fatal(err)
	}
	pruneExits(dir)
	if _, err := os.Stat(procid.ReservePath(dir, self)); err != nil {
		t.Errorf("a running workload's reserve, a day old: %v, want it kept", err)
	}
	for _, p := range []string{procid.ReservePath(dir, gone), filepath.Join(dir, "4242-1")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s, a day old, its process gone: %v, want it pruned", filepath.Base(p), err)
		}
	}
}
