package supervise

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/nexlet/localchan"
)

// nexlet is one supervised process slot.
type nexlet struct {
	s       *Supervisor
	spec    Spec
	limiter *limiter

	reset    chan struct{} // cap 1: Reset asks for a restart now
	stop     chan struct{} // closed by Stop
	stopOnce sync.Once
	done     chan struct{} // closed when run returns
	first    chan error    // the first start attempt's result
	firstOne sync.Once

	// guarded by s.mu
	state     State
	pid       int
	restarts  int
	window    []time.Time // restarts within the window
	lastExit  string
	startedAt time.Time
	group     *cgroup.Group // <root>/<name>, for stats
	groupPath string

	read atomic.Int64 // lines read from the nexlet's stdout and stderr
	// adoptTried: the first run looked for a process to adopt (only it may).
	adoptTried bool
	handOver   bool // the pending reset is a HandOver: SignalDetach, not SIGTERM
}

// drainOutput waits for the output pumps after the nexlet exited. While they still read
// (a slow machine draining a full pipe) it keeps waiting, up to a bound; when nothing
// was read for a while, an escaped process holds the pipes open and they are closed.
func (n *nexlet) drainOutput(done <-chan struct{}, log *slog.Logger) {
	const idle, bound = 5 * time.Second, 60 * time.Second
	t := time.NewTicker(idle)
	defer t.Stop()
	last, deadline := n.read.Load(), time.Now().Add(bound)
	for {
		select {
		case <-done:
			return
		case <-t.C:
			now := n.read.Load()
			if now == last || time.Now().After(deadline) {
				log.Warn("nexlet output still open after exit; closing it")
				return
			}
			last = now
		}
	}
}

func (n *nexlet) setState(st State) {
	n.s.mu.Lock()
	n.state = st
	n.s.mu.Unlock()
}

type outcome int

const (
	exited outcome = iota
	stopped
	resetting
)

func (n *nexlet) run() {
	defer close(n.done)
	log := n.s.log.With("nexlet", n.spec.Name)
	for {
		exit, how := n.runOnce()
		if how == stopped {
			n.setState(StateStopped)
			return
		}
		if how == resetting {
			continue
		}
		// Decide on a restart.
		now := time.Now()
		n.s.mu.Lock()
		limit := n.s.limit
		if exit.Runtime >= n.s.opts.Window {
			n.window = nil // it ran healthily for a whole window
		}
		cut := now.Add(-n.s.opts.Window)
		for len(n.window) > 0 && n.window[0].Before(cut) {
			n.window = n.window[1:]
		}
		fatal := exit.StartErr != nil && unrecoverable(exit.StartErr)
		if fatal || len(n.window) >= limit {
			n.state = StateFailed
			count := len(n.window)
			n.s.mu.Unlock()
			if fatal {
				log.Error("nexlet failed: cannot be started", "err", exit.StartErr)
			} else {
				log.Error("nexlet failed: restart limit reached", "last_exit", exit.Reason,
					"restarts_in_window", count, "limit", limit, "window", n.s.opts.Window)
			}
			if n.s.opts.OnFailed != nil {
				n.s.opts.OnFailed(n.spec.Name, exit)
			}
			select {
			case <-n.reset:
				log.Info("nexlet reset, starting")
				continue
			case <-n.stop:
				n.setState(StateStopped)
				return
			}
		}
		delay := backoff(len(n.window), n.s.opts.BackoffMin, n.s.opts.BackoffMax, jitter)
		n.window = append(n.window, now)
		n.restarts++
		n.state = StateBackoff
		restarts := n.restarts
		n.s.mu.Unlock()
		log.Warn("nexlet exited, restarting", "last_exit", exit.Reason, "backoff", delay, "restarts", restarts)
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-n.reset:
			t.Stop()
		case <-n.stop:
			t.Stop()
			n.setState(StateStopped)
			return
		}
	}
}

// unrecoverable tells start errors that a retry cannot fix.
func unrecoverable(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, os.ErrPermission) ||
		errors.Is(err, syscall.ENOEXEC) || errors.Is(err, exec.ErrNotFound)
}

// unlisted makes the workloads' group, whose subgroups are named for workload ids, one
// that others may pass through but not list (Group.Unlist).
func unlisted(g *cgroup.Group, err error) error {
	if g == nil {
		return err
	}
	return errors.Join(err, g.Unlist())
}

