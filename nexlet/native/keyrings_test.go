package native

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestClearKeyringsKeepsDumpable: the thread's change of credentials makes the kernel
// mark the process non-dumpable (its /proc/<pid> root's alone, readable by a nexd
// without CAP_SYS_PTRACE no more); clearKeyrings makes it dumpable again, and leaves
// the thread root's.
func TestClearKeyringsKeepsDumpable(t *testing.T) {
	needRoot(t)
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 1 {
		t.Skipf("this test process is not dumpable to begin with (%d, %v)", d, err)
	}
	uid := testkit.UIDs(t, 1)
	for range 3 {
		if err := clearKeyrings(uid); err != nil {
			t.Fatal(err)
		}
	}
	if d, err := unix.PrctlRetInt(unix.PR_GET_DUMPABLE, 0, 0, 0, 0); err != nil || d != 1 {
		t.Errorf("dumpable after clearKeyrings: %d, %v; want 1", d, err)
	}
	if u, e := unix.Getuid(), unix.Geteuid(); u != 0 || e != 0 {
		t.Errorf("uid %d euid %d after clearKeyrings, want root's", u, e)
	}
}
