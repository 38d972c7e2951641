package testkit

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// FreezeV1 freezes pid in a cgroup v1 freezer group of the test's own: a frozen process
// takes no signal, SIGKILL included, until it is thawed (it waits in D state, as one in
// an uninterruptible sleep on a hung mount does). It returns thaw, which also runs when
// t ends and removes the group. The test is skipped without a v1 freezer hierarchy.
func FreezeV1(t testing.TB, pid int) (thaw func()) {
	t.Helper()
	root := "/sys/fs/cgroup/freezer"
	if _, err := os.Stat(filepath.Join(root, "freezer.state")); err != nil {
		if _, err := os.Stat(filepath.Join(root, "cgroup.procs")); err != nil {
			t.Skip("no cgroup v1 freezer hierarchy at " + root)
		}
	}
	// Named for this process: a test binary killed while the group holds pid frozen
	// leaves both, and the next test binary's sweep thaws, kills and removes them.
	dir := filepath.Join(root, OwnedName(t, fmt.Sprintf("nexd-test-freeze-%d-", pid)))
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skipf("freezer group: %v", err)
	}
	state := filepath.Join(dir, "freezer.state")
	thaw = func() {
		_ = os.WriteFile(state, []byte("THAWED"), 0)
		WaitFor(5*time.Second, func() bool { return os.Remove(dir) == nil || os.IsNotExist(os.Remove(dir)) })
	}
	t.Cleanup(thaw)
	if err := os.WriteFile(filepath.Join(dir, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(state, []byte("FROZEN"), 0); err != nil {
		t.Fatal(err)
	}
	Eventually(t, "the freezer group frozen", func() bool {
		b, err := os.ReadFile(state)
		return err == nil && strings.TrimSpace(string(b)) == "FROZEN"
	})
	return thaw
}