// groups makes the nexlet's cgroup and the root for its workloads' groups: with
// Options.Workloads, <root>/<name> for the process and the shared workloads root;
// otherwise <root>/<name> with the limits, <root>/<name>/nexlet for the process and
// <root>/<name>/workloads. Without usable cgroups the nexlet still runs, in its own
// process group.
func (n *nexlet) groups() (top, proc *cgroup.Group, wl *cgroup.Manager) {
	cg := n.s.cg
	if cg.Mode() == cgroup.ModeNone {
		// One group: it tracks the process group of what it started.
		top, _ = cg.Create(n.spec.Name, cgroup.Limits{})
		return top, top, cg
	}
	top, err := cg.Create(n.spec.Name, n.spec.Limits)
	if top != nil {
		var perr error
		if w := n.s.opts.Workloads; w != nil {
			proc, wl = top, w
			perr = unlisted(w.Create("", n.s.opts.WorkloadsLimits))
		} else {
			sub := cg.Sub(n.spec.Name)
			proc, perr = sub.Create("nexlet", cgroup.Limits{})
			if perr == nil {
				perr = unlisted(sub.Create("workloads", cgroup.Limits{}))
			}
			wl = sub.Sub("workloads")
		}
		err = errors.Join(err, perr)
	}
	if err != nil {
		n.s.log.Error("nexlet cgroup incomplete, limits may not be enforced", "nexlet", n.spec.Name, "err", err)
	}
	if top == nil || proc == nil {
		if top != nil {
			_ = top.Remove()
		}
		none := cgroup.Disabled(fmt.Sprintf("cgroup for nexlet %s failed: %v", n.spec.Name, err), n.s.log)
		top, _ = none.Create(n.spec.Name, cgroup.Limits{})
		return top, top, none
	}
	return top, proc, wl
}

