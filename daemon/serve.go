package daemon

import (
	"context"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/sysd"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/coldpages"
	"github.com/nexd-project/nexd/internal/memtrim"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// serve starts the built node in order: the node API, the nexlets, then (last) the
// full control API and the metrics listener, which answer while the nexlets register;
// READY=1 follows once they have (or startup_timeout passed).
func (s *server) serve(startCtx context.Context) error {
	cfg := s.cfg()
	if err := s.node.Start(s.ctx); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	s.closers.push("node API", s.node.Stop)
	if cfg.Node.AllowRemoteAgentRegistration {
		s.log.Warn("remote nexlet registration is enabled", "nexus", cfg.Node.Nexus)
	}
	if cfg.Node.AllowNexletDirectFeeds {
		s.log.Warn("allow_nexlet_direct_feeds is set: nexlets on upstream's SDK (and nexd's older than the feed relay) may publish in every namespace's logs, metrics and events")
	}

	s.notify.Status("starting: nexlets")
	// Pushed first: a nexlet that failed to start must not leave its siblings behind.
	s.closers.push("nexlets", s.stopNexlets)
	if err := s.nexlets.Start(startCtx); err != nil {
		return err
	}

	s.ctl.set(backend{s})
	if cfg.Node.MetricsListen != "" {
		ml, err := s.metrics.Listen(cfg.Node.MetricsListen)
		if err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		s.closers.push("metrics listener", func(ctx context.Context) error {
			mctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			return ml.Close(mctx)
		})
		s.own.goFn(func() {
			if err := ml.Serve(); err != nil {
				s.log.Error("metrics listener", "err", err)
			}
		})
		s.log.Info("metrics listening", "addr", ml.Addr().String())
	}

	wait := cfg.Node.StartupTimeout
	if s.nexlets.Adopting() {
		// An adopted nexlet registers again within seconds once it reaches NATS;
		// one that cannot is replaced (below) rather than waited for.
		wait = min(wait, adoptedRegisterWait)
	}
	// The registration and the first heartbeat share one deadline (a hand-over starts a
	// new one), so the two waits together stay within startup_timeout; each renews
	// systemd's start timeout while it waits (startStep).
	deadline := time.Now().Add(wait)
	done := s.startStep("starting: nexlets")
	wctx, wcancel := context.WithDeadline(startCtx, deadline)
	missing := s.nexlets.NamesOf(s.node.WaitForAgents(wctx, s.nexlets.AgentIDs()))
	wcancel()
	if len(missing) > 0 {
		if replaced := s.nexlets.HandOverUnregistered(missing); len(replaced) > 0 {
			deadline = time.Now().Add(cfg.Node.StartupTimeout)
			wctx, wcancel := context.WithDeadline(startCtx, deadline)
			missing = s.nexlets.NamesOf(s.node.WaitForAgents(wctx, s.nexlets.AgentIDs()))
			wcancel()
		}
	}
	done()
	if err := startCtx.Err(); err != nil {
		return err
	}
	silent := s.waitServing(startCtx, missing, deadline)
	if err := startCtx.Err(); err != nil {
		return err
	}
	replay := s.waitReplay(startCtx, cfg.Node.StartupTimeout)
	if err := startCtx.Err(); err != nil {
		return err
	}

	s.setPhase(control.StateRunning)
	s.node.SetState(protocol.NodeRunning)
	status := s.statusLine()
	if len(missing) > 0 {
		status += "; not registered: " + strings.Join(missing, ", ")
		s.log.Warn("nexlets did not register in time; the node is ready without them",
			"missing", strings.Join(missing, ","), "waited", cfg.Node.StartupTimeout.String())
	}
	if len(silent) > 0 {
		status += "; not serving yet: " + strings.Join(silent, ", ")
		s.log.Warn("registered nexlets sent no heartbeat in time; the node is ready without their bids",
			"silent", strings.Join(silent, ","), "waited", cfg.Node.StartupTimeout.String())
	}
	if replay != "" {
		status += "; " + replay
	}
	s.log.Info("nex node ready", "status", status)
	if err := s.notify.Ready(status); err != nil {
		return err
	}
	s.goBase.apply(cfg.Node, s.log) // see newDaemon
	// The native nexlet's schema, left for after READY (node.startSchema); then start-up
	// is over and the binary's pages it alone used are unmapped (coldpages).
	s.own.goFn(func() {
		s.node.CompileSchemas()
		if !cfg.Node.KeepStartupPages {
			coldpages.DropLogged(s.log)
		}
	})
	close(s.watchdogTaken)
	s.own.goFn(func() { s.notify.RunWatchdog(s.ctx, s.healthy) })
	s.own.goFn(func() { s.statusLoop(s.ctx) })
	// Start-up's garbage and free heap go back once the node is quiet, as a burst's do.
	s.own.goFn(func() { memtrim.Run(s.ctx, memtrim.Options{}) })
	if s.kv != nil {
		s.own.goFn(func() { s.jetStreamLoop(s.ctx) })
	}
	s.own.goFn(func() { s.disk.loop(s.ctx) })
	return nil
}

// waitServing holds READY, for at most bound, until the local nexlets that registered
// (all but missing, by name) have sent their first heartbeat, and returns the names of
// those that have not. A nexlet's health, which a bid needs, is unknown until then; it
// comes once the nexlet serves on its own connection, a few milliseconds after its
// registration (more under load). Before, READY followed the registration, and a client
// that auctioned once at READY (upstream's does) got no bid (e2e TestBidRightAfterReady:
// 3 of 4 rounds at load 0.6, 12 of 12 at load 25-30).
//
// It waits until deadline, the registration wait's own: the two together stay within
// startup_timeout (since b505a29 each had a bound of its own, and with the hand-over
// start-up could wait three times startup_timeout before READY, unannounced to
// systemd). STATUS names the nexlets waited for, and systemd's start timeout is
// renewed meanwhile (startStep).
func (s *server) waitServing(ctx context.Context, missing []string, deadline time.Time) []string {
	var ids []string
	for _, id := range s.nexlets.AgentIDs() {
		if !slices.ContainsFunc(s.nexlets.NamesOf([]string{id}), func(n string) bool { return slices.Contains(missing, n) }) {
			ids = append(ids, id)
		}
	}
	if len(ids) == 0 {
		return nil
	}
	done := s.startStep("starting: waiting for the first heartbeat of nexlets " + strings.Join(s.nexlets.NamesOf(ids), ", "))
	defer done()
	wctx, cancel := context.WithDeadline(ctx, deadline)
	defer cancel()
	return s.nexlets.NamesOf(s.node.WaitServing(wctx, ids))
}

// startStep sends STATUS=status and renews systemd's start timeout (EXTEND_TIMEOUT_USEC,
// 3×startTick, every startTick) until the returned func is called: a start-up wait
// bounded by startup_timeout, which may be set past the unit's TimeoutStartSec. The
// caller bounds the wait; the func waits for the goroutine.
func (s *server) startStep(status string) (done func()) {
	s.notify.Status(status)
	s.notify.ExtendTimeout(3 * startTick)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(startTick)
		defer t.Stop()
		for {
			select {
			case <-stop:
				return
			case <-t.C:
				s.notify.ExtendTimeout(3 * startTick)
			}
		}
	})
	return func() { close(stop); wg.Wait() }
}

