package native

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/nexd-project/nexd/internal/procid"
)

// isolation creates the per-workload sandboxes: cgroups below the nexlet's subtree, or
// plain process groups where cgroups are unavailable.
type isolation interface {
	mode() string
	// sandbox creates, or opens when it already exists, the sandbox of workload id.
	sandbox(id string, l Limits) (sandbox, error)
	// fresh is sandbox for a new deploy: from a pool made ahead where there is one.
	fresh(id string, l Limits) (sandbox, error)
	// close ends what the isolation keeps ready; sandboxes handed out stay.
	close()
}

// sandbox holds one workload's processes.
type sandbox interface {
	start(cmd *exec.Cmd) error
	// placed finishes the placement of a started process, off the spawning thread
	// (the systemd driver moves it into its scope); an error means it must not run.
	placed(pid int) error
	// readopt applies the sandbox's limits again when a new nexlet adopts it.
	readopt() error
	// setupThread: start forks on a no_new_privs thread of its own, not the spawner's.
	setupThread() bool
	// procs lists the live processes; empty when the workload is gone.
	procs() ([]int, error)
	// kill SIGKILLs every process of the sandbox.
	kill() error
	// exiting: the main process exited and is not reaped yet. A sandbox that reaches
	// processes by their process group lists its members now, while the exited
	// leader still holds the group's number, so that what it left there is still
	// found (and killed) as the workload's once the leader is reaped.
	exiting()
	remove() error
	// oomKills counts OOM kills so far (0 where unknown).
	oomKills() int
	// empty: the sandbox is known to be new and empty (a fork pool group), so a
	// start need not kill leftovers or count earlier OOM kills (both read the
	// cgroup tree: 0.1-0.2 ms of a deploy).
	empty() bool
}

// noIsolation runs workloads in their own process group. They outlive the nexlet (no
// Pdeathsig): nexd, the child subreaper, reaps those whose nexlet died, and the next
// nexlet adopts them. dir holds the pid records (<runtime>/procs).
type noIsolation struct{ dir string }

func (noIsolation) mode() string { return "none" }

func (iso noIsolation) fresh(id string, l Limits) (sandbox, error) { return iso.sandbox(id, l) }
func (noIsolation) close()                                         {}

// sandbox finds a live group of the workload from its pid record, so replay can adopt
// it; the process must still have the recorded start time, ruling out a reused pid.
// The group is known by that identity from then on (procid.Pgrp): once it ended, its
// number, free again, may name a stranger's group, which is never listed or killed.
func (iso noIsolation) sandbox(id string, _ Limits) (sandbox, error) {
	b, err := os.ReadFile(filepath.Join(iso.dir, id, "pid"))
	if err != nil {
		return &pgroup{}, nil
	}
	rec, err := procid.Parse(strings.TrimSpace(string(b)))
	if err != nil || !rec.Alive() {
		return &pgroup{}, nil
	}
	pg := procid.NewPgrp(rec)
	// Its members now, while its leader is known alive: what it leaves in its group
	// is then found after nexd reaped it (see procid.Pgrp).
	_, _ = pg.Members()
	return &pgroup{pg: pg}, nil
}

// pgroup is a workload's process group, known by its leader (the current run's main
// process) and, once that exited, signalled through its pidfd (procid.Pgrp), never by
// the bare number: that is free for reuse once the group is empty, and a stop, tidy or
// restart killed whatever group had it then (another workload's, any process of the
// host's). While the leader is the nexlet's unreaped child its number names its group
// alone.
type pgroup struct {
	mu sync.Mutex
	pg *procid.Pgrp // nil: no run known
}

func (g *pgroup) start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return err
	}
	// Our child, not yet reaped: its pid and start time name it.
	id, err := procid.Of(cmd.Process.Pid)
	if err != nil {
		// Unnamed, its group could not be told from a stranger's later, nor
		// stopped: it does not run.
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return fmt.Errorf("process group of pid %d: %w", cmd.Process.Pid, err)
	}
	g.mu.Lock()
	old := g.pg
	// Reaped only after exiting (the nexlet's reap of its child): its pidfd is opened
	// then, not a descriptor more for each running workload.
	g.pg = procid.NewChildPgrp(id)
	g.mu.Unlock()
	if old != nil {
		old.Close() // an earlier run's, no longer reached (its pidfd)
	}
	return nil
}

func (g *pgroup) group() *procid.Pgrp {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pg
}

// procs is the group's number while the group is still the workload's and holds a
// process (a zombie too, for the moment before its reap), without a walk of /proc; the
// stop's and the end's loops ask it every 20 ms.
func (g *pgroup) procs() ([]int, error) {
	if pg := g.group(); pg != nil && pg.Alive() {
		return []int{pg.PGID()}, nil
	}
	return nil, nil
}

func (g *pgroup) kill() error {
	if pg := g.group(); pg != nil {
		_, err := pg.Kill()
		return err
	}
	return nil
}

// close lets go of the group (its leader's pidfd): nothing of it is killed from then on.
func (g *pgroup) close() {
	if pg := g.group(); pg != nil {
		pg.Close()
	}
}

// letGo lets go of a sandbox made only to be looked at or to set limits again, not a
// workload's own: a process group's (an adopted workload's, found from its pid record)
// holds its leader's pidfd (procid.NewPgrp), which stayed open until a garbage
// collection, never with GOGC=off (TestReplayOfHeldWorkloadHoldsNoPidfd).
func letGo(sb sandbox) {
	if g, ok := sb.(*pgroup); ok {
		g.close()
	}
}

// exiting lists the group's members (one walk of /proc) while the exited leader's
// zombie still holds its number.
func (g *pgroup) exiting() {
	if pg := g.group(); pg != nil {
		_, _ = pg.Members()
	}
}

// remove lets go of the group (its leader's pidfd), the workload's cleanup being over:
// one emptied by its kill closed it already, but one that outlived the kill's deadline
// (a member in D state) kept it open until a garbage collection
// (TestStopPastKillDeadlineHoldsNoPidfd).
func (g *pgroup) remove() error {
	g.close()
	return nil
}

func (g *pgroup) placed(int) error  { return nil }
func (g *pgroup) readopt() error    { return nil }
func (g *pgroup) setupThread() bool { return false }
func (g *pgroup) oomKills() int     { return 0 }
func (g *pgroup) empty() bool       { return false }
