package earlynexlet

import (
	"errors"
	"os"
)

// WarmAttach moves process pid into the cgroup it is already in, in the first writable
// cgroup hierarchy that holds it: a move that changes nothing but takes the kernel's
// cgroup_threadgroup_rwsem, whose first writer after a quiet while waits out an RCU
// grace period. The moves that follow within about one more grace period (the
// pre-started nexlet's into its groups) are then quick. It is cgroup.WarmAttach
// without that package's imports (strings, fmt: see the package comment), so that
// nexd's package init can begin it.
func WarmAttach(pid int) error {
	mounts, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	cg, err := os.ReadFile("/proc/" + itoa(pid) + "/cgroup")
	if err != nil {
		return err
	}
	for line := range lines(mounts) {
		dir, ok := groupDir(line, cg)
		if !ok {
			continue
		}
		return os.WriteFile(dir+"/cgroup.procs", []byte(itoa(pid)), 0)
	}
	return errors.New("no writable cgroup mount holds the process's cgroup")
}

// groupDir is the directory of the process's cgroup (cg: /proc/<pid>/cgroup) under the
// mount of one /proc/self/mountinfo line, when that is a writable cgroup mount that
// holds it.
func groupDir(mount, cg []byte) (string, bool) {
	// id parent major:minor root point options [optional...] - fstype source superoptions
	f := fields(mount)
	if len(f) < 10 {
		return "", false
	}
	root, point, opts := f[3], f[4], f[5]
	sep := -1
	for i := 6; i < len(f); i++ {
		if f[i] == "-" {
			sep = i
			break
		}
	}
	if sep < 0 || sep+1 >= len(f) {
		return "", false
	}
	if opts == "ro" || len(opts) > 3 && opts[:3] == "ro," {
		return "", false
	}
	fstype := f[sep+1]
	var super string
	if sep+3 < len(f) {
		super = f[sep+3]
	}
	for l := range lines(cg) {
		// hierarchy-id:controllers:path
		a := indexByte(l, ':')
		if a < 0 {
			continue
		}
		b := indexByte(l[a+1:], ':')
		if b < 0 {
			continue
		}
		ctrls, path := string(l[a+1:a+1+b]), string(l[a+2+b:])
		var match bool
		switch fstype {
		case "cgroup2":
			match = ctrls == "" && string(l[:a]) == "0"
		case "cgroup":
			match = ctrls != "" && anyCommon(ctrls, super)
		}
		if !match {
			continue
		}
		if root != "/" {
			if len(path) < len(root) || path[:len(root)] != root || len(path) > len(root) && path[len(root)] != '/' {
				return "", false
			}
			path = path[len(root):]
		}
		if path == "/" {
			path = ""
		}
		return point + path, true
	}
	return "", false
}

// anyCommon says whether the comma-separated lists a and b share an item.
func anyCommon(a, b string) bool {
	for x := range splitComma(a) {
		for y := range splitComma(b) {
			if x == y {
				return true
			}
		}
	}
	return false
}

func splitComma(s string) func(func(string) bool) {
	return func(yield func(string) bool) {
		for s != "" {
			i := indexByte([]byte(s), ',')
			if i < 0 {
				yield(s)
				return
			}
			if !yield(s[:i]) {
				return
			}
			s = s[i+1:]
		}
	}
}

func lines(b []byte) func(func([]byte) bool) {
	return func(yield func([]byte) bool) {
		for len(b) > 0 {
			i := indexByte(b, '\n')
			if i < 0 {
				yield(b)
				return
			}
			if !yield(b[:i]) {
				return
			}
			b = b[i+1:]
		}
	}
}

func fields(b []byte) []string {
	var out []string
	for len(b) > 0 {
		i := indexByte(b, ' ')
		if i < 0 {
			out = append(out, string(b))
			break
		}
		if i > 0 {
			out = append(out, string(b[:i]))
		}
		b = b[i+1:]
	}
	return out
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// itoa formats a pid.
func itoa(n int) string {
	if n == 0 {
		return "0"
	}
	var b [20]byte
	i := len(b)
	for n > 0 {
		i--
		b[i] = byte('0' + n%10)
		n /= 10
	}
	return string(b[i:])
}