// adoptedRegisterWait bounds the wait for nexlets left running by the previous nexd to
// register again before they are replaced.
const adoptedRegisterWait = 15 * time.Second

// openControl binds the control socket (or takes systemd's) and serves first; the
// socket stays open through the drain, so status says "stopping" until the end.
func (s *server) openControl(first control.Backend) error {
	cfg := s.cfg()
	s.ctl = newSwitchBackend(first)
	// Validated at load: workloads' dynamic uids get a connection bound of their own.
	lo, hi, err := native.ParseUIDRange(cfg.Node.WorkloadUIDRange)
	if err != nil {
		return fmt.Errorf("workload_uid_range: %w", err)
	}
	if s.ctlListener == nil && cfg.Node.ControlSocket != "" {
		// A directory another user may rename in (hers, or one on the way) lets her move
		// nexd's socket away and listen at its path: admins' nexctl then sends her its
		// requests (secrets, reloads) and takes her answers (a NATS server of hers). Its
		// own directory only is made, as RuntimeDirectory= makes /run/nex
		// (TestControlSocketDirs).
		dir := filepath.Dir(cfg.Node.ControlSocket)
		made, err := ownDir("control_socket", dir, 0o755, controlDirGroups())
		if err != nil {
			return err
		}
		if made {
			s.log.Info("made the control socket's directory", "dir", dir, "mode", "0755")
		}
	}
	ctl, err := control.Listen(cfg.Node.ControlSocket, control.ServerOptions{
		Backend:      s.ctl,
		AllowOthers:  cfg.Node.ControlAllowOthers,
		Logger:       s.log,
		Listener:     s.ctlListener,
		WorkloadUIDs: [2]uint32{lo, hi},
	})
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	s.closers.push("control socket", func(context.Context) error { return ctl.Close() })
	s.own.goFn(func() {
		if err := ctl.Serve(s.ctx); err != nil {
			s.log.Error("control socket", "err", err)
		}
	})
	s.log.Info("control socket listening", "path", ctl.Path(), "socket_activated", s.ctlListener != nil)
	return nil
}

