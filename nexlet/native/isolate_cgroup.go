package native

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/sdscope"
)

// warnGroupsByNumber logs that workloads' process groups are killed by their number,
// where the kernel cannot signal a group through its leader's pidfd (procid.Pgrp).
func (n *Nexlet) warnGroupsByNumber() {
	if err := procid.GroupSignals(); err != nil {
		n.log.Warn("workloads' process groups are killed by their number: one that ends right before the kill may have its number reused by another's group, which is hit", "err", err)
	}
}

// chooseIsolation attaches to the root of the workloads' cgroups (spec from
// NEX_AGENT_CGROUP; nexd keeps it outside the nexlet's own cgroup, so workloads survive
// the nexlet), where each workload gets the group <id>;
// without a spec, or when it cannot be used, workloads run in plain process groups.
//
// With the systemd driver each workload gets a transient scope instead (see
// scopeIsolation); the subtree then only holds a workload for the moment between its
// start and systemd taking it. A nexlet that cannot reach systemd then fails to start:
// the operator asked for scopes, and workloads must not silently land elsewhere.
func (n *Nexlet) chooseIsolation(spec, driver string) (isolation, error) {
	none := noIsolation{dir: filepath.Join(n.cfg.RuntimeDir, "procs")}
	if driver == DriverSystemd {
		sd, err := dialSystemd()
		if err != nil {
			return nil, err
		}
		var hold *cgroup.Manager
		if spec != "" {
			if hold, err = cgroup.Attach(spec, n.log); err != nil {
				n.log.Warn("cgroup subtree unusable: workloads start in their own process groups before systemd takes them", "err", err)
				hold = nil
			}
			if hold != nil {
				hold.SetThreadSetup(setNoNewPrivs) // a v1 start forks on a thread of its own
			}
		}
		if hold == nil {
			n.warnGroupsByNumber()
		}
		return &scopeIsolation{sd: sd, hold: hold, n: n}, nil
	}
	if driver != "" && driver != DriverCgroupfs {
		return nil, fmt.Errorf("%s=%q: want %s or %s", EnvCgroupDriver, driver, DriverCgroupfs, DriverSystemd)
	}
	if spec == "" {
		n.log.Warn("no cgroup subtree given: workloads run without limits, in their own process groups", "env", EnvCgroup)
		n.warnGroupsByNumber()
		return none, nil
	}
	m, err := cgroup.Attach(spec, n.log)
	if err != nil {
		n.log.Warn("cgroup subtree unusable: workloads run without limits, in their own process groups", "err", err)
		n.warnGroupsByNumber()
		return none, nil
	}
	if m.Mode() == cgroup.ModeNone {
		n.log.Warn("cgroups disabled by the node: workloads run without limits", "reason", m.Reason())
		n.warnGroupsByNumber()
		return none, nil
	}
	// Every thread that forks a workload carries no_new_privs, as the spawner's does.
	m.SetThreadSetup(setNoNewPrivs)
	return cgIsolation{m: m, n: n, pool: m.NewForkPoolAfter(DefaultForkPool, n.cfg.PoolsAfter)}, nil
}

// DefaultForkPool is how many threads wait ready in fresh cgroups (v1) so that a
// deploy's fork needs no cgroup migration (cgroup.ForkPool).
const DefaultForkPool = 2

// DriverCgroupfs (the default) runs workloads in nexd's own delegated subtree.
const DriverCgroupfs = "cgroupfs"

type cgIsolation struct {
	m    *cgroup.Manager
	n    *Nexlet
	pool *cgroup.ForkPool
}

func (c cgIsolation) close() { c.pool.Close() }

func (c cgIsolation) fresh(id string, l Limits) (sandbox, error) {
	return c.group(c.pool.Create(id, cgroup.Limits{MemoryMax: l.MemoryMax, CPUMax: l.CPUMax, PidsMax: l.PidsMax}))
}

func (c cgIsolation) mode() string { return "cgroup-" + string(c.m.Mode()) }

func (c cgIsolation) sandbox(id string, l Limits) (sandbox, error) {
	sb, err := c.group(c.m.Create(id, cgroup.Limits{MemoryMax: l.MemoryMax, CPUMax: l.CPUMax, PidsMax: l.PidsMax}))
	if cs, ok := sb.(cgSandbox); ok {
		// A workload started under cgroup_driver systemd before a switch back to
		// cgroupfs still runs in its scope: it is found (and stopped) there, never
		// started a second time.
		if dir := sdscope.CgroupDir(id); dirExists(dir) {
			return withScope{cgSandbox: cs, scope: cgroup.OpenDir(dir, c.n.log)}, err
		}
	}
	return sb, err
}

func dirExists(p string) bool {
	fi, err := os.Stat(p)
	return err == nil && fi.IsDir()
}

// withScope is a cgroupfs sandbox whose workload still runs in a scope of the systemd
// driver.
type withScope struct {
	cgSandbox
	scope *cgroup.Group
}

func (s withScope) procs() ([]int, error) {
	a, err := s.cgSandbox.procs()
	if err != nil {
		return nil, err
	}
	b, err := s.scope.Procs()
	if err != nil {
		return nil, err
	}
	return append(a, b...), nil
}

func (s withScope) kill() error   { return errors.Join(s.cgSandbox.kill(), s.scope.Kill()) }
func (s withScope) remove() error { return errors.Join(s.scope.Kill(), s.cgSandbox.remove()) }

func (c cgIsolation) group(g *cgroup.Group, err error) (sandbox, error) {
	if g == nil {
		return nil, err
	}
	if err != nil {
		// The group is usable; run without the limits that could not be written.
		c.n.log.Warn("workload limits not fully applied", "cgroup", g.Path(), "err", err)
	}
	return cgSandbox{g}, nil
}

type cgSandbox struct{ g *cgroup.Group }

func (s cgSandbox) start(cmd *exec.Cmd) error { return s.g.Start(cmd) }
func (s cgSandbox) procs() ([]int, error)     { return s.g.Procs() }
func (s cgSandbox) kill() error               { return s.g.Kill() }
func (s cgSandbox) exiting()                  { s.g.NoteMembers() }
func (s cgSandbox) remove() error             { return s.g.Remove() }
func (s cgSandbox) placed(int) error          { return nil }
func (s cgSandbox) empty() bool               { return s.g.Empty() }

// readopt: Create (in sandbox) already wrote the limits again.
func (s cgSandbox) readopt() error    { return nil }
func (s cgSandbox) setupThread() bool { return s.g.ForksOnSetupThread() }

func (s cgSandbox) oomKills() int {
	n, _ := s.g.OOMKills()
	return n
}
