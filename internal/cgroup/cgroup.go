// Package cgroup places processes in Linux control groups, applies resource limits and
// kills whole process trees. It is shared by the supervisor in nexd and by the native
// nexlet (a separate child process), so it depends on neither.
//
// Three modes: "v2" (a delegated subtree of the unified hierarchy), "v1" (writable legacy
// hierarchies for memory, cpu and pids) and "none" (no usable cgroups: processes still
// start, in their own process group, and limits are not enforced).
package cgroup

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/dirlock"
)

// Mode says how limits are enforced.
type Mode string

// The modes.
const (
	ModeV2   Mode = "v2"   // delegated subtree of the unified (cgroup2) hierarchy
	ModeV1   Mode = "v1"   // writable legacy hierarchies
	ModeNone Mode = "none" // no cgroups: limits are not enforced
)

// SupervisorGroup is the child of a v2 root that the supervising process moves itself
// into (the kernel forbids processes in inner cgroups once controllers are enabled).
const SupervisorGroup = "supervisor"

// v1GroupName is the group created in each v1 hierarchy when the place is detected.
const v1GroupName = "nexd"

// Limits for a group. Zero fields are unset (no limit).
type Limits struct {
	MemoryMax  int64   // bytes; v2 memory.max, v1 memory.limit_in_bytes
	MemoryHigh int64   // bytes; v2 memory.high, v1 memory.soft_limit_in_bytes
	CPUMax     float64 // fraction of CPUs (0.5 = half a CPU, 2 = two CPUs)
	PidsMax    int64   // number of tasks
}

// Validate reports a negative or out-of-range limit.
func (l Limits) Validate() error {
	switch {
	case l.MemoryMax < 0:
		return fmt.Errorf("memory_max %d is negative", l.MemoryMax)
	case l.MemoryHigh < 0:
		return fmt.Errorf("memory_high %d is negative", l.MemoryHigh)
	case l.CPUMax < 0:
		return fmt.Errorf("cpu_max %g is negative", l.CPUMax)
	case l.CPUMax > 0 && cpuQuota(l.CPUMax) < minCPUQuota:
		return fmt.Errorf("cpu_max %g is below the kernel minimum of %g", l.CPUMax, float64(minCPUQuota)/cpuPeriod)
	case l.PidsMax < 0:
		return fmt.Errorf("pids_max %d is negative", l.PidsMax)
	}
	return nil
}

const (
	cpuPeriod   = 100000 // µs, the kernel default period
	minCPUQuota = 1000   // µs, the kernel minimum quota
)

func cpuQuota(frac float64) int64 { return int64(frac*cpuPeriod + 0.5) }

// Stats of a group (and its descendants).
type Stats struct {
	MemoryCurrent uint64 // bytes
	MemoryMax     uint64 // the memory limit in bytes, 0 when there is none
	CPUUsageNsec  uint64
	Pids          int // tasks (threads) where the pids controller counts them, else processes
	OOMKills      int
}

// The controllers nexd enforces limits with.
var limitControllers = []string{"memory", "cpu", "pids"}

// hier is one cgroup hierarchy as seen by a Manager: the unified one in v2 mode, one
// legacy hierarchy in v1 mode.
type hier struct {
	Name  string `json:"name"`  // "unified", or the v1 controllers, e.g. "memory" or "cpu,cpuacct"
	Mount string `json:"mount"` // mount point of the hierarchy
	Root  string `json:"root"`  // absolute path of the manager's root in this hierarchy
	// base is the outermost directory whose cgroup.subtree_control this manager writes
	// (v2); for an attached manager it is its own root.
	base string
}

func (h hier) has(ctrl string) bool {
	return slices.Contains(strings.Split(h.Name, ","), ctrl)
}

// fsOps are the directory operations; tests on a fake cgroupfs replace them, because a
// real cgroupfs creates the interface files on mkdir and removes them on rmdir.
type fsOps struct {
	mkdir func(path string) error
	rmdir func(path string) error
	write func(path, val string) error
}

func realOps() fsOps {
	return fsOps{
		mkdir: func(p string) error { return os.Mkdir(p, 0o755) },
		rmdir: func(p string) error { return unix.Rmdir(p) },
		write: writeFile,
	}
}

