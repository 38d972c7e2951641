// Package supervise runs nexlets as child processes of nexd: each in its own cgroup with
// its limits, restarted with exponential backoff up to a restart limit, stopped with
// SIGTERM and then a group kill, with a clean environment and its output in the log.
//
// Cgroup layout with Options.Workloads set (what nexd uses), so that a nexlet that dies
// takes none of its workloads with it:
//
//	<nexlets root>/<name>/   the nexlet process, with its own limits
//	<workloads root>/<id>/   one group per workload, created by the nexlet
//
// Without Options.Workloads (tests, embedders) the workloads stay below their nexlet:
// <name>/nexlet/ holds the process and <name>/workloads/<id>/ the workloads.
//
// The child gets the Spec() of the root for its workload groups in the environment
// variable NEX_AGENT_CGROUP, to open with cgroup.Attach.
//
// With Options.ExitsDir set, nexd becomes the child subreaper (PR_SET_CHILD_SUBREAPER):
// workloads whose nexlet died are reparented to nexd, which reaps them and records how
// they ended for the nexlet that adopts them (see reaper).
package supervise

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/names"
	"github.com/nexd-project/nexd/internal/procid"
)

// EnvCgroup is the environment variable carrying the nexlet's cgroup subtree (see
// cgroup.Manager.Spec and cgroup.Attach).
const EnvCgroup = "NEX_AGENT_CGROUP"

// Spec describes one nexlet process.
type Spec struct {
	Name string // unique; letters, digits, '-' and '_' (it names the cgroup)
	Path string // executable
	Args []string
	// Env is the child's whole environment (configured env plus the NEX_AGENT_*
	// variables of the caller); nothing of nexd's environment is inherited.
	Env    map[string]string
	Limits cgroup.Limits
	// Outlive: the nexlet may outlive the supervisor (see outlive.go): Detach then
	// Stop leave it running, and the next supervisor adopts it. It must handle
	// SignalReattach (register again) and SignalDetach (exit, leaving its workloads).
	// Needs Options.RecordDir and Options.FIFODir.
	Outlive bool
}

// State of a nexlet.
type State string

// The states.
const (
	StateStarting State = "starting"
	StateRunning  State = "running"
	StateBackoff  State = "backoff" // waiting to restart
	StateFailed   State = "failed"  // past the restart limit, until Reset
	StateStopping State = "stopping"
	StateStopped  State = "stopped"
)

// ExitInfo describes how a nexlet process ended.
type ExitInfo struct {
	Reason   string        // "exit status 1", "signal: killed", "oom-killed", "start: ..."
	Code     int           // exit code; -1 if killed by a signal or not started
	OOM      bool          // the OOM killer struck in the nexlet's cgroup
	Runtime  time.Duration // how long it ran
	StartErr error         // set when the process could not be started
	Stopped  bool          // ended on request (Stop or Reset)
}

// Status of one nexlet, for nexctl status and node info.
type Status struct {
	Name      string
	PID       int
	State     State
	Restarts  int    // restarts since start or the last Reset
	LastExit  string // ExitInfo.Reason of the last exit
	StartedAt time.Time
	Cgroup    string // the nexlet's cgroup directory, "" without cgroups
	Stats     cgroup.Stats
}