// runOnce starts the process (or adopts the one an earlier supervisor left running),
// waits for it to end (or for a stop or reset request), and removes its cgroup with
// anything left in it. A stop after Detach leaves an outliving nexlet running instead.
func (n *nexlet) runOnce() (ExitInfo, outcome) {
	log := n.s.log.With("nexlet", n.spec.Name)
	n.setState(StateStarting)
	top, proc, wl := n.groups()
	oomBefore, _ := top.OOMKills()

	var (
		pid        int
		signal     func(os.Signal) error
		waited     <-chan error
		outR, errR *os.File
		cmd        *exec.Cmd
		adop       *adopted
	)
	if rec, ok := n.adoptable(); ok {
		var err error
		if adop, err = n.adopt(rec); err != nil {
			log.Warn("cannot adopt the running nexlet; starting a new one", "pid", rec.PID, "err", err)
			adop = nil
		} else {
			pid, signal, waited, outR, errR = adop.pid, adop.signal, adop.waited, adop.outR, adop.errR
			log.Info("adopted the running nexlet", "pid", pid, "child", adop.child, "cgroup", top.Path())
			n.s.dropPrestart(n.spec)
			replaced := exeReplaced(pid, n.spec.Path)
			if replaced && !adop.child && !n.s.watchesOrphans(orphanWatchWait) {
				log.Warn("the adopted nexlet runs a replaced binary but is not nexd's child and process events are unavailable: it keeps running the old binary until it restarts", "pid", pid, "path", n.spec.Path)
				replaced = false
			}
			if replaced {
				// An upgrade re-executed nexd: the nexlet runs the old binary. Its
				// workloads come to us (the subreaper) while a new nexlet takes them
				// over; when it is not our child (adopted after a restart) they go to
				// init and the process events give their exits. No exit status is lost.
				log.Info("the adopted nexlet runs a replaced binary; handing its workloads to a new one", "pid", pid, "path", n.spec.Path, "child", adop.child)
				n.s.mu.Lock()
				n.handOver = true
				n.s.mu.Unlock()
				select {
				case n.reset <- struct{}{}:
				default:
				}
			}
		}
	}
	if adop == nil {
		var outW, errW *os.File
		var err error
		if outR, outW, errR, errW, err = n.outputPipes(); err != nil {
			return n.startFailed(top, err)
		}
		cmd = &exec.Cmd{
			Path:   n.spec.Path,
			Args:   append([]string{n.spec.Path}, n.spec.Args...),
			Env:    n.childEnv(wl.Spec()),
			Stdout: outW,
			Stderr: errW,
		}
		var ch *os.File
		if n.s.opts.Channel != nil {
			if ch = n.s.opts.Channel(n.spec.Name); ch != nil {
				cmd.ExtraFiles = []*os.File{ch} // descriptor 3
				cmd.Env = append(cmd.Env, localchan.EnvFD+"=3")
			}
		}
		pre := n.s.takePrestart(n.spec)
		if pre != nil {
			if err := n.handOff(pre, proc, cmd.Env, outW, errW, ch, log); err != nil {
				log.Warn("pre-started nexlet not used; starting one anew", "pid", pre.Pid(), "err", err)
				pre.release()
				pre = nil
			}
		}
		switch r := n.s.reaper; {
		case pre != nil:
			cmd.Process = pre.proc // placed, recorded, hardened and handed its start
		case r != nil:
			// The reaper must not take this child's exit from cmd.Wait.
			r.forkMu.Lock()
			err = proc.Start(cmd)
			if err == nil {
				r.started(cmd.Process.Pid)
			}
			r.forkMu.Unlock()
		default:
			err = proc.Start(cmd)
		}
		outW.Close()
		errW.Close()
		if ch != nil {
			ch.Close() // the child's now, or nobody's
		}
		if err != nil {
			outR.Close()
			errR.Close()
			return n.startFailed(top, err)
		}
		pid, signal = cmd.Process.Pid, cmd.Process.Signal
		w := make(chan error, 1)
		waited = w
		if pre != nil {
			go func() { // ends with the process, as cmd.Wait's below
				<-pre.done
				cmd.ProcessState = pre.pstate // read once w is
				w <- pre.werr
			}()
		} else {
			n.record(pid)
			go func() {
				// Exited, not reaped yet: a group outside cgroups (none mode)
				// notes what the nexlet left in its process group while its
				// zombie holds the group's number, so that the kill after the
				// reap still finds it (cgroup.Group.NoteMembers).
				var info unix.Siginfo
				for errors.Is(unix.Waitid(unix.P_PID, cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil), unix.EINTR) {
				}
				proc.NoteMembers()
				err := cmd.Wait()
				if r := n.s.reaper; r != nil {
					r.waited(cmd.Process.Pid)
				}
				w <- err
			}()
			n.lowerOOMScore(pid, log)
		}
	}
	started := time.Now()
	var pumps sync.WaitGroup
	pumps.Add(2)
	go func() { defer pumps.Done(); n.pump(outR, "stdout") }()
	go func() { defer pumps.Done(); n.pump(errR, "stderr") }()

	n.s.mu.Lock()
	n.state, n.pid, n.startedAt = StateRunning, pid, started
	n.group, n.groupPath = top, top.Path()
	n.s.mu.Unlock()
	if adop == nil {
		log.Info("nexlet started", "pid", pid, "cgroup", top.Path())
	}
	n.reportFirst(nil)

	how := exited
	var werr error
	left := false
	select {
	case werr = <-waited:
		if w := n.s.orphans.Load(); w != nil {
			// Its workloads are reparented now (to init, when it was adopted): watch
			// the ones it started since the last look, and record those that ended
			// while it died.
			w.nexletGone(pid)
			w.refresh()
		}
	case <-n.stop:
		how = stopped
		n.s.mu.Lock()
		left = n.s.detach && n.outlives()
		n.s.mu.Unlock()
		if !left {
			werr = n.terminate(signal, top, proc, waited)
		}
	case <-n.reset:
		how = resetting
		werr = n.terminate(signal, top, proc, waited)
	}
	runtime := time.Since(started)

	if left {
		// It keeps running, with its cgroup, record and FIFOs, for the next nexd.
		outR.Close()
		errR.Close()
		pumps.Wait()
		n.limiter.flush(n.s.log, n.spec.Name)
		n.s.mu.Lock()
		n.pid, n.lastExit, n.group = 0, "left running for the next nexd", nil
		n.s.mu.Unlock()
		log.Info("nexlet left running for the next nexd", "pid", pid)
		return ExitInfo{Reason: "left running", Code: -1, Runtime: runtime, Stopped: true}, how
	}
	if n.outlives() {
		removeRecord(n.s.opts.RecordDir, n.spec.Name)
	}

	// Whatever the nexlet left behind (forked children, workloads) goes with it.
	oomAfter, _ := top.OOMKills()
	if proc != top {
		_ = proc.Kill() // reaches a process that could not be placed in the cgroup
	}
	if err := top.Remove(); err != nil {
		log.Error("cannot remove nexlet cgroup", "cgroup", top.Path(), "err", err)
	}
	done := make(chan struct{})
	go func() { pumps.Wait(); close(done) }()
	n.drainOutput(done, log)
	outR.Close()
	errR.Close()
	<-done
	n.limiter.flush(n.s.log, n.spec.Name)

	exit := ExitInfo{Reason: "exit status 0", Runtime: runtime, Stopped: how != exited}
	switch {
	case cmd != nil && cmd.ProcessState != nil:
		exit.Code = cmd.ProcessState.ExitCode()
		exit.Reason = cmd.ProcessState.String()
	case adop != nil && werr == nil:
		exit.Code, exit.Reason = adop.exitOf()
	case werr != nil:
		exit.Code, exit.Reason = -1, werr.Error()
	}
	if oomAfter > oomBefore {
		exit.OOM, exit.Reason = true, "oom-killed"
	}
	n.s.mu.Lock()
	n.pid, n.lastExit, n.group = 0, exit.Reason, nil
	n.s.mu.Unlock()
	if how == exited {
		log.Warn("nexlet exited", "reason", exit.Reason, "runtime", runtime)
	} else {
		log.Info("nexlet stopped", "reason", exit.Reason, "runtime", runtime)
	}
	if n.s.opts.OnExit != nil {
		n.s.opts.OnExit(n.spec.Name, exit)
	}
	return exit, how
}

