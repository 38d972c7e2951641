package cgroup

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// host names the kernel files detection reads; tests point them at fixtures.
type host struct {
	selfCgroup string // /proc/self/cgroup
	mountinfo  string // /proc/self/mountinfo
}

var procHost = host{selfCgroup: "/proc/self/cgroup", mountinfo: "/proc/self/mountinfo"}

// Detect picks the mode and the subtree root and logs once which limits are not
// enforced and why. Without root it detects:
//   - v2: the process's own cgroup (from /proc/self/cgroup) on a cgroup2 mount, if its
//     cgroup.procs and cgroup.subtree_control are writable and it is not the host's
//     root cgroup; a process already in "<x>/supervisor" (systemd DelegateSubgroup=)
//     uses <x> as the root;
//   - v1: writable memory/cpu/pids hierarchies, with the group "nexd" in each;
//   - none otherwise.
//
// v2 wins if it has the memory, cpu and pids controllers, otherwise the mode that
// enforces more of them. root (--cgroup-root) overrides detection: a directory on
// cgroup2 is used as the v2 root; a directory inside a v1 hierarchy gives that relative
// path in every v1 hierarchy; any other directory (such as /sys/fs/cgroup on a v1 host)
// is searched for v1 hierarchy mounts below it, with the group "nexd" in each. Missing
// directories are created. Only an unusable root is an error: detection without a root
// falls back to none mode.
func Detect(root string, log *slog.Logger) (*Manager, error) {
	return detect(procHost, root, "", log)
}

// DetectFor is Detect for one node of possibly several on the host: a detected v1 root
// is "nexd/<instance>" in each hierarchy rather than the host-wide "nexd", so nodes
// never share (and never clean up) each other's cgroups. Hold the root with Lock.
func DetectFor(root, instance string, log *slog.Logger) (*Manager, error) {
	return detect(procHost, root, instance, log)
}

func detect(hst host, root, instance string, log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mounts, err := readMounts(hst.mountinfo)
	if err != nil {
		log.Warn("cgroups disabled: cannot read mounts", "err", err)
		return Disabled(fmt.Sprintf("cannot read mounts: %v", err), log), nil
	}
	var m *Manager
	if root != "" {
		m, err = explicitRoot(mounts, root, log)
		if err != nil {
			return nil, err
		}
	} else {
		m = autoDetect(hst, mounts, instance, log)
	}
	reason := m.Reason()
	// Debug: the caller logs the mode it ends up with (nexd's "cgroups", after entering
	// its supervisor cgroup), which an Info here repeated on every start.
	log.Debug("cgroup mode", "mode", m.mode, "root", m.Path(), "enforced", m.Enforced())
	if reason != "" {
		log.Warn("resource limits not (all) enforced", "mode", m.mode, "reason", reason)
	}
	return m, nil
}

type mount struct {
	root, point, fstype string
	superOpts           []string
	readOnly            bool
}

func readMounts(path string) ([]mount, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	return parseMountinfo(b), nil
}

// parseMountinfo reads the cgroup and cgroup2 mounts from /proc/self/mountinfo.
func parseMountinfo(b []byte) []mount {
	var out []mount
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f := strings.Fields(pre)
		p := strings.Fields(post)
		if len(f) < 6 || len(p) < 3 || (p[0] != "cgroup" && p[0] != "cgroup2") {
			continue
		}
		out = append(out, mount{
			root:      unescapeMount(f[3]),
			point:     unescapeMount(f[4]),
			fstype:    p[0],
			superOpts: strings.Split(p[2], ","),
			readOnly:  slices.Contains(strings.Split(f[5], ","), "ro"),
		})
	}
	return out
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo paths.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			var v byte
			valid := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					valid = false
					break
				}
				v = v*8 + (c - '0')
			}
			if valid {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// parseSelfCgroup returns the unified ("0::") path and the v1 paths by controller.
func parseSelfCgroup(b []byte) (unified string, v1 map[string]string) {
	v1 = map[string]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[0] == "0" && parts[1] == "" {
			unified = parts[2]
			continue
		}
		for c := range strings.SplitSeq(parts[1], ",") {
			v1[c] = parts[2]
		}
	}
	return unified, v1
}

