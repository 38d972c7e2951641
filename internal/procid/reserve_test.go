package procid

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestWriteExitIntoReserveOnFullFS: on a full file system an exit record needs no new
// space when its reserve was made ahead (ReserveExit): WriteExit writes into it in place
// and renames it to the record, which reads back whole; without a reserve the write
// fails (ENOSPC), as every record's did before. Three writers of the same end at once
// (nexd's reaper, its orphan watch, the nexlet) leave one whole record, and none of
// them fails: the first's record stands for all.
func TestWriteExitIntoReserveOnFullFS(t *testing.T) {
	dir := testkit.SmallFS(t, "1m")
	reserved := []ID{{PID: 4242, Start: 7}, {PID: 4343, Start: 8}}
	for _, id := range reserved {
		if err := ReserveExit(dir, id, ""); err != nil {
			t.Fatal(err)
		}
	}
	testkit.FillFS(t, dir)
	e := Exit{Code: 5, Reason: "exited with code 5", UID: 61234, HasUID: true}
	if err := WriteExit(dir, reserved[0], e); err != nil {
		t.Fatalf("an exit record into its reserve on a full file system: %v", err)
	}
	if got, err := ReadExit(dir, reserved[0]); err != nil || got != e {
		t.Fatalf("the record read back: %+v, %v; want %+v", got, err, e)
	}
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Go(func() { errs[i] = WriteExit(dir, reserved[1], Exit{Code: 137, Reason: "killed by signal killed"}) })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		if err == nil {
			ok++
		}
	}
	if got, err := ReadExit(dir, reserved[1]); err != nil || got.Code != 137 || got.Reason != "killed by signal killed" || ok != len(errs) {
		t.Fatalf("three writers of one end on a full file system: %+v, %v (writes %v)", got, err, errs)
	}
	if _, err := os.Lstat(ReservePath(dir, reserved[1])); !os.IsNotExist(err) {
		t.Errorf("the reserve after the record: %v, want it gone (renamed)", err)
	}
	if err := WriteExit(dir, ID{PID: 4444, Start: 9}, e); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("an exit record without a reserve on a full file system: %v, want ENOSPC", err)
	}
	if ids, _ := ListExits(dir); len(ids) != 2 {
		t.Errorf("exit records listed %v, want the 2 reserved ones (not the reserves)", ids)
	}
}

// BenchmarkReserveExit is what a launch adds to the deploy path for its exit record's
// reserve on tmpfs (nexd's runtime directory). moved: the rename of the one its ready
// record directory holds, here each op renamed there and back (two renames: the
// deploy's share is half). made, without one: a new file written, and removed (the
// removal is a run's end's, off the deploy's path).
func BenchmarkReserveExit(b *testing.B) {
	dir := testkit.SmallFS(b, "64m")
	b.Run("moved", func(b *testing.B) {
		from := filepath.Join(dir, "ready")
		_ = os.Remove(from) // an earlier run's (-count)
		if err := MakeReserve(from); err != nil {
			b.Fatal(err)
		}
		id := ID{PID: 1000, Start: 1}
		for b.Loop() {
			if err := ReserveExit(dir, id, from); err != nil {
				b.Fatal(err)
			}
			if err := os.Rename(ReservePath(dir, id), from); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("made", func(b *testing.B) {
		id := ID{PID: 1001, Start: 1}
		for b.Loop() {
			if err := ReserveExit(dir, id, ""); err != nil {
				b.Fatal(err)
			}
			DropReserve(dir, id)
		}
	})
}
