package cgroup

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// killTimeout bounds how long Kill keeps signalling a group that does not empty.
const killTimeout = 10 * time.Second

// Group is one cgroup (in every hierarchy of the manager) and the processes started in it.
type Group struct {
	m     *Manager
	hiers []hier // Root is the group's directory in each hierarchy
	rel   string // below the manager's first root (what names it where it has no directory)

	mu sync.Mutex
	// pgrps: process groups of processes that run outside the cgroup (none mode, or
	// a failed move); Kill and Procs reach them through their group, while it can be
	// shown to be theirs (procid.Pgrp), and drop it once it ended: its number is then
	// free, and may name a stranger's group.
	pgrps []*procid.Pgrp
	// forker is the pool thread waiting in the group (ForkPool.Create) until Start;
	// left is closed once it has left the group, forkerGone when its thread ended.
	forker     *forker
	left       chan struct{}
	forkerGone chan struct{}
	// pooled: a fork pool group renamed to this name and not yet started in, so it
	// holds no process and has seen no OOM kill (only the pool's thread was in it).
	pooled bool
}

// Empty reports whether the group is known to be new and empty (a fork pool group
// nothing was started in yet): a start into it need not look for leftovers or count
// earlier OOM kills.
func (g *Group) Empty() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pooled
}

func (m *Manager) group(rel string) *Group {
	g := &Group{m: m, rel: joinRel("/", filepath.Join(m.rel, rel))}
	for _, h := range m.hiers {
		h.Root = joinRel(h.Root, rel)
		g.hiers = append(g.hiers, h)
	}
	return g
}

// UnlistedMode is the mode of a group whose subgroups are named for what they hold (a
// workload's id): others may pass through it to a group whose name they know (a
// workload reads its own limits, as Go's runtime and the JVM do) but not list it.
const UnlistedMode = 0o711

// Unlist gives g's directory in every hierarchy UnlistedMode, whatever the umask made
// it: the kernel makes cgroups with the mode mkdir asks for less the umask, so under
// umask 022 (nexd started by hand) every workload and local user listed
// workloads/ and read each tenant's workload ids there, and under the package's 0027
// a workload could not reach its own limits.
func (g *Group) Unlist() error {
	var errs []error
	for _, h := range g.hiers {
		if err := os.Chmod(h.Root, UnlistedMode); err != nil {
			errs = append(errs, fmt.Errorf("cgroup %s: %w", h.Root, err))
		}
	}
	return errors.Join(errs...)
}

// Path is the group's directory (the memory hierarchy's in v1 mode), "" in none mode.
func (g *Group) Path() string {
	for _, h := range g.hiers {
		if h.has("memory") || h.Name == "unified" {
			return h.Root
		}
	}
	if len(g.hiers) > 0 {
		return g.hiers[0].Root
	}
	return ""
}

// String names the group in errors: its directory (Path), or in none mode, where it
// has none (and Path is ""), its name below the manager's root and the mode's word for
// where its processes are.
func (g *Group) String() string {
	if p := g.Path(); p != "" {
		return p
	}
	return g.rel + " (none mode: no cgroup, its processes' own process groups)"
}

func (m *Manager) createV2(g *Group, l Limits) (fatal bool, err error) {
	h := m.hiers[0]
	target := g.hiers[0].Root
	enf := m.Enforced()
	rel, err := filepath.Rel(h.base, target)
	if err != nil || strings.HasPrefix(rel, "..") {
		return true, fmt.Errorf("cgroup %s is not below %s", target, h.base)
	}
	var errs []error
	dir := h.base
	if rel != "." {
		for p := range strings.SplitSeq(rel, "/") {
			if err := m.mkdirIfMissing(dir); err != nil {
				return true, err
			}
			if _, err := m.enableControllers(dir, enf); err != nil {
				errs = append(errs, err)
			}
			dir = filepath.Join(dir, p)
		}
	}
	if err := m.mkdirIfMissing(target); err != nil {
		return true, err
	}
	if m.isEnforced("memory") {
		errs = append(errs,
			m.ops.write(filepath.Join(target, "memory.max"), maxOr(l.MemoryMax)),
			m.ops.write(filepath.Join(target, "memory.high"), maxOr(l.MemoryHigh)))
	}
	if m.isEnforced("cpu") {
		v := "max"
		if l.CPUMax > 0 {
			v = fmt.Sprintf("%d %d", cpuQuota(l.CPUMax), cpuPeriod)
		}
		errs = append(errs, m.ops.write(filepath.Join(target, "cpu.max"), v))
	}
	if m.isEnforced("pids") {
		errs = append(errs, m.ops.write(filepath.Join(target, "pids.max"), maxOr(l.PidsMax)))
	}
	return false, errors.Join(errs...)
}