// waitReplay holds READY until the workloads handed to the nexlets for replay are
// running again (listed by their nexlets), saying in STATUS how far it got, for at most
// bound. It returns "" when all came back, else what is missing. One that ended
// meanwhile (left node state) is not waited for: before, it held READY until the bound
// (e2e TestNoWaitStopSurvivesKillRightAfterAnswer/nexd: 60 s in 3 of 8 rounds, a stop
// under way when the nexlet registered again).
func (s *server) waitReplay(ctx context.Context, bound time.Duration) string {
	ids := s.node.Replayed()
	if len(ids) == 0 {
		return ""
	}
	deadline := time.Now().Add(bound)
	t := time.NewTicker(250 * time.Millisecond)
	defer t.Stop()
	back := 0
	for {
		ids = s.node.Replayed()
		qctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		ws, err := s.node.Workloads(qctx)
		cancel()
		if err == nil {
			listed := make(map[string]bool, len(ws))
			for _, w := range ws {
				listed[w.ID] = true
			}
			back = 0
			for _, id := range ids {
				if listed[id] {
					back++
				}
			}
		}
		if back == len(ids) {
			s.log.Info("replay done", "workloads", back)
			return ""
		}
		s.notify.Status(fmt.Sprintf("starting: replaying workloads (%d/%d running)", back, len(ids)))
		s.notify.ExtendTimeout(3 * startTick)
		if time.Now().After(deadline) {
			s.log.Warn("replay incomplete at the start-up bound; ready anyway", "running", back, "replayed", len(ids))
			return fmt.Sprintf("replay incomplete: %d/%d running", back, len(ids))
		}
		select {
		case <-ctx.Done():
			return ""
		case <-t.C:
		}
	}
}

// healthy gates the watchdog: it is true when the daemon's serve loop (signals,
// reloads, shutdown) and the node's health loop both answer a probe within a bound.
// NATS is not part of it: an outage of any length is health shown in STATUS, status
// and metrics, never a reason for systemd to kill the node and its workloads.
func (s *server) healthy() bool {
	bound := probeBound
	if iv, ok := s.notify.WatchdogInterval(); ok {
		bound = min(bound, iv/4)
	}
	ctx, cancel := context.WithTimeout(s.ctx, bound)
	defer cancel()
	answer := make(chan struct{})
	select {
	case s.probes <- answer:
	case <-ctx.Done():
		s.log.Warn("liveness probe: the serve loop did not take it", "bound", bound.String())
		return false
	}
	select {
	case <-answer:
	case <-ctx.Done():
		return false
	}
	if err := s.node.Alive(ctx); err != nil {
		s.log.Warn("liveness probe failed", "err", err, "bound", bound.String())
		return false
	}
	return true
}

// probeBound is the longest a liveness probe may take.
const probeBound = 5 * time.Second

// statusLoop keeps STATUS= current while running.
func (s *server) statusLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if s.view().phase == control.StateStopping {
				return
			}
			line := s.statusLine()
			if line != last {
				s.notify.Status(line)
				last = line
			}
		}
	}
}