// Options of a Supervisor. Zero durations take the defaults.
type Options struct {
	// Cgroups is the root for the nexlets' cgroups (e.g. Sub("nexlets") of the detected
	// manager); nil or none mode runs them without cgroups.
	Cgroups *cgroup.Manager
	// RestartLimit is how often a nexlet is restarted within Window before it is failed.
	// 0 means never restart (it still starts once).
	RestartLimit int
	// Window for counting restarts (default 5m); a nexlet that ran that long without
	// exiting starts counting afresh.
	Window     time.Duration
	Grace      time.Duration // SIGTERM to group kill on stop (default 10s)
	BackoffMin time.Duration // first restart delay (default 100ms)
	BackoffMax time.Duration // restart delay cap (default 30s)
	Logger     *slog.Logger
	// LogRate is the number of output lines per second a nexlet may log (default 200),
	// with bursts of LogBurst (default 1000); the rest is counted and reported.
	LogRate  float64
	LogBurst int
	// OnExit, if set, is called after every exit of a nexlet process.
	OnExit func(name string, exit ExitInfo)
	// OnFailed, if set, is called when a nexlet is given up (restart limit reached
	// or its binary cannot be started); it stays failed until Reset.
	OnFailed func(name string, last ExitInfo)
	// Env, if set, is called before every (re)start; its variables are added to the
	// spec's (fresh credentials, for instance).
	Env func(name string) map[string]string
	// Workloads, if set, is the root of the workloads' cgroups, outside every nexlet's
	// subtree (see the package comment).
	Workloads *cgroup.Manager
	// WorkloadsLimits are the limits of the workloads' root itself, all workloads
	// together: each workload's own limits are its start request's, so only these
	// bound what many of them (or one that asked for much) take from the host.
	WorkloadsLimits cgroup.Limits
	// ExitsDir, if set, makes this process the child subreaper and is where the exit
	// records of reaped orphans go (procid.WriteExit).
	ExitsDir string
	// RecordDir and FIFODir, when both set, let nexlets with Spec.Outlive outlive the
	// supervisor: each is recorded while it runs in <RecordDir>/<name>/process.json
	// (pid, start time, Meta) and writes its output to named FIFOs in FIFODir.
	RecordDir string
	FIFODir   string
	// Meta, if set, is called after each start of an outliving nexlet; what it
	// returns is kept in its record (ReadRecord gives it back to the next supervisor).
	Meta func(name string) map[string]string
	// Adopt names the outliving nexlets whose recorded, still running processes
	// Start adopts instead of starting new ones; their cgroups are spared by the
	// first Start's clean-up.
	Adopt []string
	// Handed are records a re-executing predecessor handed over in memory, by name:
	// used instead of the files in RecordDir (still checked against the live process).
	Handed map[string]Record
	// Orphans, if set with ExitsDir, lists the workload processes the nexlets recorded
	// (main processes, pid and start time): the exit of one that ends reparented to
	// init (its nexlet, adopted from an earlier nexd, had died) is recorded in ExitsDir
	// too, from the kernel's process events (see orphanWatch).
	Orphans func() []procid.ID
	// NexletOOMScoreAdj is written to each nexlet's oom_score_adj after start (0 leaves
	// it inherited), so the OOM killer picks a workload before the nexlet that runs it.
	NexletOOMScoreAdj int
	// Channel, if set, is called before each start of a nexlet (not an adoption): a
	// file it returns is the child's descriptor 3, named by localchan.EnvFD in its
	// environment, and closed here once the child has it.
	Channel func(name string) *os.File
	// Prestarted, if set, is a process Prestart started ahead: the first start of the
	// nexlet it matches (Spec.Path and Args) takes it instead of forking (see
	// prestart.go); an adoption of that nexlet, or Stop, discards it.
	Prestarted *Prestarted
}

// Supervisor runs and watches nexlet processes.
type Supervisor struct {
	opts Options
	log  *slog.Logger
	cg   *cgroup.Manager

	cleanOnce sync.Once
	hurry     chan struct{} // closed when Stop runs out of time: kill at once
	hurryOnce sync.Once

	reaper     *reaper                     // nil unless Options.ExitsDir
	orphans    atomic.Pointer[orphanWatch] // nil unless Options.Orphans and process events work here
	orphansSet chan struct{}               // closed once orphans is decided; nil without Options.Orphans
	reapCancel context.CancelFunc
	reapDone   chan struct{}

	mu       sync.Mutex
	limit    int
	stopping bool
	detach   bool // Stop sends SignalDetach: workloads stay for the next nexd
	// leave: Stop leaves the workloads' cgroups alone (LeaveWorkloads)
	leave   bool
	nexlets map[string]*nexlet
	// pre is Options.Prestarted until a start takes it or it is discarded.
	pre *Prestarted
}

