package native

import (
	"errors"
	"os"
	"path/filepath"
	"strings"

	"github.com/nexd-project/nexd/internal/randid"
)

// The nexlet's memory of the starts it took is its record directories
// (<runtime>/procs/<id>) and its stop records: a start it took is held (a record) until
// the node removes the workload, or remembered as stopped. <runtime>/procs/.memory
// names that memory, a random id made when there is none: it lives with the records,
// so a runtime directory that is gone (a reboot, a tmpfs emptied) takes it along and the
// next nexlet makes a new one. A stop at nexd's or the nexlet's shutdown (nexd_keep)
// removes its workload's record without remembering the stop, so it drops the name
// first: the records from then on are not all the starts taken under it.
//
// The node records the name with each deploy (StartWorkloadRequest.Memory). A stored job
// whose start it never saw answered (Started), which this nexlet does not hold and which
// was recorded under the name it registers with, never reached it (its nexd died
// between the record and the send), and the node starts it; under another name it may
// have run, and is not started (a job runs at most once).
const memoryFile = ".memory" // workload ids and ready directories (".ready-") never take it

func (n *Nexlet) memoryPath() string {
	return filepath.Join(n.cfg.RuntimeDir, "procs", memoryFile)
}

// loadMemory returns the memory's name, made and written when there is none; "" when
// it can be neither read nor written (no promise: the node starts no unconfirmed job).
func (n *Nexlet) loadMemory() string {
	b, err := os.ReadFile(n.memoryPath())
	if id := strings.TrimSpace(string(b)); err == nil && validID(id) {
		return id
	}
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		n.log.Warn("the nexlet's memory of its starts is unreadable; a new one is made", "file", n.memoryPath(), "err", err)
	}
	id := randid.New()
	if err := writeAtomic(n.memoryPath(), id); err != nil {
		n.log.Warn("cannot name the nexlet's memory of its starts; a job whose start nexd never saw answered is not started again", "file", n.memoryPath(), "err", err)
		return ""
	}
	return id
}

// dropMemory forgets the memory's name, on disk before a record goes: the next
// nexlet process makes a new one, and this one names none from now on.
func (n *Nexlet) dropMemory() {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.dropMemoryLocked()
}

// dropMemoryLocked is dropMemory with n.mu held.
func (n *Nexlet) dropMemoryLocked() {
	if n.memory == "" {
		return
	}
	if err := os.Remove(n.memoryPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		// This process vouches no more; a next one would read the name again and
		// vouch for a record this stop removes (a file it cannot remove in its own
		// runtime directory: a file system gone bad).
		n.log.Warn("cannot drop the nexlet's memory of its starts", "file", n.memoryPath(), "err", err)
	}
	n.memory = ""
}

// StartsMemory implements nexlet.MemoryKeeper.
func (n *Nexlet) StartsMemory() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.memory
}
