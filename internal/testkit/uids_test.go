package testkit

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

// TestUIDsNeverShared: a block another holder locked (another test process's: a lock of
// another open file, as flock tells them apart) is skipped, as is one a process runs
// as (a killed run's leftover); what the test got is locked until it ends.
func TestUIDsNeverShared(t *testing.T) {
	dir := t.TempDir()
	block := func(k int) uint32 { return uint32(uidBase + k*uidBlockSize) }
	other, err := os.OpenFile(filepath.Join(dir, strconv.Itoa(int(block(7)))), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	if err := syscall.Flock(int(other.Fd()), syscall.LOCK_EX); err != nil {
		t.Fatal(err)
	}
	want := 8
	if os.Geteuid() == 0 {
		left := exec.Command("/bin/sleep", "60")
		u := block(8) + 5
		left.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: u, Gid: u}}
		if err := left.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { _ = left.Process.Kill(); _ = left.Wait() }()
		want = 9
	}
	var got uint32
	t.Run("reserve", func(t *testing.T) {
		got = uidsFrom(t, dir, 7)
		if got != block(want) {
			t.Fatalf("got the block from %d, want %d (block %d)", got, block(want), want)
		}
		probe, err := os.Open(filepath.Join(dir, strconv.Itoa(int(got))))
		if err != nil {
			t.Fatal(err)
		}
		defer probe.Close()
		if err := syscall.Flock(int(probe.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err == nil {
			t.Fatal("the block is not locked while its test runs")
		}
	})
	if again := uidsFrom(t, dir, want); again != block(want) {
		t.Errorf("after its test ended the block was not free again: got %d, want %d", again, block(want))
	}
}