func maxOr(n int64) string {
	if n <= 0 {
		return "max"
	}
	return strconv.FormatInt(n, 10)
}

func minusOneOr(n int64) string {
	if n <= 0 {
		return "-1"
	}
	return strconv.FormatInt(n, 10)
}

// createV1 makes g's directories and writes its limits. A group this call makes, and a
// fork pool group (g.pooled), has the kernel's defaults (no limit), so only the limits
// that differ from them are written there: each write is a file opened, written and
// closed (and a CPU one takes the kernel's bandwidth lock) on the path of a deploy or
// of the nexlet's start. A group that existed already gets every limit written, so
// that none is left from its earlier use.
func (m *Manager) createV1(g *Group, l Limits) (fatal bool, err error) {
	var errs []error
	fresh := false
	write := func(dir, file, val string, dflt bool) {
		if !((g.pooled || fresh) && dflt) {
			errs = append(errs, m.ops.write(filepath.Join(dir, file), val))
		}
	}
	for _, h := range g.hiers {
		fresh = false
		if !g.pooled {
			if err := os.MkdirAll(filepath.Dir(h.Root), 0o755); err != nil {
				return true, fmt.Errorf("create cgroup %s: %w", h.Root, err)
			}
			switch err := os.Mkdir(h.Root, 0o755); {
			case err == nil:
				fresh = true
			case !errors.Is(err, os.ErrExist):
				return true, fmt.Errorf("create cgroup %s: %w", h.Root, err)
			}
		}
		if h.has("memory") && m.isEnforced("memory") {
			write(h.Root, "memory.limit_in_bytes", minusOneOr(l.MemoryMax), l.MemoryMax <= 0)
			// v1 has no memory.high; the soft limit is the closest: reclaim under pressure.
			write(h.Root, "memory.soft_limit_in_bytes", minusOneOr(l.MemoryHigh), l.MemoryHigh <= 0)
		}
		if h.has("cpu") && m.isEnforced("cpu") {
			q := "-1"
			if l.CPUMax > 0 {
				q = strconv.FormatInt(cpuQuota(l.CPUMax), 10)
			}
			write(h.Root, "cpu.cfs_period_us", strconv.Itoa(cpuPeriod), l.CPUMax <= 0)
			write(h.Root, "cpu.cfs_quota_us", q, l.CPUMax <= 0)
		}
		if h.has("pids") && m.isEnforced("pids") {
			write(h.Root, "pids.max", maxOr(l.PidsMax), l.PidsMax <= 0)
		}
	}
	return false, errors.Join(errs...)
}

// Start starts cmd inside the group. In v2 mode the child is born in the cgroup
// (clone3 with CLONE_INTO_CGROUP); where the kernel refuses that it is moved right after
// start. In v1 mode the starting OS thread joins the group for the fork, so the child is
// born there too. In none mode the child gets its own process group and Pdeathsig
// SIGKILL. The child always gets its own process group unless cmd.SysProcAttr asks for
// a session or a foreground group. Failing to place the child in its cgroup never stops
// it from starting: it is logged, and Kill still reaches it through its process group.
func (g *Group) Start(cmd *exec.Cmd) error {
	g.mu.Lock()
	g.pooled = false
	g.mu.Unlock()
	a := &syscall.SysProcAttr{}
	if cmd.SysProcAttr != nil {
		*a = *cmd.SysProcAttr
	}
	cmd.SysProcAttr = a
	if !a.Setsid && !a.Foreground {
		a.Setpgid = true
	}
	switch g.m.mode {
	case ModeV2:
		return g.startV2(cmd, a)
	case ModeV1:
		return g.startV1(cmd)
	default:
		a.Pdeathsig = syscall.SIGKILL
		if err := cmd.Start(); err != nil {
			return err
		}
		g.addPgid(cmd.Process.Pid)
		return nil
	}
}