// New makes a Supervisor. It raises RLIMIT_NOFILE to its hard limit for this process,
// which also makes every child inherit the raised limit (Go otherwise restores the
// original soft limit in children).
func New(opts Options) *Supervisor {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Window <= 0 {
		opts.Window = 5 * time.Minute
	}
	if opts.Grace <= 0 {
		opts.Grace = 10 * time.Second
	}
	if opts.BackoffMin <= 0 {
		opts.BackoffMin = 100 * time.Millisecond
	}
	if opts.BackoffMax <= 0 {
		opts.BackoffMax = 30 * time.Second
	}
	if opts.BackoffMax < opts.BackoffMin {
		opts.BackoffMax = opts.BackoffMin
	}
	if opts.LogRate <= 0 {
		opts.LogRate = 200
	}
	if opts.LogBurst <= 0 {
		opts.LogBurst = 1000
	}
	if opts.RestartLimit < 0 {
		opts.RestartLimit = 0
	}
	cg := opts.Cgroups
	if cg == nil {
		cg = cgroup.Disabled("no cgroup manager given", opts.Logger)
	}
	s := &Supervisor{opts: opts, log: opts.Logger, cg: cg, limit: opts.RestartLimit,
		hurry: make(chan struct{}), nexlets: map[string]*nexlet{}, pre: opts.Prestarted}
	raiseNofile(s.log)
	closeInheritedOnExec(s.log)
	if opts.ExitsDir != "" {
		r, err := newReaper(s.log, opts.ExitsDir)
		if err != nil {
			s.log.Warn("cannot become the child subreaper: workloads whose nexlet dies go to init and their exit codes are lost", "err", err)
		} else {
			pruneExits(opts.ExitsDir)
			if p := opts.Prestarted; p != nil {
				// Already our child: the reaper must leave its exit to its exec.Cmd.
				pid := p.Pid()
				r.forkMu.Lock()
				r.started(pid)
				r.forkMu.Unlock()
				if !p.setOnWaited(func() { r.waited(pid) }) {
					r.waited(pid)
				}
			}
			ctx, cancel := context.WithCancel(context.Background())
			s.reaper, s.reapCancel, s.reapDone = r, cancel, make(chan struct{})
			if opts.Orphans != nil {
				s.orphansSet = make(chan struct{})
			}
			go func() {
				defer close(s.reapDone)
				var wg sync.WaitGroup
				if opts.Orphans != nil {
					// In the background: finding out that a container gets no
					// process events takes a moment, which start-up need not wait for.
					wg.Go(func() {
						w, err := newOrphanWatch(s.log, opts.ExitsDir, opts.Orphans, s.mine)
						defer close(s.orphansSet)
						if err != nil {
							s.log.Info("process exit events unavailable (they need root in the host's namespaces): the exit code of a workload whose adopted nexlet dies is unknown", "err", err)
							return
						}
						s.orphans.Store(w)
						w.refresh()
						w.run(ctx)
					})
				}
				r.run(ctx)
				wg.Wait()
			}()
		}
	}
	return s
}

