package daemon

import (
	"fmt"
	"io"

	"github.com/nexd-project/nexd/internal/cgroup"
)

// prestart is `nexd prestart`, the unit's ExecStartPre=. With KillMode=process the
// workloads of an earlier nexd (stopped with live_restore, killed, or aborted by the
// watchdog) still run in the unit's cgroup subtree, whose root has controllers enabled
// for them; cgroup v2 then refuses the next main process there and systemd fails the
// start with 219/CGROUP. systemd 252 has no DelegateSubgroup=, so this releases the
// controllers (the workloads keep running; the new nexd re-applies their limits as it
// adopts them). It never fails the start.
func prestart(stderr io.Writer) int {
	dir, ok := cgroup.UnitCgroupOfControl()
	if !ok {
		return ExitOK
	}
	n, err := cgroup.ReleaseForRestart(dir)
	if err != nil {
		fmt.Fprintf(stderr, "nexd prestart: releasing cgroup controllers of %s: %v\n", dir, err)
		return ExitOK
	}
	if n > 0 {
		fmt.Fprintf(stderr, "nexd prestart: released the cgroup controllers of %s (%d groups) for the new main process; workload limits return as nexd adopts them\n", dir, n)
	}
	return ExitOK
}