// Place moves the running process pid, with all its threads, into the group in every
// hierarchy (a write of its pid to each cgroup.procs): for a process started before its
// group existed (supervise.Prestarted). Unlike Start it fails rather than leave the
// process anywhere else: in none mode, and when a hierarchy refuses the move (the error
// names it); the caller then starts the process anew. On v1 and v2 the move takes the
// kernel's cgroup_threadgroup_rwsem, whose first writer waits for an RCU grace period
// (about 10 ms here, BenchmarkV1MoveThread's "by id"): the caller pays it, not the
// process, which keeps running meanwhile.
func (g *Group) Place(pid int) error {
	if g.m.mode == ModeNone || len(g.hiers) == 0 {
		return fmt.Errorf("cgroup %s: no cgroups to place pid %d in", g, pid)
	}
	g.mu.Lock()
	g.pooled = false
	g.mu.Unlock()
	for _, h := range g.hiers {
		if err := g.m.ops.write(filepath.Join(h.Root, "cgroup.procs"), itoa(pid)); err != nil {
			return fmt.Errorf("move pid %d into cgroup %s: %w", pid, h.Root, err)
		}
	}
	return nil
}

// ForksOnSetupThread reports whether Start forks on a thread that ran the manager's
// thread setup (v1 mode with SetThreadSetup), so the caller need not fork from a
// prepared thread of its own.
func (g *Group) ForksOnSetupThread() bool { return g.m.mode == ModeV1 && g.m.threadSetup != nil }

// addPgid tracks the process group of pid, a child just started (not reaped: its pid
// cannot have been reused).
func (g *Group) addPgid(pid int) {
	id, err := procid.Of(pid)
	if err != nil {
		// Without its start time the group could not be told from a stranger's
		// by the same number later: it is not reached by Kill.
		g.m.log.Warn("process outside its cgroup not tracked", "pid", pid, "cgroup", g.String(), "err", err)
		return
	}
	g.mu.Lock()
	g.pgrps = append(g.pgrps, procid.NewPgrp(id))
	g.mu.Unlock()
}

// letGoPgrps ends the tracking of the process groups (their leaders' pidfds closed).
func (g *Group) letGoPgrps() {
	g.mu.Lock()
	pgs := g.pgrps
	g.pgrps = nil
	g.mu.Unlock()
	for _, pg := range pgs {
		pg.Close()
	}
}

// pgrpList is the process groups tracked, those known to have ended dropped.
func (g *Group) pgrpList() []*procid.Pgrp {
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.pgrps) == 0 {
		return nil // the usual case: everything in cgroups
	}
	g.pgrps = slices.DeleteFunc(g.pgrps, (*procid.Pgrp).Gone)
	return slices.Clone(g.pgrps)
}

// NoteMembers lists the members of the process groups the group tracks (processes
// outside any cgroup), so that they are still known once their leader is reaped.
// Call it while a started process that exited is not reaped yet: its zombie holds its
// group's number, so what it left in its group is found as the group's; after the
// reap, leftovers never listed cannot be told from a stranger's group that got the
// number, and are left alone. Nothing to do for processes in cgroups.
func (g *Group) NoteMembers() {
	for _, pg := range g.pgrpList() {
		_, _ = pg.Members()
	}
}