// v2Candidate finds the process's own v2 cgroup; reason explains a failure.
func v2Candidate(hst host, mounts []mount) (h hier, ctrls []string, reason string) {
	b, err := os.ReadFile(hst.selfCgroup)
	if err != nil {
		return h, nil, fmt.Sprintf("cannot read %s: %v", hst.selfCgroup, err)
	}
	own, _ := parseSelfCgroup(b)
	if own == "" {
		return h, nil, "no cgroup v2 membership in " + hst.selfCgroup
	}
	var mnt *mount
	for i := range mounts {
		mm := &mounts[i]
		if mm.fstype != "cgroup2" || mm.readOnly || !pathWithin(own, mm.root) {
			continue
		}
		if mnt == nil || mm.point == "/sys/fs/cgroup" {
			mnt = mm
		}
	}
	if mnt == nil {
		return h, nil, "no writable cgroup2 mount holds own cgroup " + own
	}
	dir := filepath.Join(mnt.point, strings.TrimPrefix(own, mnt.root))
	return v2At(mnt.point, dir, true)
}

// v2At checks dir as a v2 root on the cgroup2 mount at mountPoint; auto is set when dir
// is the process's own cgroup.
func v2At(mountPoint, dir string, auto bool) (h hier, ctrls []string, reason string) {
	if auto && filepath.Base(dir) == SupervisorGroup && writable(filepath.Join(filepath.Dir(dir), "cgroup.subtree_control")) {
		dir = filepath.Dir(dir) // started by systemd in DelegateSubgroup=supervisor
	}
	if auto {
		// The host's root cgroup has no cgroup.type; nexd must not manage it.
		if _, err := os.Stat(filepath.Join(dir, "cgroup.type")); err != nil {
			return h, nil, fmt.Sprintf("own cgroup %s is the root of the cgroup v2 hierarchy, which nexd does not manage (run under systemd with Delegate=yes, or pass --cgroup-root)", dir)
		}
	}
	for _, f := range []string{"cgroup.procs", "cgroup.subtree_control"} {
		if !writable(filepath.Join(dir, f)) {
			return h, nil, fmt.Sprintf("cgroup v2 %s is not writable (not delegated?)", filepath.Join(dir, f))
		}
	}
	avail, err := os.ReadFile(filepath.Join(dir, "cgroup.controllers"))
	if err != nil {
		return h, nil, fmt.Sprintf("cannot read cgroup v2 controllers: %v", err)
	}
	have := strings.Fields(string(avail))
	for _, c := range limitControllers {
		if slices.Contains(have, c) {
			ctrls = append(ctrls, c)
		}
	}
	h = hier{Name: "unified", Mount: mountPoint, Root: dir, base: dir}
	if missing := minus(limitControllers, ctrls); len(missing) > 0 {
		reason = fmt.Sprintf("cgroup v2 controllers %s are not available in %s", strings.Join(missing, ","), filepath.Join(dir, "cgroup.controllers"))
	}
	return h, ctrls, reason
}

// v1Hierarchies finds writable v1 hierarchies for the limit controllers (and cpuacct,
// for CPU usage), under the mount points accepted by within.
func v1Hierarchies(mounts []mount, within func(point string) bool) (hs []hier, ctrls []string, reason string) {
	var problems []string
	for _, c := range append(slices.Clone(limitControllers), "cpuacct") {
		var mnt *mount
		for i := range mounts {
			if mounts[i].fstype == "cgroup" && slices.Contains(mounts[i].superOpts, c) && within(mounts[i].point) {
				mnt = &mounts[i]
				break
			}
		}
		if mnt == nil {
			if c != "cpuacct" {
				problems = append(problems, "no cgroup v1 "+c+" hierarchy")
			}
			continue
		}
		if mnt.readOnly || !writable(mnt.point) {
			if c != "cpuacct" {
				problems = append(problems, fmt.Sprintf("cgroup v1 %s hierarchy %s is not writable", c, mnt.point))
			}
			continue
		}
		if c != "cpuacct" {
			ctrls = append(ctrls, c)
		}
		if slices.ContainsFunc(hs, func(h hier) bool { return h.Mount == mnt.point }) {
			continue // co-mounted, e.g. cpu,cpuacct
		}
		var names []string
		for _, o := range mnt.superOpts {
			if slices.Contains(limitControllers, o) || o == "cpuacct" {
				names = append(names, o)
			}
		}
		hs = append(hs, hier{Name: strings.Join(names, ","), Mount: mnt.point})
	}
	return hs, ctrls, strings.Join(problems, "; ")
}

