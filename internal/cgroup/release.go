package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
)

// ReleaseForRestart makes the cgroup v2 directory dir (a systemd unit's delegated
// cgroup whose main process is gone while workloads still run below it) accept a
// process again: the kernel refuses processes in a cgroup that has controllers enabled
// in cgroup.subtree_control, so systemd could not start the next main process there
// (status 219/CGROUP). Controllers are disabled bottom-up in dir and every cgroup below
// it; the processes keep running, without their limits until the next nexd re-applies
// them as it adopts them. It returns how many subtree_control files it changed.
func ReleaseForRestart(dir string) (int, error) {
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
