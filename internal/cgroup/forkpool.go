package cgroup

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ForkPool keeps a few OS threads ready in v1 mode, each already in a fresh, empty
// cgroup of its own below the manager's root, so that starting a process in a new group
// needs neither the group's mkdirs nor a cgroup migration on the way. (A migration
// written as a thread id waited for an RCU grace period, the kernel's
// cgroup_threadgroup_rwsem: 5-17 ms on a loaded 2-core machine, most of a deploy; a
// thread moving itself, thisThread, takes 0.1-0.4 ms.) With the pool, Create renames a
// ready group to the workload's name and writes its limits, Start forks on the thread
// already in it (the child is born in the group), and the thread then moves on into
// its next pool group, off the deploy path. In v2 mode (clone3 into the group) and none
// mode Create is the manager's.
type ForkPool struct {
	m *Manager
	// ready holds the threads waiting in fresh groups (each once, so never more than
	// the pool's size): a Create takes one without waking it, and its job is then its
	// only wake-up.
	ready chan *forker
	stop  chan struct{}
	wg    sync.WaitGroup
	seq   atomic.Uint64
	// waiting counts the threads ready in a fresh group, waiting to be taken.
	waiting atomic.Int32
	begin   <-chan struct{} // nil or closed: the threads may make their groups
}

// Ready is how many threads wait in fresh groups now: a Create finds one only then
// (benchmarks wait for the refill off the clock).
func (p *ForkPool) Ready() int { return int(p.waiting.Load()) }

// forkPoolPrefix names the pool's groups; workload ids have no dot, so none collides.
const forkPoolPrefix = ".forkpool-"

// forker is one pool thread, parked in its group until a Create takes it.
type forker struct {
	// state is forkerOffered while it waits in ready, then forkerTaken by a Create or
	// forkerStopped by the thread on Close: whichever swaps first.
	state atomic.Int32
	rel   string // its group below the root while it waits in ready
	jobs  chan forkJob
	gone  chan struct{} // closed once the thread has left every pool group and stopped
}

// forkJob is what a taken forker does once: start cmd (nil: nothing), then leave the
// group, closing left once it has. renamed says whether Create renamed the group (it is
// the taker's from then on); an unrenamed one is removed by the thread after leaving.
type forkJob struct {
	cmd     *exec.Cmd
	g       *Group // the group cmd must be born in
	out     chan error
	renamed bool
	left    chan struct{}
	// files are the descriptors cmd's child gets, in the process's table: Stdin,
	// Stdout, Stderr (-1 for none), then ExtraFiles (see sharedFiles).
	files []int
	// pid is cmd's process, set before out is sent to (see start).
	pid *int
}

// NewForkPool starts size threads (none for size 0 or a mode other than v1). Each runs
// the manager's thread setup (SetThreadSetup) first. Pool groups left by an earlier
// process under this root are removed.
func (m *Manager) NewForkPool(size int) *ForkPool { return m.NewForkPoolAfter(size, nil) }

// NewForkPoolAfter is NewForkPool whose threads make their first groups only once
// begin is closed (nil: at once), so that a process can keep its start-up's CPU for
// what it must do first; Create migrates until then.
func (m *Manager) NewForkPoolAfter(size int, begin <-chan struct{}) *ForkPool {
	p := &ForkPool{m: m, ready: make(chan *forker, max(size, 0)), stop: make(chan struct{}), begin: begin}
	if m.mode != ModeV1 || size <= 0 {
		return p
	}
	for _, h := range m.hiers {
		ents, _ := os.ReadDir(h.Root)
		for _, e := range ents {
			if e.IsDir() && strings.HasPrefix(e.Name(), forkPoolPrefix) {
				_ = m.removeTree(filepath.Join(h.Root, e.Name()))
			}
		}
	}
	for range size {
		p.wg.Add(1)
		go p.run()
	}
	return p
}

// Close ends the pool's threads and removes their groups; groups already handed out
// stay with their takers.
func (p *ForkPool) Close() {
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	p.wg.Wait()
}

