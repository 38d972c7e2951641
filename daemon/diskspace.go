package daemon

import (
	"fmt"
	"log/slog"
	"syscall"
)

// minFreeBytes is the space a deploy needs in the state and runtime directories: a
// workload's records (pid, start time, exit tombstone) are written there, and a
// workload started without them could not be adopted after a restart.
const minFreeBytes = 4 << 20

// diskSpace returns the node's placement check: an error when one of dirs (empty ones
// skipped) has less than minFreeBytes free. Clients see which kind of directory; the
// path itself goes to the node's log only.
func diskSpace(log *slog.Logger, dirs map[string]string) func() error {
	return func() error {
		for what, dir := range dirs {
			if dir == "" {
				continue
			}
			var st syscall.Statfs_t
			if err := syscall.Statfs(dir, &st); err != nil {
				continue // not created yet: the start itself will say what is wrong
			}
			if free := st.Bavail * uint64(st.Bsize); free < minFreeBytes {
				log.Warn("deploy refused: disk full", "dir", dir, "free_bytes", free, "needed_bytes", minFreeBytes)
				return fmt.Errorf("disk full: the node's %s has %d KiB free (a deploy needs %d KiB); new workloads are refused until space is freed", what, free>>10, minFreeBytes>>10)
			}
		}
		return nil
	}
}