// lowerOOMScore writes the nexlet's oom_score_adj (Options.NexletOOMScoreAdj).
func (n *nexlet) lowerOOMScore(pid int, log *slog.Logger) {
	if adj := n.s.opts.NexletOOMScoreAdj; adj != 0 {
		p := fmt.Sprintf("/proc/%d/oom_score_adj", pid)
		if err := os.WriteFile(p, []byte(strconv.Itoa(adj)), 0); err != nil {
			log.Debug("cannot lower the nexlet's oom_score_adj; its workloads get a higher one instead", "value", adj, "err", err)
		}
	}
}

// handOff makes the pre-started process this start's nexlet: it is placed in proc (the
// group a fork would be born in), recorded and given its oom_score_adj, and only then
// handed env and its descriptors, after which it runs the nexlet. An error leaves the
// process waiting (the caller releases it): a runtime variable env sets otherwise than
// its exec did, a CPU limit its runtime would have sized GOMAXPROCS by, a group that
// refuses it (none mode too), a process that died.
func (n *nexlet) handOff(p *Prestarted, proc *cgroup.Group, env []string, outW, errW, ch *os.File, log *slog.Logger) error {
	if k := p.runtimeMismatch(env); k != "" {
		return fmt.Errorf("its runtime read another %s at exec", k)
	}
	if n.spec.Limits.CPUMax > 0 || p.procsLimited {
		// Its GOMAXPROCS follows the CPU limit of the group it was exec'd in.
		return errors.New("its runtime sized GOMAXPROCS by the CPU limit of nexd's cgroup at exec, not its own")
	}
	// Its warm-up move (a no-op, Prestarted.warmAttach) must not come after this one.
	<-p.warmed
	// Once the process ended and was reaped its pid may be any other process's,
	// which must not be moved, recorded or hardened in its stead.
	err := p.whileUnreaped(func(pid int) error {
		if err := proc.Place(pid); err != nil {
			return err
		}
		n.record(pid)
		n.lowerOOMScore(pid, log)
		return nil
	})
	if err != nil {
		return err
	}
	pid := p.Pid()
	if err := p.handOff(env, outW, errW, ch); err != nil {
		if n.outlives() {
			removeRecord(n.s.opts.RecordDir, n.spec.Name)
		}
		return err
	}
	log.Debug("pre-started nexlet handed its start", "pid", pid)
	return nil
}

func (n *nexlet) reportFirst(err error) {
	n.firstOne.Do(func() { n.first <- err })
}

func (n *nexlet) startFailed(top *cgroup.Group, err error) (ExitInfo, outcome) {
	_ = top.Remove()
	exit := ExitInfo{Reason: "start: " + err.Error(), Code: -1, StartErr: fmt.Errorf("start nexlet %s (%s): %w", n.spec.Name, n.spec.Path, err)}
	n.s.mu.Lock()
	n.lastExit = exit.Reason
	n.s.mu.Unlock()
	n.s.log.Error("nexlet start failed", "nexlet", n.spec.Name, "path", n.spec.Path, "err", err)
	n.reportFirst(exit.StartErr)
	if n.s.opts.OnExit != nil {
		n.s.opts.OnExit(n.spec.Name, exit)
	}
	select {
	case <-n.stop:
		return exit, stopped
	default:
		return exit, exited
	}
}

// terminate asks the nexlet to stop with SIGTERM and kills its whole group after the
// grace period (at once if Stop is out of time).
func (n *nexlet) terminate(signal func(os.Signal) error, top, proc *cgroup.Group, waited <-chan error) error {
	n.setState(StateStopping)
	sig := syscall.SIGTERM
	n.s.mu.Lock()
	if n.s.detach || n.handOver {
		sig = SignalDetach
	}
	n.handOver = false
	n.s.mu.Unlock()
	_ = signal(sig)
	t := time.NewTimer(n.s.opts.Grace)
	defer t.Stop()
	select {
	case err := <-waited:
		return err
	case <-t.C:
		n.s.log.Warn("nexlet ignored SIGTERM, killing it", "nexlet", n.spec.Name, "grace", n.s.opts.Grace)
	case <-n.s.hurry:
	}
	if err := top.Kill(); err != nil {
		n.s.log.Error("nexlet group kill failed", "nexlet", n.spec.Name, "err", err)
	}
	if proc != top {
		_ = proc.Kill() // reaches a process that could not be placed in the cgroup
	}
	_ = signal(syscall.SIGKILL) // in case it escaped its group
	return <-waited
}
