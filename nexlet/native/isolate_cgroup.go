package native

import (
	"os/exec"
	"path/filepath"

	"github.com/nexd-project/nexd/internal/cgroup"
)

// chooseIsolation attaches to the root of the workloads' cgroups (spec from
// NEX_AGENT_CGROUP; nexd keeps it outside the nexlet's own cgroup, so workloads survive
// the nexlet), where each workload gets the group <id>;
// without a spec, or when it cannot be used, workloads run in plain process groups.
func (n *Nexlet) chooseIsolation(spec string) isolation {
	none := noIsolation{dir: filepath.Join(n.cfg.RuntimeDir, "procs")}
	if spec == "" {
		n.log.Warn("no cgroup subtree given: workloads run without limits, in their own process groups", "env", EnvCgroup)
		return none
	}
	m, err := cgroup.Attach(spec, n.log)
	if err != nil {
		n.log.Warn("cgroup subtree unusable: workloads run without limits, in their own process groups", "err", err)
		return none
	}
	if m.Mode() == cgroup.ModeNone {
		n.log.Warn("cgroups disabled by the node: workloads run without limits", "reason", m.Reason())
		return none
	}
	return cgIsolation{m: m, n: n}
}

type cgIsolation struct {
	m *cgroup.Manager
	n *Nexlet
}

func (c cgIsolation) mode() string { return "cgroup-" + string(c.m.Mode()) }

func (c cgIsolation) sandbox(id string, l Limits) (sandbox, error) {
	g, err := c.m.Create(id, cgroup.Limits{MemoryMax: l.MemoryMax, CPUMax: l.CPUMax, PidsMax: l.PidsMax})
	if g == nil {
		return nil, err
	}
	if err != nil {
		// The group is usable; run without the limits that could not be written.
		c.n.log.Warn("workload limits not fully applied", "workload_id", id, "err", err)
	}
	return cgSandbox{g}, nil
}

type cgSandbox struct{ g *cgroup.Group }

func (s cgSandbox) start(cmd *exec.Cmd) error { return s.g.Start(cmd) }
func (s cgSandbox) procs() ([]int, error)     { return s.g.Procs() }
func (s cgSandbox) kill() error               { return s.g.Kill() }
func (s cgSandbox) remove() error             { return s.g.Remove() }

func (s cgSandbox) oomKills() int {
	n, _ := s.g.OOMKills()
	return n
}
