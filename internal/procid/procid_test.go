package procid

import (
	"errors"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"testing"
)

// TestIdentity: a live child is named by pid and start time; the name survives a
// round trip, stops being alive once the child is reaped, and a different start time
// (a reused pid) is never taken for it.
func TestIdentity(t *testing.T) {
	cmd := exec.Command("/bin/sleep", "30")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	id, err := Of(cmd.Process.Pid)
	if err != nil || id.Start == 0 {
		t.Fatalf("Of: %+v %v", id, err)
	}
	back, err := Parse(id.Format())
	if err != nil || back != id {
		t.Fatalf("Parse(Format) = %+v, %v; want %+v", back, err, id)
	}
	if !id.Alive() {
		t.Fatal("a running child is not alive")
	}
	if (ID{PID: id.PID, Start: id.Start + 1}).Alive() {
		t.Fatal("another start time was taken for the same process (pid reuse)")
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if id.Alive() {
		t.Fatal("a reaped child is still alive")
	}
	for _, bad := range []string{"", "12", "x 1", "1 2", "12 y"} {
		if _, err := Parse(bad); err == nil {
			t.Errorf("Parse(%q) accepted", bad)
		}
	}
	if st, err := ReadStat(os.Getpid()); err != nil || st.PPID != os.Getppid() {
		t.Errorf("ReadStat(self) = %+v, %v", st, err)
	}
}

// TestExitRecords: what WriteExit stores, ReadExit returns; none is ErrNoExit.
func TestExitRecords(t *testing.T) {
	dir := t.TempDir()
	id := ID{PID: 4242, Start: 99}
	if _, err := ReadExit(dir, id); !errors.Is(err, ErrNoExit) {
		t.Fatalf("no record: %v", err)
	}
	ws := syscall.WaitStatus(7 << 8) // exit status 7
	want := ExitOf(ws)
	if want.Code != 7 || want.Reason != "exited with code 7" {
		t.Fatalf("ExitOf = %+v", want)
	}
	if err := WriteExit(dir, id, want); err != nil {
		t.Fatal(err)
	}
	got, err := ReadExit(dir, id)
	if err != nil || got != want {
		t.Fatalf("ReadExit = %+v, %v; want %+v", got, err, want)
	}
	if k := ExitOf(syscall.WaitStatus(syscall.SIGKILL)); k.Code != 137 || k.Reason != "killed by signal killed" {
		t.Errorf("ExitOf(SIGKILL) = %+v", k)
	}
	RemoveExit(dir, id)
	if _, err := ReadExit(dir, id); !errors.Is(err, ErrNoExit) {
		t.Errorf("after RemoveExit: %v", err)
	}
}

// TestWriteExitConcurrent: nexd's reaper, its orphan watcher and the nexlet may record
// the same end at the same moment. Every writer succeeds, the record reads back, and
// no temporary file is left; with one temporary name shared by all, a writer's rename
// found its file renamed away by another ("no such file or directory").
func TestWriteExitConcurrent(t *testing.T) {
	dir := t.TempDir()
	id := ID{PID: 4242, Start: 99}
	for round := range 50 {
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		for range 4 {
			wg.Go(func() { errs <- WriteExit(dir, id, Exit{Code: 3, Reason: "exited with code 3"}) })
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if e, err := ReadExit(dir, id); err != nil || e.Code != 3 {
			t.Fatalf("round %d: read back %+v, %v", round, e, err)
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 {
		t.Errorf("files left in the exits dir: %v", ents)
	}
}

// TestTicksBoundChildStart: a child forked after Ticks() started at that tick or later,
// and no later than Ticks() read after the fork (the bound the native nexlet puts on a
// relaunch forked before its pid record); its real uid reads back, also as a zombie.
func TestTicksBoundChildStart(t *testing.T) {
	for range 20 {
		before, err := Ticks()
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("/bin/true")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		id, idErr := Of(cmd.Process.Pid) // a zombie at worst: not yet waited for
		uid, uidErr := UID(cmd.Process.Pid)
		after, _ := Ticks()
		_ = cmd.Wait()
		if idErr != nil || uidErr != nil {
			t.Fatal(idErr, uidErr)
		}
		if id.Start < before || id.Start > after {
			t.Fatalf("child started at tick %d, outside [%d, %d]", id.Start, before, after)
		}
		if uid != uint32(os.Getuid()) {
			t.Fatalf("child's uid %d, want %d", uid, os.Getuid())
		}
	}
}

// TestExitRecordUID: an exit record keeps the uid its writer knew, and lists by id; one
// without (the nexlet's, an older nexd's) reads back without.
func TestExitRecordUID(t *testing.T) {
	dir := t.TempDir()
	a, b := ID{PID: 100, Start: 7}, ID{PID: 101, Start: 8}
	if err := WriteExit(dir, a, Exit{Code: 3, Reason: "exited with code 3", UID: 61234, HasUID: true}); err != nil {
		t.Fatal(err)
	}
	if err := WriteExit(dir, b, Exit{Code: 0, Reason: "exited"}); err != nil {
		t.Fatal(err)
	}
	if e, err := ReadExit(dir, a); err != nil || e != (Exit{Code: 3, Reason: "exited with code 3", UID: 61234, HasUID: true}) {
		t.Fatalf("read %+v, %v", e, err)
	}
	if e, err := ReadExit(dir, b); err != nil || e != (Exit{Code: 0, Reason: "exited"}) {
		t.Fatalf("read %+v, %v", e, err)
	}
	ids, err := ListExits(dir)
	if err != nil || len(ids) != 2 {
		t.Fatalf("listed %v, %v", ids, err)
	}
}