// Create is Manager.Create, with a ready pool group when there is one.
func (p *ForkPool) Create(rel string, l Limits) (*Group, error) {
	if err := l.Validate(); err != nil {
		return nil, fmt.Errorf("cgroup %s: %w", rel, err)
	}
	var f *forker
	for f == nil {
		select {
		case f = <-p.ready:
		default:
			return p.m.Create(rel, l)
		}
		if !f.state.CompareAndSwap(forkerOffered, forkerTaken) {
			f = nil // its thread stopped
		}
	}
	p.waiting.Add(-1)
	g := p.m.group(rel)
	from := p.m.group(f.rel)
	for i, h := range g.hiers {
		if err := os.Rename(from.hiers[i].Root, h.Root); err != nil {
			// Taken (a leftover of the same name) or not renamable: undo, let the
			// thread move on, and create the group the usual way.
			for j := range i {
				_ = os.Rename(g.hiers[j].Root, from.hiers[j].Root)
			}
			f.send(forkJob{})
			return p.m.Create(rel, l)
		}
	}
	// The rename succeeded, so no group of that name existed (cgroupfs refuses to
	// rename onto an existing group): this is the pool's own, empty group.
	g.forker, g.left, g.forkerGone, g.pooled = f, make(chan struct{}), f.gone, true
	if _, err := p.m.createV1(g, l); err != nil {
		return g, fmt.Errorf("cgroup %s: limits not (all) applied: %w", g.Path(), err)
	}
	return g, nil
}

// send hands the forker its one job and returns the job's result; ok is false when the
// thread was gone before it took the job.
func (f *forker) send(j forkJob) (err error, ok bool) {
	j.out = make(chan error, 1)
	if j.left == nil {
		j.left = make(chan struct{})
	}
	select {
	case f.jobs <- j: // never waits: jobs holds the one job
	case <-f.gone:
		return nil, false
	}
	select {
	case err := <-j.out:
		return err, true
	case <-f.gone:
		// Gone after it answered (out holds the answer) or before it took the job.
		select {
		case err := <-j.out:
			return err, true
		default:
			return nil, false
		}
	}
}

// run is one pool thread. It never unlocks its OS thread, which carries the thread
// setup (no_new_privs for the native nexlet) and ends with this goroutine.
func (p *ForkPool) run() {
	defer p.wg.Done()
	if p.begin != nil {
		select {
		case <-p.begin:
		case <-p.stop:
			return
		}
	}
	done := make(chan struct{})
	lockedOffMain(func() {
		defer close(done)
		p.serve()
	})
	<-done
}

// serve is a pool thread's work, on its locked thread, once begin allowed it.
func (p *ForkPool) serve() {
	f := &forker{jobs: make(chan forkJob, 1), gone: make(chan struct{})}
	defer close(f.gone)
	if setup := p.m.threadSetup; setup != nil {
		if err := setup(); err != nil {
			p.m.log.Warn("fork pool thread setup failed; starts migrate instead", "err", err)
			return
		}
	}
	orig, _ := os.ReadFile("/proc/thread-self/cgroup")
	_, origPaths := parseSelfCgroup(orig)
	self, shared, err := p.m.ownTable()
	switch {
	case err == nil:
		defer unix.Close(self)
	case shared: // logged once by ownTable
	default:
		p.m.log.Warn("fork pool thread has no usable descriptor table; starts migrate instead", "err", err)
		return
	}
	var (
		cur   string        // the pool group the thread is in, removed when it leaves
		stale string        // a pool group it left, to remove
		left  chan struct{} // closed once it has left a taken group
	)
	defer func() {
		for _, h := range p.m.hiers {
			if o, ok := origPaths[strings.Split(h.Name, ",")[0]]; ok {
				_ = p.m.ops.write(filepath.Join(h.Mount, o, "tasks"), thisThread)
			}
		}
		if left != nil {
			close(left)
		}
		p.removeGroup(cur)
		p.removeGroup(stale)
	}()
	for {
		next := fmt.Sprintf("%s%d-%d", forkPoolPrefix, os.Getpid(), p.seq.Add(1))
		err := p.enter(next)
		if left != nil {
			close(left)
			left = nil
		}
		p.removeGroup(stale)
		stale, cur = "", next
		if err != nil {
			p.m.log.Warn("fork pool thread cannot enter its group; starts migrate instead", "cgroup", p.m.group(next).Path(), "err", err)
			return
		}
		f.rel = cur
		f.state.Store(forkerOffered)
		p.waiting.Add(1)
		p.ready <- f // never waits (see ready)
		var j forkJob
		select {
		case j = <-f.jobs:
		case <-p.stop:
			if f.state.CompareAndSwap(forkerOffered, forkerStopped) {
				p.waiting.Add(-1)
				return
			}
			// Taken but never given its job: the group is the taker's.
			cur = ""
			return
		}
		if j.cmd != nil {
			// Something may have moved the whole process (a write of its pid to a
			// cgroup.procs), this thread with it: fork here only when the child is
			// sure to be born in its group.
			switch {
			case !threadIn(j.g):
				j.out <- errForkerMoved
			default:
				var err error
				*j.pid, err = start(j.cmd, self, j.files)
				j.out <- err
				// The starter now waits in this thread's P's next slot, which no
				// other thread takes while this one is in the system calls of its
				// next group: yield that P to it first (the hand-back 77-154 ->
				// 20-27 µs in isolation).
				runtime.Gosched()
			}
		} else {
			j.out <- nil
		}
		if !j.renamed {
			stale = cur
		}
		cur, left = "", j.left
	}
}