func (g *Group) startV2(cmd *exec.Cmd, a *syscall.SysProcAttr) error {
	dir := g.hiers[0].Root
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		g.m.log.Warn("cannot open cgroup for clone3, moving the process after start", "cgroup", dir, "err", err)
		return g.startThenMove(cmd, g.hiers)
	}
	saved := *cmd
	a.UseCgroupFD, a.CgroupFD = true, fd
	err = cmd.Start()
	unix.Close(fd)
	a.UseCgroupFD, a.CgroupFD = false, 0
	if err == nil || !cloneRefused(err) {
		return err
	}
	g.m.log.Debug("clone3 into cgroup refused, moving the process after start", "cgroup", dir, "err", err)
	*cmd = saved // an exec.Cmd cannot be started twice; the copy was never started
	return g.startThenMove(cmd, g.hiers)
}

// cloneRefused tells a refused clone3/CLONE_INTO_CGROUP (old kernel, seccomp, not a
// cgroup2 directory) from other start errors. An exec error with the same errno is
// simply retried once and fails again.
func cloneRefused(err error) bool {
	for _, e := range []error{unix.ENOSYS, unix.EPERM, unix.EINVAL, unix.EBADF, unix.EOPNOTSUPP, unix.EBUSY, unix.EACCES, unix.E2BIG} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// startThenMove starts cmd and moves it (and whatever it forked meanwhile, found by its
// process group) into the group in the given hierarchies.
func (g *Group) startThenMove(cmd *exec.Cmd, hs []hier) error {
	if err := cmd.Start(); err != nil {
		return err
	}
	g.moveProcess(cmd.Process.Pid, hs)
	return nil
}

func (g *Group) moveProcess(pid int, hs []hier) {
	for _, h := range hs {
		procs := filepath.Join(h.Root, "cgroup.procs")
		if err := g.m.ops.write(procs, itoa(pid)); err != nil {
			if errors.Is(err, unix.ESRCH) {
				continue // exited already
			}
			g.m.log.Warn("process runs outside its cgroup", "pid", pid, "cgroup", h.Root, "err", err)
			g.addPgid(pid)
			continue
		}
		// Its own child, not reaped: its group's number cannot name another's.
		for _, p := range pgrpMembers([]int{pid}) {
			if p != pid {
				_ = g.m.ops.write(procs, itoa(p)) // best effort: it may have exited
			}
		}
	}
}

// thisThread, written to a v1 tasks file, moves the writing thread. The kernel (5.19
// and later) then skips the cgroup_threadgroup_rwsem, which a move written as a pid
// takes: its first writer waits for an RCU grace period (7-12 ms here), and every fork
// and exit on the host waits behind it. A pid moves the same thread 30-50 times
// slower (BenchmarkV1MoveThread).
const thisThread = "0"

func (g *Group) startV1(cmd *exec.Cmd) error {
	files, private := sharedFiles(cmd) // numbered in the process's table, read here
	if f := g.takeForker(); f != nil {
		if private {
			// Born in the group from the pool thread already in it: no migration.
			pid := 0
			err, ok := f.send(forkJob{cmd: cmd, g: g, renamed: true, left: g.left, files: files, pid: &pid})
			if ok && !errors.Is(err, errForkerMoved) {
				if err == nil {
					ownProcess(cmd, pid)
				}
				return err
			}
			if ok {
				g.m.log.Warn("fork pool thread was moved out of its group; starting with a migration", "cgroup", g.Path())
			}
		} else {
			f.send(forkJob{renamed: true, left: g.left}) // leaves the group
		}
	}
	type result struct {
		err      error
		unplaced []hier
		pid      int
	}
	ch := make(chan result, 1)
	lockedOffMain(func() {
		// The child inherits the cgroups of the forking thread: move this OS thread (not
		// the whole process, so nexd's other threads are unaffected) into the group,
		// fork, and move it back. If moving back fails the thread stays locked and the
		// runtime discards it when this goroutine ends, so it cannot linger in the group.
		setup := g.m.threadSetup
		if setup != nil {
			if err := setup(); err != nil {
				ch <- result{err: fmt.Errorf("starting thread: %w", err)}
				return // the thread ends with this goroutine
			}
		}
		self := -1
		if private && setup != nil {
			// A table of its own (see forkfiles.go), for a thread discarded after
			// anyway: one the runtime could use again is worth more than the
			// table (BenchmarkV1StartHeld).
			s, shared, err := g.m.ownTable()
			switch {
			case err == nil:
				self = s
				defer unix.Close(self)
			case !shared:
				ch <- result{err: fmt.Errorf("starting thread: %w", err)}
				return
			}
		}
		orig, _ := os.ReadFile("/proc/thread-self/cgroup")
		_, origPaths := parseSelfCgroup(orig)
		var moved, unplaced []hier
		for _, h := range g.hiers {
			if err := g.m.ops.write(filepath.Join(h.Root, "tasks"), thisThread); err != nil {
				unplaced = append(unplaced, h)
				continue
			}
			moved = append(moved, h)
		}
		pid, err := start(cmd, self, files)
		back := true
		for _, h := range moved {
			p, ok := origPaths[strings.Split(h.Name, ",")[0]]
			if !ok || g.m.ops.write(filepath.Join(h.Mount, p, "tasks"), thisThread) != nil {
				back = false
			}
		}
		if back && setup == nil {
			runtime.UnlockOSThread()
		} else if !back {
			g.m.log.Warn("cannot move the starting thread back out of the cgroup; discarding the thread", "cgroup", g.Path())
		}
		ch <- result{err, unplaced, pid}
	})
	r := <-ch
	if r.err != nil {
		return r.err
	}
	ownProcess(cmd, r.pid)
	if len(r.unplaced) > 0 {
		g.moveProcess(cmd.Process.Pid, r.unplaced)
	}
	return nil
}

// Procs lists the live processes in the group and its descendants (and, for processes
// that could not be placed in it, their process groups while they are theirs). It
// never lists the caller.
func (g *Group) Procs() ([]int, error) {
	out, err := g.cgroupProcs()
	if err != nil {
		return nil, err
	}
	for _, pg := range g.pgrpList() {
		ps, err := pg.Members()
		if err != nil {
			return nil, err
		}
		out = append(out, ps...)
	}
	return g.clean(out), nil
}

// clean sorts pids, without duplicates, the caller and processes that ended.
func (g *Group) clean(pids []int) []int {
	self := os.Getpid()
	slices.Sort(pids)
	pids = slices.Compact(pids)
	return slices.DeleteFunc(pids, func(p int) bool { return p == self || !alive(p) })
}

// eachDir calls fn with each of the group's cgroup directories (and those below),
// hierarchy by hierarchy; a hierarchy whose group is gone is passed over.
func (g *Group) eachDir(fn func(dir string) error) error {
	for _, h := range g.hiers {
		dirs, err := subtreeDirs(h.Root)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return fmt.Errorf("list cgroup %s: %w", h.Root, err)
		}
		for _, d := range dirs {
			if err := fn(d); err != nil {
				return err
			}
		}
	}
	return nil
}

