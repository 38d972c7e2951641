// Package privfile writes files that hold secrets: created fresh with mode 0600 under a
// random name in the target's directory, then renamed over the target, so the secret is
// never written into a file someone else prepared (a stale or planted "<path>.tmp" with a
// looser mode, or a symlink) and readers see either the old or the new file whole.
// The file and then its directory are synced, so the new file is there after a crash.
package privfile

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
)

// Write atomically replaces path with data, readable and writable by the owner only.
func Write(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := SyncDir(filepath.Dir(path)); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	return nil
}

// SyncDir syncs dir itself: a file synced and renamed into it is durable only once the
// directory entry is (a crash before that can leave the old file or none).
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync directory: %w", err)
	}
	if err := errors.Join(d.Sync(), d.Close()); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
