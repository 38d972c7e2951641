package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/logging"
	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/daemon/sysd"
)

// daemon is one nexd process before and while its node runs: the parts that exist
// before the configuration is acted on (logger, systemd notifier), the snapshot status
// reads, and the owners of every goroutine and closer. build turns it into a server.
type daemon struct {
	args    []string  // the command line, re-read on reload
	goBase  goRuntime // the Go runtime's settings before go_gc_percent / go_memory_limit
	stderr  io.Writer
	started time.Time
	// exit ends the process (os.Exit; tests: a stop past its bound, exitOverdue).
	exit func(code int)

	logger *logging.Logger
	log    *slog.Logger
	notify *sysd.Notifier

	snap     atomic.Pointer[snapshot]
	degraded atomic.Bool        // READY=1 was sent early, in a degraded state (start-up bound reached)
	shutdown chan string        // reason; buffered, first one wins
	probes   chan chan struct{} // liveness probes, answered by the serve loop
	own      goroutines
	closers  closers
	hooks    buildHooks // zero in production
	// sigs: the signals run acts on when Main caught them before the pre-start
	// (catchSignals); else run catches them.
	sigs *signals
	// prestarted is the native nexlet's process started at main (prestartNexlet), for
	// its first start; nil when none was.
	prestarted *supervise.Prestarted
	// ctlListener is the control socket from systemd (nexd.socket); nil when nexd
	// creates the socket itself.
	ctlListener *net.UnixListener
	// The state and runtime dirs' locks (holdDir) and the cgroup root's (nexlets)
	// across a re-exec: kept as they are let go at the stop once keepDirLocks is set
	// (keepAcrossExec), listed in keptDirLocks for the new image's environment
	// (envDirLocks), which takes them back from inheritedDirLocks (inheritedLock).
	keepDirLocks      atomic.Bool
	lockMu            sync.Mutex // keptDirLocks, inheritedDirLocks
	keptDirLocks      []string
	inheritedDirLocks map[string]int
}

// snapshot is what the node is, as status and STATUS= report it. It is replaced whole
// and never changed in place, so readers (the control socket, during start-up too)
// need no lock and never see a half-made change.
type snapshot struct {
	phase         control.NodeState
	loaded        *config.Loaded           // current config; replaced by a successful reload
	lameduckUntil time.Time                // set in StateLameduck
	waiting       string                   // during start-up: what nexd waits for, as in STATUS
	natsInfo      func() natsconn.ConnInfo // once connected: the NATS connection's state
}

func newDaemon(loaded *config.Loaded, args []string, stderr io.Writer) (*daemon, error) {
	d := &daemon{
		args:     args,
		stderr:   stderr,
		started:  time.Now(),
		exit:     os.Exit,
		shutdown: make(chan string, 1),
		probes:   make(chan chan struct{}),
	}
	d.snap.Store(&snapshot{phase: control.StateStarting, loaded: loaded})
	lg, err := logging.New(d.logOptions(loaded.Config, ""))
	if err != nil {
		return nil, fmt.Errorf("logger: %w", err)
	}
	d.logger = lg
	d.log = lg.Slog()
	d.closers.push("logger", func(context.Context) error {
		d.log.Info("nexd stopped")
		return d.logger.Close()
	})
	d.goBase = currentGoRuntime()
	if os.Getenv("GOGC") == "" {
		d.goBase.gcPercent = config.DefaultGoGCPercent
	}
	// go_gc_percent and go_memory_limit apply once nexd is ready (serve): start-up runs
	// with Go's default collector, for at GOGC 50 it collected during package init and
	// building the node, and each cycle's mark workers took the CPU the start waited for.
	d.notify = sysd.NewNotifier(d.log)
	// Claim systemd's socket before any child could inherit it (it is close-on-exec
	// from here on).
	if d.ctlListener, err = sysd.ControlListener(); err != nil {
		return nil, err
	}
	return d, nil
}

