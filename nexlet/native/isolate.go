package native

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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
func (iso noIsolation) sandbox(id string, _ Limits) (sandbox, error) {
	b, err := os.ReadFile(filepath.Join(iso.dir, id, "pid"))
	if err != nil {
		return &pgroup{}, nil
	}
	rec, err := procid.Parse(strings.TrimSpace(string(b)))
	if err != nil || !rec.Alive() {
		return &pgroup{}, nil
	}
	return &pgroup{pgid: rec.PID}, nil
}

type pgroup struct{ pgid int }

func (g *pgroup) start(cmd *exec.Cmd) error {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	if err := cmd.Start(); err != nil {
		return err
	}
	g.pgid = cmd.Process.Pid
	return nil
}

func (g *pgroup) procs() ([]int, error) {
	if g.pgid == 0 {
		return nil, nil
	}
	if err := syscall.Kill(-g.pgid, 0); errors.Is(err, syscall.ESRCH) {
		return nil, nil
	}
	return []int{g.pgid}, nil
}

func (g *pgroup) kill() error {
	if g.pgid == 0 {
		return nil
	}
	if err := syscall.Kill(-g.pgid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return nil
}

func (g *pgroup) placed(int) error  { return nil }
func (g *pgroup) readopt() error    { return nil }
func (g *pgroup) remove() error     { return nil }
func (g *pgroup) setupThread() bool { return false }
func (g *pgroup) oomKills() int     { return 0 }
func (g *pgroup) empty() bool       { return false }
