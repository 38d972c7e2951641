package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ReleaseForRestart makes the cgroup v2 directory dir (a systemd unit's delegated
// cgroup whose main process is gone while workloads still run below it) accept a
// process again: the kernel refuses processes in a cgroup that has controllers enabled
// in cgroup.subtree_control, so systemd could not start the next main process there
// (status 219/CGROUP). Controllers are disabled bottom-up in dir and every cgroup below
// it; the processes keep running, without their limits until the next nexd re-applies
// them as it adopts them. It returns how many subtree_control files it changed.
//
// An outliving nexlet may enable controllers below dir again while this runs (a service
// it restarts gets a fresh group), and then dir's own write fails with EBUSY; so the walk
// is repeated until dir itself has none left. Once dir has none, nothing below can enable
// any, so the result holds.
func ReleaseForRestart(dir string) (int, error) {
	total := 0
	var err error
	for range releaseAttempts {
		var n int
		n, err = releaseOnce(dir)
		total += n
		b, rerr := os.ReadFile(filepath.Join(dir, "cgroup.subtree_control"))
		if rerr != nil || !slices.ContainsFunc(strings.Fields(string(b)), enabled) {
			return total, nil
		}
		time.Sleep(releaseRetry)
	}
	return total, err
}

const (
	releaseAttempts = 50
	releaseRetry    = 20 * time.Millisecond
)

// enabled tells an enabled controller in a subtree_control listing ("memory") from what
// a plain file standing in for one in tests keeps after a write ("-memory").
func enabled(field string) bool { return !strings.HasPrefix(field, "-") }

func releaseOnce(dir string) (int, error) {
	dirs, err := subtreeDirs(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return 0, err
	}
	changed := 0
	var errs []error
	for i := len(dirs) - 1; i >= 0; i-- {
		ctl := filepath.Join(dirs[i], "cgroup.subtree_control")
		b, err := os.ReadFile(ctl)
		if err != nil {
			continue
		}
		on := strings.Fields(string(b))
		if len(on) == 0 {
			continue
		}
		if err := writeFile(ctl, "-"+strings.Join(on, " -")); err != nil {
			errs = append(errs, err)
			continue
		}
		changed++
	}
	return changed, errors.Join(errs...)
}