// view is the current snapshot.
func (d *daemon) view() *snapshot { return d.snap.Load() }

// update replaces the snapshot with a changed copy.
func (d *daemon) update(change func(*snapshot)) {
	for {
		old := d.snap.Load()
		next := *old
		change(&next)
		if d.snap.CompareAndSwap(old, &next) {
			return
		}
	}
}

func (d *daemon) cfg() *config.Config { return d.view().loaded.Config }

func (d *daemon) setPhase(p control.NodeState) { d.update(func(s *snapshot) { s.phase = p }) }

func (d *daemon) logOptions(cfg *config.Config, nodeID string) logging.Options {
	return logging.Options{
		Level:     cfg.Logger.Level,
		Targets:   cfg.LogTargets(),
		Format:    cfg.Logger.Format,
		WithPID:   cfg.Logger.WithPID,
		File:      cfg.Logger.File,
		NodeID:    nodeID,
		Namespace: cfg.Namespace,
		Stderr:    d.stderr,
		// Workload output always reaches the journal (with NEX_WORKLOAD_ID) and the
		// log feeds; the console shows it only with show_workload_logs.
		HideWorkloadOutput: !cfg.Node.ShowWorkloadLogs,
	}
}

// signals are the channels run acts on: SIGTERM and SIGINT stop, SIGHUP reloads,
// SIGUSR2 re-executes nexd in place (caught from the start so that an early one does
// not kill the node; acted on once start-up is done).
type signals struct {
	term, hup, usr2 chan os.Signal
}

// catchSignals starts catching them. Main does so first of a node's start, so that an
// early SIGTERM stops it cleanly (docs/performance-notes.md, Ready, on its timing beside the pre-started
// nexlet's cgroup warm-up).
func catchSignals() *signals {
	sg := &signals{term: make(chan os.Signal, 2), hup: make(chan os.Signal, 2), usr2: make(chan os.Signal, 1)}
	signal.Notify(sg.term, syscall.SIGTERM, syscall.SIGINT)
	signal.Notify(sg.hup, syscall.SIGHUP)
	signal.Notify(sg.usr2, syscall.SIGUSR2)
	return sg
}

// stop stops catching them (nothing when sg is nil).
func (sg *signals) stop() {
	if sg == nil {
		return
	}
	signal.Stop(sg.usr2)
	signal.Stop(sg.hup)
	signal.Stop(sg.term)
}

// run builds the node, serves until a stop is asked for (signal, lame duck, ctx), then
// drains and unwinds everything start brought up. Every goroutine it started has ended
// when it returns.
func (d *daemon) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	sg := d.sigs
	if sg == nil {
		sg = catchSignals()
	}
	defer sg.stop()
	term, hup, usr2 := sg.term, sg.hup, sg.usr2

	s, stopped, err := d.start(ctx, term)
	if err != nil || stopped {
		if err != nil {
			d.notify.Stopping("failed: " + err.Error())
		} else {
			d.notify.Stopping("stopped during start-up")
		}
		d.closers.unwind(context.WithoutCancel(ctx), d.log)
		return err
	}

	reason := s.serveUntilStop(ctx, term, hup, usr2)
	d.log.Info("stopping", "reason", reason)
	if reason == reasonLameduckDone && d.ctlListener != nil {
		d.stopSocketUnits(ctx)
	}
	// Later SIGTERMs must not cut the drain short.
	drained := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			select {
			case sig := <-term:
				d.log.Warn("already stopping; signal ignored until the drain ends", "signal", sig.String())
			case <-drained:
				return
			}
		}
	})
	// live_restore keeps workloads across a stop by signal (systemctl stop/restart, an
	// upgrade); a lame duck drain or an ended context stops them. A re-exec always
	// keeps them.
	mode := stopAll
	switch {
	case reason == reasonReexec:
		mode = reexecKeep
	case strings.HasPrefix(reason, "signal ") && s.cfg().Node.LiveRestore:
		mode = keepAll
	}
	// A re-exec keeps the dir locks: another nexd could take a dir between the stop's
	// release and the new image's start.
	d.keepDirLocks.Store(mode == reexecKeep)
	var keep *os.File
	if mode == reexecKeep && d.ctlListener != nil {
		// systemd's control socket goes across the exec (socket activation again).
		var ferr error
		if keep, ferr = d.ctlListener.File(); ferr != nil {
			d.log.Warn("re-exec: the control socket cannot be kept; the new nexd creates its own", "err", ferr)
		}
	}
	s.stop(mode)
	close(drained)
	wg.Wait()
	if mode == reexecKeep {
		h := handover{Nexlets: s.nexlets.LeftRunning()}
		if m, ok := s.minter.(mint.Remembering); ok {
			h.Users = m.Users()
		}
		hfd, err := writeHandover(h)
		if err != nil {
			// The new image finds the same in the state directory.
			fmt.Fprintf(d.stderr, "nexd: re-exec: no state handover: %v\n", err)
			hfd = -1
		}
		d.lockMu.Lock()
		kept := strings.Join(d.keptDirLocks, ",")
		d.lockMu.Unlock()
		// The watchdog stays armed across the exec: the new image's start-up begins
		// with a full interval (it pings from its start, feedWatchdogUntilServed).
		s.notify.Watchdog()
		return reexec(keep, hfd, kept)
	}
	return nil
}