// mine reports whether pid is this process or a running nexlet: a parent that reaps
// and reports its children's exits itself.
func (s *Supervisor) mine(pid int) bool {
	if pid == os.Getpid() {
		return true
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nexlets {
		if n.pid == pid && pid > 0 {
			return true
		}
	}
	return false
}

// watchesOrphans reports whether nexd learns the exits of workloads reparented to init
// (process events), waiting up to wait for that to be known.
func (s *Supervisor) watchesOrphans(wait time.Duration) bool {
	if s.orphansSet == nil {
		return false
	}
	select {
	case <-s.orphansSet:
	case <-time.After(wait):
	}
	return s.orphans.Load() != nil
}

// ExitsDir is where exit records of reaped orphans go; "" when nexd is not the subreaper.
func (s *Supervisor) ExitsDir() string {
	if s.reaper == nil {
		return ""
	}
	return s.reaper.exits
}

// closeInheritedOnExec marks every descriptor above stderr close-on-exec. Go opens its
// own files that way, but descriptors nexd inherited (from a shell, or a service
// manager) would otherwise leak into every nexlet.
func closeInheritedOnExec(log *slog.Logger) {
	if err := earlynexlet.CloseInheritedOnExec(); err != nil {
		log.Warn("cannot mark inherited descriptors close-on-exec", "err", err)
	}
}

func raiseNofile(log *slog.Logger) {
	if err := earlynexlet.RaiseNofile(); err != nil {
		log.Warn("cannot raise RLIMIT_NOFILE", "err", err)
	}
}

// Start validates spec and starts the nexlet, supervised in the background until Stop.
// It returns once the first start attempt is made: its error (an executable that cannot
// be run leaves the nexlet failed) or nil. ctx bounds only this wait. The first Start
// kills and removes whatever an earlier run left in the nexlets cgroup root.
func (s *Supervisor) Start(ctx context.Context, spec Spec) error {
	if !names.Valid(spec.Name, names.Alnum, names.Alnum|names.Underscore|names.Dash, 63) {
		return fmt.Errorf("nexlet name %q: use 1-63 letters, digits, '-' or '_', starting with a letter or digit", spec.Name)
	}
	if spec.Path == "" {
		return fmt.Errorf("nexlet %s: no executable path", spec.Name)
	}
	if err := spec.Limits.Validate(); err != nil {
		return fmt.Errorf("nexlet %s limits: %w", spec.Name, err)
	}
	if !strings.Contains(spec.Path, "/") {
		p, err := exec.LookPath(spec.Path)
		if err != nil {
			return fmt.Errorf("nexlet %s: %w", spec.Name, err)
		}
		spec.Path = p
	}
	s.cleanOnce.Do(s.cleanupStale)
	s.mu.Lock()
	if s.stopping {
		s.mu.Unlock()
		return fmt.Errorf("nexlet %s: supervisor is stopping", spec.Name)
	}
	if _, dup := s.nexlets[spec.Name]; dup {
		s.mu.Unlock()
		return fmt.Errorf("nexlet %s: already supervised", spec.Name)
	}
	spec.Args = slices.Clone(spec.Args)
	spec.Env = maps.Clone(spec.Env)
	n := &nexlet{s: s, spec: spec, state: StateStarting,
		reset: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{}),
		first: make(chan error, 1), limiter: newLimiter(s.opts.LogRate, s.opts.LogBurst)}
	s.nexlets[spec.Name] = n
	s.mu.Unlock()
	go n.run()
	select {
	case err := <-n.first:
		return err
	case <-ctx.Done():
		return fmt.Errorf("nexlet %s: %w", spec.Name, ctx.Err())
	}
}

func (s *Supervisor) cleanupStale() {
	var spare []string
	for _, name := range s.opts.Adopt {
		if _, ok := s.record(name); ok {
			spare = append(spare, name)
		}
	}
	if len(spare) > 0 {
		s.cleanupStaleExcept(spare)
		return
	}
	killed, err := s.cg.CleanupStale("")
	if err != nil {
		s.log.Warn("cannot clean up nexlet cgroups of an earlier run", "cgroup", s.cg.Path(), "err", err)
	} else if killed > 0 {
		s.log.Warn("killed processes left by an earlier run", "cgroup", s.cg.Path(), "killed", killed)
	}
}

// cleanupStaleExcept cleans up the groups below the nexlets root one by one, sparing
// those of nexlets about to be adopted.
func (s *Supervisor) cleanupStaleExcept(spare []string) {
	if s.cg.Mode() == cgroup.ModeNone {
		return
	}
	ents, err := os.ReadDir(s.cg.Path())
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			s.log.Warn("cannot clean up nexlet cgroups of an earlier run", "cgroup", s.cg.Path(), "err", err)
		}
		return
	}
	for _, e := range ents {
		if !e.IsDir() || slices.Contains(spare, e.Name()) {
			continue
		}
		killed, err := s.cg.CleanupStale(e.Name())
		if err != nil {
			s.log.Warn("cannot clean up a nexlet cgroup of an earlier run", "cgroup", e.Name(), "err", err)
		} else if killed > 0 {
			s.log.Warn("killed processes left by an earlier run", "cgroup", e.Name(), "killed", killed)
		}
	}
}

