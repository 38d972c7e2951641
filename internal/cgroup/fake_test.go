package cgroup

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// fakeFS imitates the cgroup2 kernel interface in a temp directory, for the v2 code paths
// this machine cannot run: mkdir creates the interface files of the controllers enabled
// in the parent, cgroup.procs writes move a pid, cgroup.subtree_control enforces the
// "no internal processes" rule, and cgroup.kill sends SIGKILL to the subtree.
type fakeFS struct {
	t     *testing.T
	mount string

	mu     sync.Mutex
	writes []string // "relpath=value", in order
}

var fakeCtrlFiles = map[string]map[string]string{
	"memory": {"memory.max": "max\n", "memory.high": "max\n", "memory.current": "0\n",
		"memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\noom_group_kill 0\n"},
	"cpu":  {"cpu.max": "max 100000\n", "cpu.stat": "usage_usec 0\nuser_usec 0\nsystem_usec 0\n"},
	"pids": {"pids.max": "max\n", "pids.current": "0\n"},
}

// newFakeFS makes a cgroup2 "mount" with the delegated group <mount>/<delegated>.
func newFakeFS(t *testing.T, delegated string, controllers string) *fakeFS {
	t.Helper()
	f := &fakeFS{t: t, mount: filepath.Join(t.TempDir(), "cg2")}
	must(t, os.MkdirAll(f.mount, 0o755))
	// the hierarchy root: no cgroup.type, like the kernel's
	f.files(f.mount, map[string]string{"cgroup.controllers": controllers + "\n",
		"cgroup.subtree_control": "", "cgroup.procs": ""})
	dir := f.mount
	for p := range strings.SplitSeq(delegated, "/") {
		dir = filepath.Join(dir, p)
		must(t, os.Mkdir(dir, 0o755))
		f.populate(dir, strings.Fields(controllers))
		must(t, os.WriteFile(filepath.Join(dir, "cgroup.controllers"), []byte(controllers+"\n"), 0o644))
	}
	return f
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func (f *fakeFS) files(dir string, m map[string]string) {
	for k, v := range m {
		must(f.t, os.WriteFile(filepath.Join(dir, k), []byte(v), 0o644))
	}
}

func (f *fakeFS) populate(dir string, ctrls []string) {
	f.files(dir, map[string]string{"cgroup.controllers": strings.Join(ctrls, " ") + "\n",
		"cgroup.subtree_control": "", "cgroup.procs": "", "cgroup.kill": "", "cgroup.type": "domain\n",
		"cgroup.events": "populated 0\nfrozen 0\n"})
	for _, c := range ctrls {
		f.files(dir, fakeCtrlFiles[c])
	}
}

func (f *fakeFS) ops() fsOps {
	return fsOps{mkdir: f.mkdir, rmdir: f.rmdir, write: f.write}
}

func (f *fakeFS) mkdir(p string) error {
	if err := os.Mkdir(p, 0o755); err != nil {
		return err
	}
	f.populate(p, fields(filepath.Join(filepath.Dir(p), "cgroup.subtree_control")))
	return nil
}

func (f *fakeFS) rmdir(p string) error {
	if ents, _ := os.ReadDir(p); slices.ContainsFunc(ents, func(e os.DirEntry) bool { return e.IsDir() }) {
		return syscall.EBUSY
	}
	if pids, _ := readPids(filepath.Join(p, "cgroup.procs")); len(pids) > 0 {
		return syscall.EBUSY
	}
	return os.RemoveAll(p)
}

func fields(p string) []string {
	b, _ := os.ReadFile(p)
	return strings.Fields(string(b))
}

func (f *fakeFS) rel(p string) string {
	r, err := filepath.Rel(f.mount, p)
	if err != nil {
		f.t.Fatal(err)
	}
	return r
}

func (f *fakeFS) log() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.writes)
}