// Manager owns a subtree of cgroups. A Manager is safe for concurrent use.
type Manager struct {
	mode  Mode
	log   *slog.Logger
	hiers []hier
	ops   fsOps
	// rel is the manager's place below the root it was made with (Sub's joins): in none
	// mode, with no directory, what names its groups in errors.
	rel string

	// threadSetup runs on every OS thread that forks into a v1 group (SetThreadSetup).
	threadSetup func() error
	// table: what a forking thread's own table needs, found once (ownTable).
	table struct {
		once sync.Once
		keep []int // the poller's descriptors (pollerFDs)
		err  error // why a thread cannot have one
		// warn: why threads keep the process's table is logged once, not by each
		// forking thread (the moved ones logged nothing).
		warn sync.Once
	}

	// ownRoot: the root is the group detection made for this node alone (nexd/<node
	// id> on v1), nobody else's to keep: RemoveOwnRoot may remove it.
	ownRoot bool

	// killListed, when set (tests), is called by Group.Kill with the processes a
	// listing found, before it kills them.
	killListed func(pids []int)

	// byNumber: that process groups outside the cgroups are killed by number
	// (procid.Pgrp.ByNumber: a kernel before 6.9) is logged once, not at each kill.
	byNumber sync.Once

	mu       sync.Mutex
	enforced []string
	reason   string
}

// SetThreadSetup sets what runs on each OS thread that forks a process into a v1 group
// (a thread of a ForkPool, or the thread Start moves into the group) before it forks;
// such threads never return to the Go scheduler, so per-thread state set by f (such
// as no_new_privs, which the child inherits) stays with them. Call it before any Start
// or NewForkPool.
func (m *Manager) SetThreadSetup(f func() error) { m.threadSetup = f }

// Disabled returns a manager in none mode: processes start in their own process group
// with Pdeathsig, and no limit is enforced, for the given reason.
func Disabled(reason string, log *slog.Logger) *Manager {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Manager{mode: ModeNone, log: log, reason: reason, ops: realOps()}
}

// Mode says how limits are enforced.
func (m *Manager) Mode() Mode { return m.mode }

// Enforced lists the controllers whose limits are applied, e.g. [memory cpu pids].
func (m *Manager) Enforced() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.enforced)
}

// Reason says why limits are not (all) enforced; "" if they are.
func (m *Manager) Reason() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reason
}

// Path is the manager's root directory (the memory hierarchy's in v1 mode), "" in none mode.
func (m *Manager) Path() string {
	if len(m.hiers) == 0 {
		return ""
	}
	for _, h := range m.hiers {
		if h.has("memory") {
			return h.Root
		}
	}
	return m.hiers[0].Root
}

func (m *Manager) isEnforced(ctrl string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Contains(m.enforced, ctrl)
}

// spec is the serialised form of a Manager, handed to a child process.
type spec struct {
	Mode        Mode     `json:"mode"`
	Hierarchies []hier   `json:"hierarchies,omitempty"`
	Enforced    []string `json:"enforced,omitempty"`
	Reason      string   `json:"reason,omitempty"`
}

// Spec describes this manager's subtree (mode and paths) so that a child process can
// manage cgroups below it with Attach.
func (m *Manager) Spec() string {
	m.mu.Lock()
	s := spec{Mode: m.mode, Hierarchies: m.hiers, Enforced: m.enforced, Reason: m.reason}
	m.mu.Unlock()
	b, err := json.Marshal(s)
	if err != nil { // cannot happen: plain strings
		panic(err)
	}
	return string(b)
}

// Attach reopens a subtree described by Spec, typically in a child process. The attached
// manager never touches anything above its root.
func Attach(specText string, log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	var s spec
	if err := json.Unmarshal([]byte(specText), &s); err != nil {
		return nil, fmt.Errorf("cgroup spec %q: %w", specText, err)
	}
	m := &Manager{mode: s.Mode, log: log, enforced: s.Enforced, reason: s.Reason, ops: realOps()}
	switch s.Mode {
	case ModeNone:
		return m, nil
	case ModeV1, ModeV2:
	default:
		return nil, fmt.Errorf("cgroup spec: unknown mode %q", s.Mode)
	}
	if len(s.Hierarchies) == 0 {
		return nil, fmt.Errorf("cgroup spec: mode %s without hierarchies", s.Mode)
	}
	for _, h := range s.Hierarchies {
		if !filepath.IsAbs(h.Root) || !filepath.IsAbs(h.Mount) {
			return nil, fmt.Errorf("cgroup spec: hierarchy %q: root %q and mount %q must be absolute", h.Name, h.Root, h.Mount)
		}
		if fi, err := os.Stat(h.Root); err != nil {
			return nil, fmt.Errorf("cgroup spec: hierarchy %q: %w", h.Name, err)
		} else if !fi.IsDir() {
			return nil, fmt.Errorf("cgroup spec: hierarchy %q: %s is not a directory", h.Name, h.Root)
		}
		h.base = h.Root
		m.hiers = append(m.hiers, h)
	}
	return m, nil
}