func autoDetect(hst host, mounts []mount, instance string, log *slog.Logger) *Manager {
	h2, c2, r2 := v2Candidate(hst, mounts)
	if h2.Root != "" && len(c2) == len(limitControllers) {
		return &Manager{mode: ModeV2, log: log, hiers: []hier{h2}, enforced: c2, ops: realOps()}
	}
	h1, c1, r1 := v1Hierarchies(mounts, func(string) bool { return true })
	if len(c1) > 0 && len(c1) > len(c2) {
		for i := range h1 {
			h1[i].Root = filepath.Join(h1[i].Mount, v1GroupName, instance)
			h1[i].base = h1[i].Root
		}
		m := &Manager{mode: ModeV1, log: log, hiers: h1, enforced: c1, reason: r1, ops: realOps(), ownRoot: true}
		if err := m.mkdirV1Roots(); err != nil {
			return Disabled(fmt.Sprintf("cgroup v1: %v; %s", err, r2), log)
		}
		return m
	}
	if h2.Root != "" {
		return &Manager{mode: ModeV2, log: log, hiers: []hier{h2}, enforced: c2, reason: r2, ops: realOps()}
	}
	return Disabled(joinReasons(r2, r1), log)
}

func explicitRoot(mounts []mount, root string, log *slog.Logger) (*Manager, error) {
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("--cgroup-root %q: must be an absolute path", root)
	}
	root = filepath.Clean(root)
	var fs unix.Statfs_t
	probe := root
	for {
		err := unix.Statfs(probe, &fs)
		if err == nil {
			break
		}
		if !errors.Is(err, unix.ENOENT) || probe == "/" {
			return nil, fmt.Errorf("--cgroup-root %s: %w", root, err)
		}
		probe = filepath.Dir(probe)
	}
	switch fs.Type {
	case unix.CGROUP2_SUPER_MAGIC:
		if err := os.MkdirAll(root, 0o755); err != nil {
			return nil, fmt.Errorf("--cgroup-root %s: %w", root, err)
		}
		mnt := longestMount(mounts, root, "cgroup2")
		if mnt == nil {
			return nil, fmt.Errorf("--cgroup-root %s: no cgroup2 mount holds it", root)
		}
		h, ctrls, reason := v2At(mnt.point, root, false)
		if h.Root == "" {
			return nil, fmt.Errorf("--cgroup-root %s: %s", root, reason)
		}
		return &Manager{mode: ModeV2, log: log, hiers: []hier{h}, enforced: ctrls, reason: reason, ops: realOps()}, nil
	case unix.CGROUP_SUPER_MAGIC:
		mnt := longestMount(mounts, probe, "cgroup")
		if mnt == nil {
			return nil, fmt.Errorf("--cgroup-root %s: no cgroup v1 mount holds it", root)
		}
		rel, _ := filepath.Rel(mnt.point, root)
		hs, ctrls, reason := v1Hierarchies(mounts, func(string) bool { return true })
		return v1Manager(hs, ctrls, reason, rel, root, log)
	default:
		hs, ctrls, reason := v1Hierarchies(mounts, func(p string) bool { return pathWithin(p, root) })
		return v1Manager(hs, ctrls, reason, v1GroupName, root, log)
	}
}

func v1Manager(hs []hier, ctrls []string, reason, rel, root string, log *slog.Logger) (*Manager, error) {
	if len(ctrls) == 0 {
		return nil, fmt.Errorf("--cgroup-root %s: no writable cgroup v1 hierarchy (%s)", root, reason)
	}
	for i := range hs {
		hs[i].Root = filepath.Join(hs[i].Mount, rel)
		hs[i].base = hs[i].Root
	}
	m := &Manager{mode: ModeV1, log: log, hiers: hs, enforced: ctrls, reason: reason, ops: realOps()}
	if err := m.mkdirV1Roots(); err != nil {
		return nil, fmt.Errorf("--cgroup-root %s: %w", root, err)
	}
	return m, nil
}

func (m *Manager) mkdirV1Roots() error {
	for _, h := range m.hiers {
		if err := os.MkdirAll(h.Root, 0o755); err != nil {
			return fmt.Errorf("create %s: %w", h.Root, err)
		}
	}
	return nil
}

func longestMount(mounts []mount, p, fstype string) *mount {
	var best *mount
	for i := range mounts {
		mm := &mounts[i]
		if mm.fstype == fstype && pathWithin(p, mm.point) && (best == nil || len(mm.point) > len(best.point)) {
			best = mm
		}
	}
	return best
}

// pathWithin reports whether p is dir or below it.
func pathWithin(p, dir string) bool {
	if dir == "/" {
		return strings.HasPrefix(p, "/")
	}
	return p == dir || strings.HasPrefix(p, dir+"/")
}

func writable(p string) bool { return unix.Access(p, unix.W_OK) == nil }

func minus(a, b []string) []string {
	var out []string
	for _, x := range a {
		if !slices.Contains(b, x) {
			out = append(out, x)
		}
	}
	return out
}

func joinReasons(rs ...string) string {
	var out []string
	for _, r := range rs {
		if r != "" {
			out = append(out, r)
		}
	}
	return strings.Join(out, "; ")
}
