package native

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/sdscope"
)

// DriverSystemd is the value of EnvCgroupDriver that runs every workload in a transient
// systemd scope, nex-<id>.scope in nex-workloads.slice (cgroup_driver: systemd).
const DriverSystemd = "systemd"

// scopeIsolation runs each workload in its own systemd scope. The nexlet talks to
// systemd itself (it runs as root, as the node does under systemd): it is the process
// that starts workloads, and the scope must take the process right after its start,
// which a round trip through nexd would only delay.
//
// A process cannot be born in a scope that does not exist yet, and a scope cannot exist
// without a process. So the workload is born in a holding group, workloads/<id> in
// nexd's own subtree, with its limits (clone3 into the cgroup, as with the cgroupfs
// driver); systemd then takes it into the new scope (PIDs=), anything it forked
// meanwhile follows (AttachProcessesToUnit), and the holding group is removed. Without
// a usable subtree the process starts in its own process group and only the main
// process moves.
type scopeIsolation struct {
	sd   *sdscope.Client
	hold *cgroup.Manager // the holding groups' root; none mode: no holding group
	n    *Nexlet
}

func (s *scopeIsolation) mode() string { return "systemd" }

func (s *scopeIsolation) fresh(id string, l Limits) (sandbox, error) { return s.sandbox(id, l) }

// close: the D-Bus connection is closed by Nexlet.Close.
func (s *scopeIsolation) close() {}

func (s *scopeIsolation) sandbox(id string, l Limits) (sandbox, error) {
	return &scopeSandbox{iso: s, id: id, limits: l, scope: cgroup.OpenDir(sdscope.CgroupDir(id), s.n.log)}, nil
}

type scopeSandbox struct {
	iso    *scopeIsolation
	id     string
	limits Limits
	scope  *cgroup.Group // the scope's cgroup, read only
	pg     *pgroup       // the process group when there is no holding group
	// sliceOOM is nex-workloads.slice's OOM kill count when the workload was placed
	// (placedOK): a scope whose last process died is removed by systemd at once, and
	// its count with it.
	sliceOOM int
	placedOK bool
}

func (b *scopeSandbox) sdLimits() sdscope.Limits {
	return sdscope.Limits{MemoryMax: b.limits.MemoryMax, CPUMax: b.limits.CPUMax, PidsMax: b.limits.PidsMax}
}

// holdGroup is the workload's holding group, when there is a subtree for it.
func (b *scopeSandbox) holdGroup() (*cgroup.Group, bool) {
	if b.iso.hold == nil || b.iso.hold.Mode() == cgroup.ModeNone {
		return nil, false
	}
	return b.iso.hold.Open(b.id)
}

// setupThread: started from the spawner (a holding group in v1 forks on a setup thread
// too, see chooseIsolation).
func (b *scopeSandbox) setupThread() bool { return false }
func (b *scopeSandbox) empty() bool       { return false }

func (b *scopeSandbox) start(cmd *exec.Cmd) error {
	if h := b.iso.hold; h != nil && h.Mode() != cgroup.ModeNone {
		g, err := h.Create(b.id, cgroup.Limits{MemoryMax: b.limits.MemoryMax, CPUMax: b.limits.CPUMax, PidsMax: b.limits.PidsMax})
		if g != nil {
			if err != nil {
				b.iso.n.log.Warn("holding cgroup limits not fully applied", "workload_id", b.id, "err", err)
			}
			return g.Start(cmd)
		}
		b.iso.n.log.Warn("no holding cgroup; the workload starts in its own process group", "workload_id", b.id, "err", err)
	}
	pg := &pgroup{}
	if err := pg.start(cmd); err != nil {
		return err
	}
	if b.pg != nil {
		b.pg.close() // an earlier run's
	}
	b.pg = pg
	return nil
}