// Sub returns a manager rooted at rel below this one (e.g. "nexlets/native"). The
// directory is made by the first Create below it.
func (m *Manager) Sub(rel string) *Manager {
	m.mu.Lock()
	defer m.mu.Unlock()
	s := &Manager{mode: m.mode, log: m.log, ops: m.ops, enforced: slices.Clone(m.enforced), reason: m.reason, threadSetup: m.threadSetup,
		rel: joinRel("/", filepath.Join(m.rel, rel))}
	for _, h := range m.hiers {
		h.Root = joinRel(h.Root, rel)
		s.hiers = append(s.hiers, h)
	}
	return s
}

// joinRel joins rel below root so that the result never leaves root.
func joinRel(root, rel string) string {
	return filepath.Join(root, filepath.Clean("/"+rel))
}

// EnterSupervisor moves the calling process (and any other process left in the root)
// into <root>/supervisor and enables the enforced controllers in the root's
// cgroup.subtree_control: the kernel allows controllers only on cgroups without
// processes of their own. It is a no-op in v1 and none mode. On error the manager stays
// usable, with the controllers that could not be enabled no longer enforced.
//
// In v2 mode it first calls settle (when not nil), which returns once no other writer
// can still put a process into the root: one whose write lands between the moves and
// the enabling puts its process back, and the enabling fails (EBUSY). The pre-started
// nexlet's cgroup warm-up is such a writer (docs/performance-notes.md, Ready;
// TestV2EnterSupervisorWaitsForSettle). A settle error is returned, wrapped, with
// nothing done.
func (m *Manager) EnterSupervisor(ctx context.Context, settle func(context.Context) error) error {
	if m.mode != ModeV2 {
		return nil
	}
	if settle != nil {
		if err := settle(ctx); err != nil {
			return fmt.Errorf("before entering the supervisor cgroup: %w", err)
		}
	}
	h := m.hiers[0]
	sup := filepath.Join(h.Root, SupervisorGroup)
	if err := m.mkdirIfMissing(sup); err != nil {
		return m.degrade(nil, fmt.Errorf("create supervisor cgroup: %w", err))
	}
	self := os.Getpid()
	if err := m.ops.write(filepath.Join(sup, "cgroup.procs"), itoa(self)); err != nil {
		return m.degrade(nil, fmt.Errorf("move nexd (pid %d) into %s: %w", self, sup, err))
	}
	// Anything else still in the root (a helper started before us) must leave it too.
	pids, _ := readPids(filepath.Join(h.Root, "cgroup.procs"))
	for _, pid := range pids {
		if pid == self {
			continue
		}
		if err := m.ops.write(filepath.Join(sup, "cgroup.procs"), itoa(pid)); err != nil && !errors.Is(err, unix.ESRCH) {
			m.log.Warn("cannot move process out of the cgroup root", "pid", pid, "cgroup", h.Root, "err", err)
		}
	}
	ok, err := m.enableControllers(h.Root, m.Enforced())
	if err != nil {
		return m.degrade(ok, err)
	}
	return nil
}

// WithoutControllers makes the manager enforce no limits from now on, for reason:
// groups are still made, processes placed in them and killed by group, but no
// controller is enabled and no limit written. Call it before EnterSupervisor.
func (m *Manager) WithoutControllers(reason string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.enforced = nil
	m.reason = reason
}

// degrade narrows the enforced controllers to keep (nil: none) after err, logs it and
// returns err.
func (m *Manager) degrade(keep []string, err error) error {
	m.mu.Lock()
	var lost []string
	for _, c := range m.enforced {
		if !slices.Contains(keep, c) {
			lost = append(lost, c)
		}
	}
	m.enforced = slices.DeleteFunc(m.enforced, func(c string) bool { return !slices.Contains(keep, c) })
	if len(lost) > 0 {
		r := fmt.Sprintf("%s limits not enforced: %v", strings.Join(lost, ","), err)
		if m.reason != "" {
			r = m.reason + "; " + r
		}
		m.reason = r
	}
	m.mu.Unlock()
	m.log.Warn("cgroup limits degraded", "mode", m.mode, "lost", lost, "err", err)
	return err
}