// cgroupProcs lists the processes in the group's cgroups (and below), unsorted.
func (g *Group) cgroupProcs() ([]int, error) {
	var out []int
	err := g.eachDir(func(d string) error {
		pids, err := readPids(filepath.Join(d, "cgroup.procs"))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("list processes of cgroup %s: %w", d, err)
		}
		out = append(out, pids...)
		if g.m.mode == ModeV2 { // v1's cgroup.procs lists a process wherever a thread of it is
			out = append(out, strandedOwners(filepath.Join(d, "cgroup.threads"), pids)...)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// threadsFile lists a cgroup's running threads: v2's cgroup.threads, v1's tasks. An
// ended thread is in neither.
func (m *Manager) threadsFile() string {
	if m.mode == ModeV2 {
		return "cgroup.threads"
	}
	return "tasks"
}

// Threads lists the threads running in the group's cgroups (and below). A process
// whose main thread ended here is still listed in cgroup.procs while its other threads
// run, wherever they run; it has no thread here when they run elsewhere.
func (g *Group) Threads() ([]int, error) {
	var out []int
	err := g.eachDir(func(d string) error {
		tids, err := readPids(filepath.Join(d, g.m.threadsFile()))
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("list threads of cgroup %s: %w", d, err)
		}
		out = append(out, tids...)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// strandedOwners lists the processes with a running thread in the v2 cgroup whose
// cgroup.threads is threads that its cgroup.procs (listed) leaves out. v2 lists a process
// in cgroup.procs where its main thread is; one whose main thread ended alone (exit(2))
// stays listed where it ended, and a move of the process (cgroup.procs written with its
// pid) then moves only its other threads: the systemd driver's placement of a workload
// from its holding group into its scope, when the main thread ended first. Such a
// process is listed by neither cgroup's cgroup.procs where it runs, and cgroup.kill
// passes over it too. Each thread that no listed process owns is looked up (its Tgid):
// a cgroup of single-threaded processes costs the one read of cgroup.threads, one with
// threads also a read of each listed process's task directory.
func strandedOwners(threads string, listed []int) []int {
	tids, err := readPids(threads)
	if err != nil {
		return nil
	}
	known := make(map[int]bool, len(listed))
	for _, p := range listed {
		known[p] = true
	}
	var rest []int
	for _, t := range tids {
		if !known[t] {
			rest = append(rest, t)
		}
	}
	if len(rest) == 0 {
		return nil
	}
	markTasks := func(pid int) {
		ents, _ := os.ReadDir("/proc/" + strconv.Itoa(pid) + "/task")
		for _, e := range ents {
			if tid, err := strconv.Atoi(e.Name()); err == nil {
				known[tid] = true
			}
		}
	}
	for _, p := range listed {
		markTasks(p)
	}
	var out []int
	for _, t := range rest {
		if known[t] {
			continue
		}
		tg := tgidOf(t)
		if tg <= 0 || known[tg] {
			continue
		}
		known[tg] = true
		out = append(out, tg)
		markTasks(tg)
	}
	return out
}

// tgidOf is the process (thread group) of thread tid, 0 when it ended.
func tgidOf(tid int) int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(tid) + "/status")
	if err != nil {
		return 0
	}
	for line := range strings.Lines(string(b)) {
		if v, ok := strings.CutPrefix(line, "Tgid:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	return 0
}

// Kill kills every process in the group and its descendants and waits until none is
// left: v2 through cgroup.kill, otherwise (and as a fallback) by sending SIGKILL to
// every listed process until the group is empty. A process group outside the cgroups
// is killed only while it can be shown to be the one started (procid.Pgrp.Kill).
func (g *Group) Kill() error {
	if g.m.mode == ModeV2 {
		for _, h := range g.hiers {
			err := g.m.ops.write(filepath.Join(h.Root, "cgroup.kill"), "1")
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				g.m.log.Debug("cgroup.kill failed, killing process by process", "cgroup", h.Root, "err", err)
			}
		}
	}
	deadline := time.Now().Add(killTimeout)
	for {
		pids, err := g.cgroupProcs()
		if err != nil {
			return err
		}
		pids = g.clean(pids)
		if g.m.killListed != nil && len(pids) > 0 {
			g.m.killListed(pids)
		}
		if err := g.killListedProcs(pids); err != nil {
			return err
		}
		for _, pg := range g.pgrpList() {
			ps, err := pg.Members()
			if err != nil {
				return fmt.Errorf("cgroup %s: %w", g, err)
			}
			if len(ps) == 0 {
				continue // ended, or no longer this group
			}
			if _, err := pg.Kill(); err != nil {
				return fmt.Errorf("cgroup %s: %w", g, err)
			}
			if why := pg.ByNumber(); why != nil {
				g.m.byNumber.Do(func() {
					g.m.log.Warn("process groups outside cgroups are killed by their number: one that ends right before the kill may have its number reused by another's group, which is hit",
						"pgid", pg.PGID(), "err", why)
				})
			}
			pids = append(pids, ps...)
		}
		if len(pids) == 0 {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroup %s: processes %v survive SIGKILL", g, pids)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// pinAtOnce bounds the pidfds a kill holds at once.
const pinAtOnce = 256

// killListedProcs SIGKILLs those of pids (a listing of the group's cgroups a moment
// ago) that are still in them: each is pinned by a pidfd first (procid.Pin), then the
// group's cgroups are listed again, and only a pid the new listing holds is signalled,
// through its pidfd. A listed process that ended since the listing may have left its
// number to a stranger outside the group, which the kill by the number hit
// (TestKillSparesRecycledPid); the kernel's own listing, read after the pin, says
// whether the pinned process is the group's, in every mode and hierarchy alike. One
// listing more a round for a group with processes in it; an empty group costs nothing
// more.
func (g *Group) killListedProcs(pids []int) error {
	for chunk := range slices.Chunk(pids, pinAtOnce) {
		pin := procid.Pin(chunk)
		now, err := g.cgroupProcs()
		if err != nil {
			pin.Close()
			return err
		}
		slices.Sort(now)
		// A process the signal fails for is listed again next round, and named as
		// a survivor at Kill's deadline, as with kill(2) before.
		_, _ = pin.Signal(unix.SIGKILL, func(pid int) bool {
			_, in := slices.BinarySearch(now, pid)
			return in
		})
		pin.Close()
	}
	return nil
}

// OOMKills counts the processes the kernel OOM killer killed in the group (and below):
// v2 memory.events oom_kill, v1 memory.oom_control oom_kill. 0 without a memory controller.
func (g *Group) OOMKills() (int, error) {
	switch g.m.mode {
	case ModeV2:
		n, err := readKey(filepath.Join(g.hiers[0].Root, "memory.events"), "oom_kill")
		if errors.Is(err, os.ErrNotExist) {
			return 0, nil
		}
		return int(n), err
	case ModeV1:
		total := 0
		for _, h := range g.hiers {
			if !h.has("memory") {
				continue
			}
			// v1 counts an OOM kill only in the victim's own cgroup, so sum the subtree.
			dirs, err := subtreeDirs(h.Root)
			if errors.Is(err, os.ErrNotExist) {
				return 0, nil
			}
			if err != nil {
				return 0, err
			}
			for _, d := range dirs {
				n, err := readKey(filepath.Join(d, "memory.oom_control"), "oom_kill")
				if err != nil && !errors.Is(err, os.ErrNotExist) {
					return 0, err
				}
				total += int(n)
			}
		}
		return total, nil
	}
	return 0, nil
}

// Stats reads usage of the group and its descendants. Counters whose controller is
// not available stay 0.
func (g *Group) Stats() (Stats, error) {
	var s Stats
	if g.m.mode != ModeNone {
		if _, err := os.Stat(g.hiers[0].Root); err != nil {
			return s, fmt.Errorf("cgroup stats: %w", err)
		}
	}
	pidsRead := false
	switch g.m.mode {
	case ModeV2:
		d := g.hiers[0].Root
		s.MemoryCurrent, _ = readUint(filepath.Join(d, "memory.current"))
		s.MemoryMax, _ = readUint(filepath.Join(d, "memory.max")) // "max": no limit, 0
		if u, err := readKey(filepath.Join(d, "cpu.stat"), "usage_usec"); err == nil {
			s.CPUUsageNsec = u * 1000
		}
		if n, err := readUint(filepath.Join(d, "pids.current")); err == nil {
			s.Pids, pidsRead = int(n), true
		}
	case ModeV1:
		for _, h := range g.hiers {
			if h.has("memory") {
				s.MemoryCurrent, _ = readUint(filepath.Join(h.Root, "memory.usage_in_bytes"))
				if lim, err := readUint(filepath.Join(h.Root, "memory.limit_in_bytes")); err == nil && lim < 1<<60 {
					s.MemoryMax = lim // v1 says "no limit" with a number near 2^63
				}
			}
			if h.has("cpuacct") {
				s.CPUUsageNsec, _ = readUint(filepath.Join(h.Root, "cpuacct.usage"))
			}
			if h.has("pids") {
				if n, err := readUint(filepath.Join(h.Root, "pids.current")); err == nil {
					s.Pids, pidsRead = int(n), true
				}
			}
		}
	}
	if !pidsRead {
		pids, err := g.Procs()
		if err != nil {
			return s, err
		}
		s.Pids = len(pids)
	}
	n, err := g.OOMKills()
	s.OOMKills = n
	return s, err
}

// Remove kills what is left in the group and removes it and its descendants in every
// hierarchy. A group that does not exist is not an error. It is the group's end, also
// when it fails: it lets go of the process groups it tracks (their leaders' pidfds),
// and a member that outlived the kill (in D state) is reached by none of this group's
// calls from then on. Before, a failed kill kept them for a retry that no caller
// makes, open until a garbage collection (TestRemovePastKillDeadlineHoldsNoPidfd).
func (g *Group) Remove() error {
	defer g.letGoPgrps()
	g.releaseForker()
	if g.removeEmpty() {
		return nil
	}
	if err := g.Kill(); err != nil {
		return err
	}
	var errs []error
	for _, h := range g.hiers {
		errs = append(errs, g.m.removeTree(h.Root))
	}
	return errors.Join(errs...)
}

// removeEmpty removes the group with one rmdir a hierarchy, true when each is gone.
// The kernel removes a cgroup only while it holds no process and no child group (EBUSY
// otherwise), so a removal is proof of what Kill and removeTree would have found by
// listing it (the group in each hierarchy, its cgroup.procs, its subdirectories): a
// stopped workload's group is empty by the time it is removed, and those listings were
// most of a removal's cost. At the first rmdir that fails (a process or a child group in
// it, a group still busy just after its last process died), Remove goes on as before:
// Kill lists the hierarchies left and removeTree retries. A group with processes outside
// any cgroup (pgrps) is never removed this way.
func (g *Group) removeEmpty() bool {
	if len(g.pgrpList()) > 0 || len(g.hiers) == 0 {
		return false
	}
	for _, h := range g.hiers {
		if err := g.m.ops.rmdir(h.Root); err != nil && !errors.Is(err, os.ErrNotExist) {
			return false
		}
	}
	return true
}

// removeTree removes dir and every cgroup below it, children first. A cgroup stays busy
// for a moment after its last process died, so EBUSY is retried briefly.
func (m *Manager) removeTree(dir string) error {
	dirs, err := subtreeDirs(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		deadline := time.Now().Add(2 * time.Second)
		for {
			err := m.ops.rmdir(dirs[i])
			if err == nil || errors.Is(err, os.ErrNotExist) {
				break
			}
			if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
				return fmt.Errorf("remove cgroup %s: %w", dirs[i], err)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

// Open returns the existing group <root>/<rel> without creating or changing it, for
// reading stats; ok is false in none mode or when the group does not exist.
func (m *Manager) Open(rel string) (g *Group, ok bool) {
	if m.mode == ModeNone {
		return nil, false
	}
	g = m.group(rel)
	if _, err := os.Stat(g.Path()); err != nil {
		return nil, false
	}
	return g, true
}

// OpenDir returns a group for a cgroup directory that another manager owns (a systemd
// scope), for listing its processes, counting its OOM kills and reading its stats; the
// directory need not exist yet. Limits are never written through it (its owner sets
// them); Kill writes cgroup.kill only as a fallback to the owner's own kill.
func OpenDir(dir string, log *slog.Logger) *Group {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	m := &Manager{mode: ModeV1, log: log, ops: realOps()}
	name := "name=systemd"
	for p := dir; ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		if err := unix.Statfs(p, &st); err == nil {
			if st.Type == unix.CGROUP2_SUPER_MAGIC {
				m.mode, name = ModeV2, "unified"
				m.enforced = slices.Clone(limitControllers)
			}
			break
		}
		if p == "/" || p == "." {
			break
		}
	}
	h := hier{Name: name, Root: dir, base: dir}
	m.hiers = []hier{h}
	return &Group{m: m, hiers: []hier{h}}
}