// statusRefresh bounds how long the status line's workload count is kept while the node
// saw nothing that would change it (node.WorkloadChanges).
const statusRefresh = time.Minute

// statusCount is the node's workload count by state, as the status line and the
// control socket's status show it, kept while it cannot have changed: counting means
// listing every workload of every nexlet (thousands of records to encode in the
// nexlets and decode in nexd). It is asked again only when the node saw something
// that may change it (node.WorkloadChanges), its NATS connection came or went, or it
// is older than the caller allows; callers that come while a listing is under way
// share its answer, so any number of concurrent status calls (any local user may
// make them, control_allow_others = status) costs at most one listing at a time
// (TestPublicStatusSharesListings).
type statusCount struct {
	mu        sync.Mutex
	ok        bool // last holds a listing's answer
	changes   uint64
	connected bool
	at        time.Time
	last      workloadCount
	lastErr   error
	flight    chan struct{} // while a listing is under way; closed when it ends
}

// workloadCount is one counting: by state, in all, and when the listing was taken if
// it is not fresh (NATS down: the last listing taken while connected).
type workloadCount struct {
	byState map[string]int
	total   int
	asOf    time.Time
}

// statusMaxAge bounds how old the workload count in a control status may be while
// the node saw nothing that would change it: a state a nexlet changes on its own
// (starting to running) shows within it.
const statusMaxAge = 2 * time.Second

// count returns the workload count, listing the nexlets only when the kept one is
// older than maxAge or may have changed; a caller that joins a listing under way takes
// its answer. The listing runs on the node's context, not ctx (others may wait for
// it); ctx bounds only this caller's wait.
func (c *statusCount) count(ctx context.Context, s *server, maxAge time.Duration) (workloadCount, error) {
	c.mu.Lock()
	changes, connected := s.node.WorkloadChanges(), s.conn.Connected()
	if c.ok && c.lastErr == nil && changes == c.changes && connected == c.connected && time.Since(c.at) < maxAge {
		defer c.mu.Unlock()
		return c.last.clone(), nil
	}
	if ch := c.flight; ch != nil {
		c.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return workloadCount{}, ctx.Err()
		}
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.last.clone(), c.lastErr
	}
	ch := make(chan struct{})
	c.flight = ch
	c.mu.Unlock()

	var wc workloadCount
	var err error
	if connected && s.node.HoldsNothing(changes) {
		wc.byState = map[string]int{}
	} else {
		var ws []protocol.WorkloadSummary
		ws, wc.asOf, err = s.node.KnownWorkloads(s.ctx)
		wc.byState = make(map[string]int, 4)
		for _, w := range ws {
			wc.byState[string(w.WorkloadState)]++
		}
		wc.total = len(ws)
	}
	c.mu.Lock()
	// changes and connected as read before the listing: a change during it makes the
	// next caller list again.
	c.ok, c.last, c.lastErr, c.changes, c.connected, c.at = true, wc, err, changes, connected, time.Now()
	c.flight = nil
	close(ch)
	c.mu.Unlock()
	return wc.clone(), err
}

func (w workloadCount) clone() workloadCount {
	w.byState = maps.Clone(w.byState)
	return w
}

// workloads is the status line's count and what it says when the count is the last
// known one.
func (c *statusCount) workloads(s *server) (int, string) {
	wc, err := c.count(s.ctx, s, statusRefresh)
	if err != nil {
		return 0, ""
	}
	if !wc.asOf.IsZero() {
		// The nexlets cannot be asked; their workloads run on, so 0 would mislead.
		return wc.total, " (last known " + wc.asOf.UTC().Format(time.TimeOnly) + " UTC, NATS down)"
	}
	return wc.total, ""
}