// Create makes (or reuses) the group <root>/<rel>, enabling the enforced controllers on
// every directory from the manager's base down to the group's parent, and applies l.
// Unset limits are reset to "no limit", so a reused group never keeps old values.
//
// If the group exists but a limit could not be written, Create returns the usable group
// together with the error: the caller may run the process without that limit.
func (m *Manager) Create(rel string, l Limits) (*Group, error) {
	if err := l.Validate(); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", rel, err)
	}
	g := m.group(rel)
	var fatal bool
	var err error
	switch m.mode {
	case ModeNone:
		return g, nil
	case ModeV2:
		fatal, err = m.createV2(g, l)
	default:
		fatal, err = m.createV1(g, l)
	}
	if fatal {
		return nil, err
	}
	if err != nil {
		return g, fmt.Errorf("cgroup %s: limits not (all) applied: %w", g.Path(), err)
	}
	return g, nil
}

func (m *Manager) mkdirIfMissing(p string) error {
	if err := m.ops.mkdir(p); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("mkdir %s: %w", p, err)
	}
	return nil
}

// CleanupStale kills every process in the <root>/<rel> subtree and removes its cgroups,
// as left behind by an earlier run that crashed. With rel "" the root itself is kept and
// only its descendants are removed. A missing subtree is not an error.
func (m *Manager) CleanupStale(rel string) (killed int, err error) {
	if m.mode == ModeNone {
		return 0, nil
	}
	g := m.group(rel)
	pids, err := g.Procs()
	if err != nil {
		return 0, err
	}
	// Kill reads the whole subtree again; with no process in it (nothing left by a
	// crash: the usual start) none can appear, and that read was nexd's start's before
	// the native nexlet's fork.
	if len(pids) > 0 {
		if err := g.Kill(); err != nil {
			return 0, err
		}
	}
	if filepath.Clean("/"+rel) != "/" {
		return len(pids), g.Remove()
	}
	var errs []error
	for _, h := range g.hiers {
		ents, err := os.ReadDir(h.Root)
		if err != nil {
			if !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, err)
			}
			continue
		}
		for _, e := range ents {
			if e.IsDir() {
				errs = append(errs, m.removeTree(filepath.Join(h.Root, e.Name())))
			}
		}
	}
	return len(pids), errors.Join(errs...)
}

// RemoveOwnRoot removes the root detection made for this node (nexd/<node id> on v1)
// with the empty groups below it, for a clean stop: stopped nodes would otherwise leave
// one empty root each behind. It removes nothing while a process runs below the root
// (workloads left for live_restore, or a nexlet still running) and returns an error
// saying so; it never kills. An explicit cgroup_root (the admin's) and a v2 root (the
// service's own cgroup) are never removed. Call it while holding Lock.
func (m *Manager) RemoveOwnRoot() error {
	if m.mode != ModeV1 || !m.ownRoot {
		return nil
	}
	pids, err := m.group("").Procs()
	if err != nil {
		return err
	}
	if len(pids) > 0 {
		return fmt.Errorf("cgroup root %s still holds %d processes (pids %v): left in place", m.Path(), len(pids), pids)
	}
	// A process that enters meanwhile makes the rmdir fail (EBUSY): it is never lost.
	var errs []error
	for _, h := range m.hiers {
		errs = append(errs, m.removeTree(h.Root))
	}
	return errors.Join(errs...)
}

// ErrRootInUse is wrapped by Lock when another process holds the root.
var ErrRootInUse = errors.New("cgroup root is in use by another nexd")

// Lock takes an exclusive hold on the root (a flock on its directory, dirlock's lock
// on a directory itself: cgroupfs holds no lock file), so it ends with the process
// however it ends. Only the holder may treat what is under the root as its own, kill
// it at start-up and remove it; a second node on the same root gets ErrRootInUse.
// inherited, when above 2, is the root's lock this process kept across its re-exec
// (KeepAcrossExec), taken back (dirlock.Inherit), so no other process held the root
// in between. In none mode there is nothing to hold: the Lock is nil (Release is a
// no-op), and an inherited lock is let go.
func (m *Manager) Lock(inherited int) (*dirlock.Lock, error) {
	if m.mode == ModeNone || len(m.hiers) == 0 {
		dirlock.Forget(inherited, "")
		return nil, nil
	}
	dir := m.Path()
	var l *dirlock.Lock
	var err error
	if inherited > 2 {
		l, err = dirlock.Inherit(inherited, dir, "", 0o755)
	} else {
		l, err = dirlock.Hold(dir, "", 0o755)
	}
	if errors.Is(err, dirlock.ErrHeld) {
		return nil, fmt.Errorf("%w: %s is held by another process; give each node its own cgroup_root", ErrRootInUse, dir)
	}
	if err != nil {
		return nil, fmt.Errorf("cgroup root: %w", err)
	}
	if n := l.Note(); n != "" {
		m.log.Warn("a local user held the cgroup root's lock", "detail", n)
	}
	return l, nil
}