// stopSocketUnits stops the socket units that start nexd (nexd.socket) once a lame duck
// has drained the node, which must then stay down: the control socket, left listening,
// started nexd again for any local user's `nexctl status` (0666 with
// control_allow_others: status), and for `nexctl lameduck --wait`'s next poll. nexd
// keeps its own descriptor of the socket, so calls already made are still answered.
func (d *daemon) stopSocketUnits(ctx context.Context) {
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	units, err := sysd.StopOwnSocketUnits(sctx)
	switch {
	case err != nil:
		d.log.Warn("lame duck: the control socket's unit could not be stopped; a connection to the socket starts nexd again (systemctl stop nexd.socket)", "err", err)
	case len(units) > 0:
		d.log.Info("lame duck: socket units stopped, so that no connection starts the drained node again; systemctl start nexd starts them too", "units", strings.Join(units, ","))
	}
}

// start builds the node and serves it. SIGTERM, SIGINT or the end of ctx meanwhile
// abandons the start (stopped is then true and err nil): whatever came up is unwound
// by the caller.
func (d *daemon) start(ctx context.Context, term <-chan os.Signal) (s *server, stopped bool, err error) {
	startCtx, cancelStart := context.WithCancel(ctx)
	defer cancelStart()
	var sig atomic.Value
	watching := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case sg := <-term:
			sig.Store(sg.String())
			d.log.Warn("stopping during start-up", "signal", sg.String())
			cancelStart()
		case <-watching:
		}
	})
	s, err = d.build(ctx, startCtx, d.hooks)
	if err == nil {
		err = s.serve(startCtx)
	}
	close(watching)
	wg.Wait()
	if sig.Load() != nil || ctx.Err() != nil {
		return nil, true, nil
	}
	return s, false, err
}

// serveUntilStop handles SIGHUP (reload) until something asks the node to stop, and
// says what did.
func (s *server) serveUntilStop(ctx context.Context, term, hup, usr2 <-chan os.Signal) string {
	for {
		select {
		case <-usr2:
			return reasonReexec
		case <-hup:
			res := s.reload()
			if !res.OK {
				s.log.Error("reload rejected; the running configuration is unchanged", "errors", strings.Join(res.Errors, "; "))
			}
		case sig := <-term:
			return "signal " + sig.String()
		case <-ctx.Done():
			return "context ended: " + context.Cause(ctx).Error()
		case reason := <-s.shutdown:
			return reason
		case answer := <-s.probes:
			close(answer)
		}
	}
}

func (d *daemon) requestShutdown(reason string) {
	select {
	case d.shutdown <- reason:
	default:
	}
}