// statusLine says in one line what the node is doing.
func (s *server) statusLine() string {
	v := s.view()
	running, known := s.status.workloads(s)
	nexlets, failed := s.nexlets.Count()
	natsState := "nats connected"
	if !s.conn.Connected() {
		natsState = "nats disconnected"
	}
	line := fmt.Sprintf("%s: %d workloads%s, %d nexlets", v.phase, running, known, nexlets)
	if failed > 0 {
		line += fmt.Sprintf(" (%d failed)", failed)
	}
	line += ", " + natsState
	if l := s.leafStatus(); l != nil && l.Connected < l.Remotes {
		line += fmt.Sprintf(", leaf to hub down (%d of %d connected)", l.Connected, l.Remotes)
	}
	if js := s.jetstream.status(); js != nil && js.State != "ok" {
		line += ", jetstream " + js.State + ": " + js.Detail
	}
	if err := s.disk.bidRefusal(); err != nil {
		line += ", local state unwritable " + err.Error()
	}
	if v.phase == control.StateLameduck {
		line += ", workloads stop at " + v.lameduckUntil.UTC().Format(time.RFC3339)
	}
	return line
}

// onLameduck is called by the node once it enters lame duck mode (over NATS or the
// control socket): workloads keep running until the delay ends; then the node stops
// every one of them, waiting for each to be gone and removing it from state, and only
// then shuts down, so no timing leaves a drained workload in state.
func (s *server) onLameduck(delay time.Duration) {
	until := time.Now().Add(delay)
	s.update(func(v *snapshot) { v.phase, v.lameduckUntil = control.StateLameduck, until })
	s.log.Warn("entering lame duck mode", "workloads_stop_at", until.UTC().Format(time.RFC3339))
	s.notify.Status(s.statusLine())
	s.own.goFn(func() {
		t := time.NewTimer(delay)
		defer t.Stop()
		select {
		case <-t.C:
			s.log.Info("lame duck delay ended; draining workloads")
			s.notify.Status("lameduck: draining workloads")
			if res, err := s.node.DrainWorkloads(s.ctx); err != nil {
				s.log.Warn("lame duck drain", "workloads", res.Workloads, "removal_failures", len(res.RemovalFailures), "err", err)
			}
			s.requestShutdown(reasonLameduckDone)
		case <-s.ctx.Done():
		}
	})
}

// reasonLameduckDone is the stop reason of a lame duck whose drain has ended.
const reasonLameduckDone = "lame duck drain done"

// stopMode says what a stop does with the workloads.
type stopMode int

const (
	stopAll    stopMode = iota // stop every workload (no live_restore, lame duck)
	keepAll                    // live_restore: workloads stay for the next nexd
	reexecKeep                 // re-exec in place: workloads stay, systemd sees a reload
)

// stop drains the workloads, then unwinds every closer start pushed: metrics, nexlets,
// node API, revocations, NATS, control socket, owned goroutines, logger. With keepAll
// (live_restore) or reexecKeep the workloads stay: the nexlets let go of them and exit,
// and the next nexd with the same state (or this one after execve) adopts them.
func (s *server) stop(mode stopMode) {
	s.setPhase(control.StateStopping)
	grace := s.cfg().Node.StopGrace
	if mode == reexecKeep {
		// Same pid after the exec: systemd sees a reload, ended by the new image's READY=1.
		if err := s.notify.Reloading(); err != nil {
			s.log.Warn("sd_notify RELOADING", "err", err)
		}
		s.notify.Status("re-executing: workloads keep running")
	} else {
		s.notify.Stopping("stopping: draining workloads and nexlets")
	}
	// Keep systemd from killing us while the drain is making progress, up to the
	// stop's bound.
	extend := grace + 15*time.Second
	s.notify.ExtendTimeout(extend)
	done := make(chan struct{})
	var wg sync.WaitGroup
	bound := stopBound(grace)
	if testhold.Holds(os.Getenv(testhold.Env), testhold.StopBoundShort) {
		bound = testhold.StopBoundShortBy // e2e TestStopPastItsBoundExits
	}
	wg.Go(func() { extendStop(s.notify, &s.closers, done, extend, bound) })
	wg.Go(func() {
		if on, over := stopOverdue(&s.closers, done, bound); over {
			s.exitOverdue(on, bound)
		}
	})
	defer func() { close(done); wg.Wait() }()

	// The drain runs to its own bounds even when the daemon's context has ended.
	ctx := context.WithoutCancel(s.ctx)
	s.node.SetState(protocol.NodeStopping)
	if mode != stopAll {
		s.log.Info("leaving workloads running for the next nexd", "reexec", mode == reexecKeep)
		if mode == keepAll {
			s.notify.Status("stopping: live_restore, workloads keep running")
		}
		s.nexlets.Detach()
	} else {
		dctx, cancel := context.WithTimeout(ctx, grace+10*time.Second)
		s.node.StopAllWorkloads(dctx)
		cancel()
	}
	s.closers.unwind(ctx, s.log)
	if mode == keepAll {
		s.releaseCgroup()
	}
}