// Count says how many nexlets there are and how many of them failed, without the
// cgroup statistics Statuses reads for each.
func (s *Supervisor) Count() (nexlets, failed int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, n := range s.nexlets {
		if n.state == StateFailed {
			failed++
		}
	}
	return len(s.nexlets), failed
}

// Statuses reports every nexlet, sorted by name.
func (s *Supervisor) Statuses() []Status {
	s.mu.Lock()
	var out []Status
	var groups []*cgroup.Group
	for _, n := range s.nexlets {
		out = append(out, Status{Name: n.spec.Name, PID: n.pid, State: n.state, Restarts: n.restarts,
			LastExit: n.lastExit, StartedAt: n.startedAt, Cgroup: n.groupPath})
		groups = append(groups, n.group)
	}
	s.mu.Unlock()
	for i, g := range groups {
		if g != nil && out[i].PID != 0 {
			out[i].Stats, _ = g.Stats() // a group that just went away has no stats
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Reset clears a nexlet's restart count and failed state and restarts it now (a running
// nexlet is stopped first, with the grace period).
func (s *Supervisor) Reset(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nexlets[name]
	if !ok {
		return fmt.Errorf("nexlet %q: not supervised here", name)
	}
	if s.stopping || n.state == StateStopped || n.state == StateStopping {
		return fmt.Errorf("nexlet %s: %s", name, n.state)
	}
	n.restarts = 0
	n.window = nil
	select {
	case n.reset <- struct{}{}:
	default: // one pending reset is enough
	}
	return nil
}

// HandOver restarts an outliving nexlet without stopping its workloads: it gets
// SignalDetach (it lets go of them and exits) and a new one starts and adopts them. Used
// when an adopted nexlet does not register again (it cannot reach this nexd's NATS) and
// to replace one that runs an older binary.
func (s *Supervisor) HandOver(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, ok := s.nexlets[name]
	if !ok {
		return fmt.Errorf("nexlet %q: not supervised here", name)
	}
	if s.stopping || n.state != StateRunning {
		return fmt.Errorf("nexlet %s: %s", name, n.state)
	}
	n.handOver = true
	select {
	case n.reset <- struct{}{}:
	default:
	}
	return nil
}

// SetRestartLimit changes the restart limit (config reload); it applies from the next exit.
func (s *Supervisor) SetRestartLimit(n int) {
	s.mu.Lock()
	s.limit = max(n, 0)
	s.mu.Unlock()
}

// SignalDetach asks a nexlet to exit and leave its workloads running (live_restore):
// the native nexlet lets go of them; a nexlet without a handler dies of it, which
// leaves its workloads too, as they are not in its cgroup.
const SignalDetach = syscall.SIGUSR1

// Detach makes the next Stop leave workloads running: outliving nexlets (Spec.Outlive)
// are left running as they are, the others get SignalDetach instead of SIGTERM, and the
// workloads' cgroups are left alone.
func (s *Supervisor) Detach() {
	s.mu.Lock()
	s.detach = true
	s.mu.Unlock()
}

// LeaveWorkloads makes the next Stop leave whatever runs in the workloads' cgroups
// alone while it stops the nexlets as usual: for a stop before the node took its
// workloads over (a start abandoned while the native nexlet started early), when what
// runs there is an earlier nexd's, left for the nexd that adopts it (live_restore).
func (s *Supervisor) LeaveWorkloads() {
	s.mu.Lock()
	s.leave = true
	s.mu.Unlock()
}

// Stop stops every nexlet (SIGTERM, or SignalDetach after Detach; then a kill of the
// nexlet's own group after the grace period, or at once when ctx ends) and removes
// their cgroups. Unless detached, whatever is left in the workloads' cgroups is killed
// too, so nothing survives it. Start fails afterwards.
func (s *Supervisor) Stop(ctx context.Context) error {
	s.mu.Lock()
	s.stopping = true
	pre := s.pre
	s.pre = nil
	var all []*nexlet
	for _, n := range s.nexlets {
		all = append(all, n)
		n.stopOnce.Do(func() { close(n.stop) })
	}
	s.mu.Unlock()
	pre.Discard() // no start took it
	var ctxErr error
	for _, n := range all {
		select {
		case <-n.done:
		case <-ctx.Done():
			ctxErr = ctx.Err()
			s.hurryOnce.Do(func() { close(s.hurry) })
			<-n.done // the group kill is bounded
		}
	}
	s.mu.Lock()
	detach, leave := s.detach, s.leave
	s.mu.Unlock()
	var left []string
	if detach {
		for _, n := range all {
			if n.outlives() {
				left = append(left, n.spec.Name)
			}
		}
	}
	var err error
	if len(left) > 0 {
		s.cleanupStaleExcept(left)
	} else {
		_, err = s.cg.CleanupStale("")
	}
	if w := s.opts.Workloads; w != nil && !detach && !leave {
		killed, werr := w.CleanupStale("")
		if killed > 0 {
			s.log.Warn("killed workload processes their nexlets left behind", "cgroup", w.Path(), "killed", killed)
		}
		err = errors.Join(err, werr)
	}
	if s.reaper != nil {
		s.reapCancel()
		<-s.reapDone
	}
	return errors.Join(ctxErr, err)
}

// claimPrestart removes and returns the pre-started process if it is spec's nexlet's
// (nil otherwise, and once it was claimed).
func (s *Supervisor) claimPrestart(spec Spec) *Prestarted {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := s.pre
	if p == nil || !p.matches(spec) {
		return nil
	}
	s.pre = nil
	return p
}

// takePrestart returns the pre-started process for the start of spec, once: the first
// start of the nexlet it matches takes it (nil for every other start).
func (s *Supervisor) takePrestart(spec Spec) *Prestarted {
	if p := s.claimPrestart(spec); p != nil && p.take() {
		return p
	}
	return nil
}

// dropPrestart discards the pre-started process of spec's nexlet, if any: it was
// adopted from the previous nexd instead.
func (s *Supervisor) dropPrestart(spec Spec) {
	if p := s.claimPrestart(spec); p != nil {
		s.log.Info("pre-started nexlet discarded: the running one was adopted", "nexlet", spec.Name, "pid", p.Pid())
		p.Discard()
	}
}

// backoff is the delay before restart number n+1 (n from 0): min·2ⁿ capped at max, with
// up to a quarter more of jitter (still capped) so restarts of many nexlets spread out.
func backoff(n int, min, max time.Duration, rnd func() float64) time.Duration {
	d := max
	if n < 62 && min<<n > 0 && min<<n < max {
		d = min << n
	}
	d += time.Duration(rnd() * float64(d) / 4)
	if d > max {
		d = max
	}
	return d
}

// jitter is the random source of backoff.
func jitter() float64 { return rand.Float64() }

// dropEnv are variables of nexd's own service manager contract that must never reach a
// nexlet, even when configured.
func droppedEnv(k string) bool {
	switch k {
	case "NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "INVOCATION_ID", "MAINPID":
		return true
	}
	return strings.HasPrefix(k, "LISTEN_")
}

// childEnv builds the child's whole environment, sorted.
func (n *nexlet) childEnv(cgSpec string) []string {
	m := map[string]string{}
	for k, v := range n.spec.Env {
		m[k] = v
	}
	if n.s.opts.Env != nil {
		for k, v := range n.s.opts.Env(n.spec.Name) {
			m[k] = v
		}
	}
	m[EnvCgroup] = cgSpec
	out := make([]string, 0, len(m)) // never nil: a nil Env would inherit nexd's
	for k, v := range m {
		if droppedEnv(k) || k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			n.s.log.Warn("nexlet environment variable dropped", "nexlet", n.spec.Name, "var", k)
			continue
		}
		out = append(out, k+"="+v)
	}
	sort.Strings(out)
	return out
}