// placed hands the started process (and anything it forked) to its new scope.
func (b *scopeSandbox) placed(pid int) error {
	b.sliceOOM, b.placedOK = sliceOOMKills(), true
	ctx := context.Background()
	pids := []int{pid}
	hg, hasHold := b.holdGroup()
	if hasHold {
		if ps, err := hg.Procs(); err == nil && len(ps) > 0 {
			pids = ps
		}
	}
	if err := b.iso.sd.Start(ctx, b.id, pids, b.sdLimits()); err != nil {
		if !running(pid) {
			// It ended before systemd could take it (a job that runs for a
			// moment): there is nothing to place, and its end is reported as usual.
			b.iso.sd.ResetFailed(ctx, b.id)
			return nil
		}
		return err
	}
	if !hasHold {
		return nil
	}
	// Children forked before the move stayed behind; they follow until the holding
	// group is empty (a child forked meanwhile is born there and caught next round).
	for range 100 {
		ps, err := hg.Procs()
		if err != nil || len(ps) == 0 {
			break
		}
		// A process whose main thread ended before the move stays listed here by
		// that thread alone; its other threads moved. Nothing is left to move then,
		// and the holding group, with no thread in it, can go.
		if ts, err := hg.Threads(); err == nil && len(ts) == 0 {
			break
		}
		if err := b.iso.sd.Attach(ctx, b.id, ps); err != nil {
			b.iso.n.log.Debug("moving forked processes into the scope", "workload_id", b.id, "pids", ps, "err", err)
			time.Sleep(5 * time.Millisecond)
		}
	}
	if err := hg.Remove(); err != nil {
		b.iso.n.log.Warn("holding cgroup not removed", "workload_id", b.id, "err", err)
	}
	return nil
}

// running: pid has not exited (a zombie has: it waits only to be reaped; but not one
// whose main thread alone ended, its other threads running: procid.Stat.Runs).
func running(pid int) bool {
	st, err := procid.ReadStat(pid)
	return err == nil && st.Runs()
}

// readopt sets the workload's limits again on its scope when a nexlet adopts it.
func (b *scopeSandbox) readopt() error {
	return b.iso.sd.SetLimits(context.Background(), b.id, b.sdLimits())
}

func (b *scopeSandbox) procs() ([]int, error) {
	out, err := b.scope.Procs()
	if err != nil {
		return nil, err
	}
	if hg, ok := b.holdGroup(); ok {
		ps, err := hg.Procs()
		if err != nil {
			return nil, err
		}
		out = append(out, ps...)
	}
	if b.pg != nil {
		ps, _ := b.pg.procs()
		out = append(out, ps...)
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

func (b *scopeSandbox) kill() error {
	var errs []error
	if err := b.iso.sd.Kill(context.Background(), b.id, syscall.SIGKILL); err != nil {
		// systemd unreachable: the kernel's own group kill still works on cgroup v2.
		errs = append(errs, err, b.scope.Kill())
	} else if ps, err := b.scope.Procs(); err == nil && len(ps) > 0 {
		// What systemd's kill leaves: systemd signals what the scope's cgroup.procs
		// lists, and a process whose main thread ended in the holding group before
		// systemd moved it is not listed there while its other threads run in the
		// scope (cgroup.Group.Procs finds it by its threads). Those just SIGKILLed
		// are listed too until they die, and killed again.
		errs = append(errs, b.scope.Kill())
	}
	if hg, ok := b.holdGroup(); ok {
		errs = append(errs, hg.Kill())
	}
	if b.pg != nil {
		errs = append(errs, b.pg.kill())
	}
	return errors.Join(errs...)
}

// exiting: a process group notes its members (see sandbox.exiting); the scope's
// cgroup holds its processes by itself.
func (b *scopeSandbox) exiting() {
	if b.pg != nil {
		b.pg.exiting()
	}
}

func (b *scopeSandbox) remove() error {
	if b.pg != nil {
		defer b.pg.close() // its leader's pidfd, whatever the kill did (pgroup.remove)
	}
	if err := b.kill(); err != nil {
		return err
	}
	// The empty scope goes away by itself (CollectMode=inactive-or-failed); a failed
	// one is forgotten now rather than at the next start.
	b.iso.sd.ResetFailed(context.Background(), b.id)
	if hg, ok := b.holdGroup(); ok {
		return hg.Remove()
	}
	return nil
}

func (b *scopeSandbox) oomKills() int {
	if n, err := b.scope.OOMKills(); err == nil && n > 0 {
		return n
	}
	if !b.placedOK {
		return 0
	}
	// The scope is gone with its counter: count what the slice saw since the start
	// (an OOM kill of another workload in the same moment would be counted too).
	return max(0, sliceOOMKills()-b.sliceOOM)
}

func sliceOOMKills() int {
	n, _ := cgroup.OpenDir(sdscope.SliceDir(), nil).OOMKills()
	return n
}

// dialSystemd connects the systemd driver, or says why it cannot be used.
func dialSystemd() (*sdscope.Client, error) {
	if err := sdscope.Available(); err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := sdscope.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("cgroup driver systemd: %w", err)
	}
	return c, nil
}
