// Package uidblock reserves blocks of uids host-wide, for nexlets that lease uids where
// no other nexlet sees their leases (a lease directory of their own, systemd's locks of
// their own): such a nexlet kills every process running as a uid it releases, so its
// uids must be nobody else's. A reservation is a flock on a file per block in one
// directory, held by the reserving process: another process skips the block until the
// file is closed or its holder is gone.
package uidblock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
)

// Band is Blocks blocks of Size uids from Base, reserved in Dir.
type Band struct {
	Base, Size, Blocks int
	Dir                string
}

// Reserve locks the first block, from block start on (wrapping), that no other
// process holds and that used (when not nil) does not call in use, and returns its first
// uid and the file holding the lock: closing it gives the block back.
func (b Band) Reserve(start int, used func(lo int) bool) (int, *os.File, error) {
	if err := os.MkdirAll(b.Dir, 0o700); err != nil {
		return 0, nil, fmt.Errorf("uid block: %w", err)
	}
	for i := range b.Blocks {
		lo := b.Base + (start+i)%b.Blocks*b.Size
		f, err := os.OpenFile(filepath.Join(b.Dir, strconv.Itoa(lo)), os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			return 0, nil, fmt.Errorf("uid block: %w", err)
		}
		if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, syscall.EWOULDBLOCK) {
				continue // another process's
			}
			return 0, nil, fmt.Errorf("uid block: lock %s: %w", f.Name(), err)
		}
		if used != nil && used(lo) {
			f.Close()
			continue
		}
		return lo, f, nil
	}
	return 0, nil, fmt.Errorf("uid block: none of the %d blocks of %d uids from %d is free (%s)", b.Blocks, b.Size, b.Base, b.Dir)
}
