package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/control"
)

// minFreeBytes is the space a deploy needs in the state and runtime directories: a
// workload's records (pid, start time, exit tombstone) are written there, and a
// workload started without them could not be adopted after a restart.
const minFreeBytes = 4 << 20

// How often diskWatch looks: every diskCheckEvery, every diskRecheckEvery while a
// directory cannot be written, so the node bids again within about a second of space
// coming back.
const (
	diskCheckEvery   = 5 * time.Second
	diskRecheckEvery = time.Second
)

// diskProbeName is the file a check writes and removes in each directory.
const diskProbeName = ".nexd-write-probe"

// diskWatch keeps whether the node's local state (its state and runtime directories)
// can be written: each has minFreeBytes free and takes a small write. A deploy checks
// it itself (placeCheck); a bid only loads the last outcome (bidRefusal: an atomic
// load), which loop keeps fresh. Before, the node bid with a full state directory
// (with external NATS nothing else told it), won the auction and refused the deploy.
type diskWatch struct {
	log  *slog.Logger
	dirs map[string]string // what ("state directory") -> path; "" skipped

	failing atomic.Pointer[diskFailure] // nil while every directory can be written

	mu   sync.Mutex // orders the outcomes' stores and their log lines
	last time.Time  // when it last looked
}

type diskFailure struct {
	err   error
	since time.Time
}

func newDiskWatch(log *slog.Logger, dirs map[string]string) *diskWatch {
	return &diskWatch{log: log, dirs: dirs}
}

// look checks every directory once (sorted, so the first failure named is stable):
// its free space, and with probe its small write.
func (w *diskWatch) look(probe bool) error {
	whats := make([]string, 0, len(w.dirs))
	for what := range w.dirs {
		whats = append(whats, what)
	}
	sort.Strings(whats)
	for _, what := range whats {
		dir := w.dirs[what]
		if dir == "" {
			continue
		}
		var st syscall.Statfs_t
		if err := syscall.Statfs(dir, &st); err != nil {
			continue // not created yet: the start itself will say what is wrong
		}
		if free := st.Bavail * uint64(st.Bsize); free < minFreeBytes {
			return fmt.Errorf("disk full: the node's %s has %d KiB free (a deploy needs %d KiB); new workloads are refused until space is freed", what, free>>10, minFreeBytes>>10)
		}
		if !probe {
			continue
		}
		if err := probeWrite(dir); err != nil {
			return fmt.Errorf("the node's %s cannot be written (%w); new workloads are refused until it can", what, err)
		}
	}
	return nil
}

// probeWrite writes a byte to a file in dir and removes it.
func probeWrite(dir string) error {
	path := filepath.Join(dir, diskProbeName)
	err := os.WriteFile(path, []byte{'x'}, 0o600)
	if rmErr := os.Remove(path); err == nil && rmErr != nil && !errors.Is(rmErr, os.ErrNotExist) {
		err = rmErr
	}
	return err
}

// check looks now (with the write), keeps the outcome and logs a change; it returns
// the failure.
func (w *diskWatch) check() error {
	err := w.look(true)
	w.record(err)
	return err
}

// record keeps err (nil: every directory can be written) as the last outcome and logs
// a change.
func (w *diskWatch) record(err error) {
	now := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.last = now
	was := w.failing.Load()
	switch {
	case err == nil && was != nil:
		w.failing.Store(nil)
		w.log.Info("local state can be written again: bidding again", "was", was.err.Error(), "for", now.Sub(was.since).Round(time.Millisecond))
	case err != nil && was == nil:
		w.failing.Store(&diskFailure{err: err, since: now})
		w.log.Warn("local state cannot be written: the node does not bid until it can", "err", err)
	case err != nil && was.err.Error() != err.Error():
		w.failing.Store(&diskFailure{err: err, since: was.since})
	}
}

// placeCheck is a deploy's check: the free space now (a deploy's records are about to
// be written; a failure it finds stops the bids at once too), and the loop's last
// write. The write itself stays off the deploy's path: a file made and removed there
// costs 0.05–1 ms on ext4 after many deletions (docs/performance-notes.md, Deploy and placement), and a
// passing statfs must not end a failure only a write finds.
func (w *diskWatch) placeCheck() error {
	err := w.look(false)
	if err != nil {
		w.record(err)
	} else if f := w.failing.Load(); f != nil {
		err = f.err
	}
	if err != nil {
		w.log.Warn("deploy refused: local state cannot be written", "err", err)
	}
	return err
}

// bidRefusal is why the node does not bid now: the last look found a directory that
// cannot be written. Asked before every bid: one atomic load.
func (w *diskWatch) bidRefusal() error {
	if f := w.failing.Load(); f != nil {
		return fmt.Errorf("since %s: %w", f.since.UTC().Format(time.RFC3339), f.err)
	}
	return nil
}

// status is what STATUS shows.
func (w *diskWatch) status() *control.LocalStateStatus {
	w.mu.Lock()
	checked := w.last
	w.mu.Unlock()
	if checked.IsZero() {
		return nil
	}
	st := &control.LocalStateStatus{State: "ok", Checked: checked.UTC()}
	if f := w.failing.Load(); f != nil {
		st.State, st.Detail, st.Since = "unwritable", f.err.Error()+"; the node does not bid", f.since.UTC()
	}
	return st
}

// loop looks every diskCheckEvery (every diskRecheckEvery while failing) until ctx ends.
func (w *diskWatch) loop(ctx context.Context) {
	for {
		every := diskCheckEvery
		if w.check() != nil {
			every = diskRecheckEvery
		}
		if !sleepCtx(ctx, every) {
			return
		}
	}
}

// sleepCtx waits d; false if ctx ended first.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