const (
	forkerOffered int32 = iota + 1
	forkerTaken
	forkerStopped
)

// enter creates the pool group rel and moves this thread into it in every hierarchy,
// off every deploy's path.
func (p *ForkPool) enter(rel string) error {
	for _, h := range p.m.group(rel).hiers {
		if err := p.m.ops.mkdir(h.Root); err != nil {
			return err
		}
		if err := p.m.ops.write(filepath.Join(h.Root, "tasks"), thisThread); err != nil {
			return err
		}
	}
	return nil
}

func (p *ForkPool) removeGroup(rel string) {
	if rel == "" {
		return
	}
	for _, h := range p.m.group(rel).hiers {
		_ = p.m.removeTree(h.Root)
	}
}

// errForkerMoved: the pool thread is no longer in the group it was handed with; the
// start falls back to moving a thread into the group.
var errForkerMoved = errors.New("fork pool thread moved out of its group")

// threadIn reports whether the calling thread is in g in every hierarchy. It runs
// on the deploy's path right before the fork: three system calls into a buffer on the
// stack, not os.ReadFile's seven and a map.
func threadIn(g *Group) bool {
	var buf [4 << 10]byte
	b := readSmall("/proc/thread-self/cgroup", buf[:])
	if b == nil {
		return false
	}
	for _, h := range g.hiers {
		ctrl, _, _ := strings.Cut(h.Name, ",")
		if !v1PathIs(b, ctrl, strings.TrimPrefix(h.Root, h.Mount)) {
			return false
		}
	}
	return true
}

// readSmall reads a small file into buf in one read (nil on an error), or with
// os.ReadFile when it fills buf.
func readSmall(path string, buf []byte) []byte {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil
	}
	n, err := unix.Read(fd, buf)
	unix.Close(fd)
	if err != nil || n < 0 {
		return nil
	}
	if n == len(buf) {
		b, err := os.ReadFile(path)
		if err != nil {
			return nil
		}
		return b
	}
	return buf[:n]
}

// v1PathIs reports whether a /proc/<pid>/cgroup text b puts the process in path in
// the v1 hierarchy of controller ctrl (the last line naming it, as parseSelfCgroup).
func v1PathIs(b []byte, ctrl, path string) bool {
	found, in := false, false
	for len(b) > 0 {
		var line []byte
		line, b, _ = bytes.Cut(b, []byte{'\n'})
		_, rest, ok := bytes.Cut(line, []byte{':'})
		if !ok {
			continue
		}
		ctrls, p, ok := bytes.Cut(rest, []byte{':'})
		if !ok {
			continue
		}
		for len(ctrls) > 0 {
			var c []byte
			c, ctrls, _ = bytes.Cut(ctrls, []byte{','})
			if string(c) == ctrl {
				found, in = true, string(p) == path
			}
		}
	}
	return found && in
}

// takeForker detaches the group's pool thread, if it still has one.
func (g *Group) takeForker() *forker {
	g.mu.Lock()
	defer g.mu.Unlock()
	f := g.forker
	g.forker = nil
	return f
}

// releaseForker lets a pool thread that started nothing leave the group, and waits (a
// little) until every pool thread has left, so the group can be removed.
func (g *Group) releaseForker() {
	if f := g.takeForker(); f != nil {
		f.send(forkJob{renamed: true, left: g.left})
	}
	if g.left == nil {
		return
	}
	select {
	case <-g.left:
	case <-g.forkerGone:
	case <-time.After(5 * time.Second):
	}
}