func (f *fakeFS) write(p, val string) error {
	f.mu.Lock()
	f.writes = append(f.writes, f.rel(p)+"="+val)
	f.mu.Unlock()
	if _, err := os.Stat(p); err != nil {
		return err // like the kernel: no file, no controller
	}
	dir := filepath.Dir(p)
	switch filepath.Base(p) {
	case "cgroup.procs":
		pid, err := strconv.Atoi(strings.TrimSpace(val))
		if err != nil {
			return syscall.EINVAL
		}
		if syscall.Kill(pid, 0) != nil {
			return syscall.ESRCH
		}
		if len(fields(filepath.Join(dir, "cgroup.subtree_control"))) > 0 {
			return syscall.EBUSY // no internal processes
		}
		f.removePid(pid)
		return appendLine(p, val)
	case "cgroup.subtree_control":
		cur := fields(p)
		avail := fields(filepath.Join(dir, "cgroup.controllers"))
		for _, tok := range strings.Fields(val) {
			c := tok[1:]
			switch tok[0] {
			case '+':
				if !slices.Contains(avail, c) {
					return syscall.ENOENT
				}
				if pids, _ := readPids(filepath.Join(dir, "cgroup.procs")); len(pids) > 0 && dir != f.mount {
					return syscall.EBUSY
				}
				if !slices.Contains(cur, c) {
					cur = append(cur, c)
					ents, _ := os.ReadDir(dir)
					for _, e := range ents {
						if e.IsDir() {
							child := filepath.Join(dir, e.Name())
							f.files(child, fakeCtrlFiles[c])
							cc := append(fields(filepath.Join(child, "cgroup.controllers")), c)
							f.files(child, map[string]string{"cgroup.controllers": strings.Join(cc, " ") + "\n"})
						}
					}
				}
			case '-':
				cur = slices.DeleteFunc(cur, func(x string) bool { return x == c })
			default:
				return syscall.EINVAL
			}
		}
		return os.WriteFile(p, []byte(strings.Join(cur, " ")+"\n"), 0o644)
	case "cgroup.kill":
		dirs, err := subtreeDirs(dir)
		if err != nil {
			return err
		}
		for _, d := range dirs {
			pids, _ := readPids(filepath.Join(d, "cgroup.procs"))
			for _, pid := range pids {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
			must(f.t, os.WriteFile(filepath.Join(d, "cgroup.procs"), nil, 0o644))
		}
		return nil
	}
	return os.WriteFile(p, []byte(val), 0o644)
}

func (f *fakeFS) removePid(pid int) {
	dirs, _ := subtreeDirs(f.mount)
	for _, d := range dirs {
		pp := filepath.Join(d, "cgroup.procs")
		pids, err := readPids(pp)
		if err != nil || !slices.Contains(pids, pid) {
			continue
		}
		pids = slices.DeleteFunc(pids, func(x int) bool { return x == pid })
		var b strings.Builder
		for _, x := range pids {
			b.WriteString(strconv.Itoa(x) + "\n")
		}
		must(f.t, os.WriteFile(pp, []byte(b.String()), 0o644))
	}
}

func appendLine(p, val string) error {
	fh, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		return err
	}
	_, err = fh.WriteString(strings.TrimSpace(val) + "\n")
	if cerr := fh.Close(); err == nil {
		err = cerr
	}
	return err
}

// fakeHost writes /proc/self/cgroup and mountinfo fixtures.
func fakeHost(t *testing.T, selfCgroup, mountinfo string) host {
	d := t.TempDir()
	h := host{selfCgroup: filepath.Join(d, "cgroup"), mountinfo: filepath.Join(d, "mountinfo")}
	must(t, os.WriteFile(h.selfCgroup, []byte(selfCgroup), 0o644))
	must(t, os.WriteFile(h.mountinfo, []byte(mountinfo), 0o644))
	return h
}

func cg2Mountinfo(point string) string {
	return "41 31 0:38 / " + point + " rw,relatime - cgroup2 cgroup2 rw\n"
}