// stopBound is the longest a stop is given: the sum of its steps' own bounds (the
// workload drain and the nexlets' stop, stop_grace+10s each; request handlers 10 s, the
// NATS drain 10 s, the control socket 5 s, owned goroutines 15 s, metrics 2 s) and
// slack. 100 s with the default stop_grace, below the unit's TimeoutStopSec=150s.
func stopBound(grace time.Duration) time.Duration { return 2*grace + 80*time.Second }

// extendStop renews systemd's stop timeout (EXTEND_TIMEOUT_USEC, every extend/2) until
// done is closed, but not past bound, where stopOverdue ends the stop. Before, the stop
// was extended for as long as it ran, so a stuck step held nexd (and systemctl stop)
// without end.
func extendStop(n *sysd.Notifier, c *closers, done <-chan struct{}, extend, bound time.Duration) {
	deadline := time.Now().Add(bound)
	tick := time.NewTicker(extend / 2)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return
		case <-tick.C:
			left := time.Until(deadline)
			if left <= 0 {
				return
			}
			n.ExtendTimeout(min(extend, left))
		}
	}
}

// stopOverdue waits until done is closed or bound has passed; then (over) it names the
// step still running.
func stopOverdue(c *closers, done <-chan struct{}, bound time.Duration) (on string, over bool) {
	t := time.NewTimer(bound)
	defer t.Stop()
	select {
	case <-done:
		return "", false
	case <-t.C:
	}
	if on = c.current(); on == "" {
		on = "the workload drain" // the step before the closers
	}
	return on, true
}

// exitOverdue ends a stop still running at its bound, foreground or under systemd
// alike: it logs the step it is stuck on and every goroutine's stack, and exits 1
// without the rest of the stop. What the stop had not stopped runs on: the nexlets and
// their workloads, which the next nexd adopts (as after a kill -9 of nexd). Before, a
// foreground nexd had no bound (a stuck step held it for ever), and under systemd only
// TimeoutStopSec's SIGKILL, 50 s later and saying nothing, ended it.
func (s *server) exitOverdue(on string, bound time.Duration) {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) || len(buf) >= 64<<20 {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	s.log.Error("stopping: past the stop's bound; exiting with the stop unfinished: the nexlets and workloads it had not stopped run on for the next nexd to adopt",
		"bound", bound, "on", on, "goroutines", string(buf))
	_ = s.logger.Close()
	s.exit(ExitFailure)
}

// releaseCgroup disables the cgroup v2 controllers of nexd's subtree once nexd leaves
// its workloads running (live_restore): systemd starts the next nexd in the unit's root
// cgroup, which the kernel refuses while controllers are enabled there (219/CGROUP;
// systemd 252 has no DelegateSubgroup=). The workloads run without their limits until
// the next nexd adopts them and re-applies them. A nexd that dies without this (kill -9,
// a watchdog abort) leaves the controllers on, and systemd 252 cannot start the next one
// until the workloads are gone (a known limitation).
func (s *server) releaseCgroup() {
	cg := s.nexlets.Cgroups()
	if cg == nil || cg.Mode() != cgroup.ModeV2 {
		return
	}
	n, err := cgroup.ReleaseForRestart(cg.Path())
	if err != nil {
		fmt.Fprintf(s.stderr, "nexd: releasing the cgroup controllers of %s for the next nexd: %v\n", cg.Path(), err)
	} else if n > 0 {
		fmt.Fprintf(s.stderr, "nexd: released the cgroup controllers of %s (%d groups) for the next nexd\n", cg.Path(), n)
	}
}
