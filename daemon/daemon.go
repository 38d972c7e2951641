package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/identity"
	"github.com/nexd-project/nexd/daemon/logging"
	"github.com/nexd-project/nexd/daemon/metrics"
	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/daemon/natsembed"
	"github.com/nexd-project/nexd/daemon/nexlets"
	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/daemon/sysd"
	"github.com/nexd-project/nexd/internal/version"
	"github.com/nexd-project/nexd/protocol"
)

// daemon is one running nexd.
type daemon struct {
	args    []string // the command line, re-read on reload
	env     []string
	stderr  io.Writer
	started time.Time

	mu       sync.Mutex
	reloadMu sync.Mutex     // one reload at a time (SIGHUP and the socket)
	loaded   *config.Loaded // current config; replaced by a successful reload
	phase    string         // starting, running, lameduck, stopping

	logger   *logging.Logger
	log      *slog.Logger
	notify   *sysd.Notifier
	id       *identity.Identity
	stateDir string
	socket   string

	conn    *natsconn.Conn
	minter  mint.Minter
	store   node.Store
	node    *node.Node
	nexlets *nexlets.Manager
	ctl     *control.Server
	// ctlListener is the control socket from systemd (nexd.socket); nil when nexd
	// creates the socket itself.
	ctlListener *net.UnixListener
	secrets     *secretStore
	metrics     *metrics.Metrics
	metricsL    *metrics.Listener

	shutdown     chan string // reason; buffered, first one wins
	lameduckTill time.Time
}

func newDaemon(loaded *config.Loaded, args, env []string, stderr io.Writer) (*daemon, error) {
	cfg := loaded.Config
	d := &daemon{
		args:     args,
		env:      env,
		stderr:   stderr,
		started:  time.Now(),
		loaded:   loaded,
		phase:    "starting",
		shutdown: make(chan string, 1),
	}
	d.stateDir = cfg.Node.StateDir
	if d.stateDir == "" {
		d.stateDir = firstDir(lookup(env, "STATE_DIRECTORY"))
	}
	d.socket = cfg.Node.ControlSocket
	if d.socket == "" {
		d.socket = control.DefaultSocketPath(func(k string) string { return lookup(env, k) })
	}
	lg, err := logging.New(d.logOptions(cfg, ""))
	if err != nil {
		return nil, fmt.Errorf("logger: %w", err)
	}
	d.logger = lg
	d.log = lg.Slog()
	d.notify = sysd.NewNotifier(d.log)
	// Claim systemd's socket before any child could inherit it (it is close-on-exec
	// from here on).
	if d.ctlListener, err = sysd.ControlListener(); err != nil {
		return nil, err
	}
	d.metrics = metrics.New()
	return d, nil
}

func (d *daemon) cfg() *config.Config {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.loaded.Config
}

func (d *daemon) setPhase(p string) {
	d.mu.Lock()
	d.phase = p
	d.mu.Unlock()
}

func (d *daemon) getPhase() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.phase
}

func (d *daemon) logOptions(cfg *config.Config, nodeID string) logging.Options {
	return logging.Options{
		Level:     cfg.Logger.Level,
		Targets:   cfg.LogTargets(),
		Format:    cfg.Logger.Format,
		WithPID:   cfg.Logger.WithPID,
		File:      d.logFile(cfg),
		NodeID:    nodeID,
		Namespace: cfg.Namespace,
		Stderr:    d.stderr,
		// Workload output always reaches the journal (with NEX_WORKLOAD_ID) and the
		// log feeds; the console shows it only with show_workload_logs.
		HideWorkloadOutput: !cfg.Node.ShowWorkloadLogs,
	}
}

func (d *daemon) logFile(cfg *config.Config) string {
	if cfg.Logger.File != "" {
		return cfg.Logger.File
	}
	if d.stateDir != "" {
		return filepath.Join(d.stateDir, "nexd.log")
	}
	return "nexd.log"
}

// run starts everything, serves until a stop is asked for, then drains.
func (d *daemon) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGHUP, syscall.SIGTERM, syscall.SIGINT)
	defer signal.Stop(sigs)

	err := d.start(ctx)
	if err != nil {
		d.notify.Stopping("failed: " + err.Error())
		d.teardown(context.Background())
		return err
	}

	go d.notify.RunWatchdog(ctx, d.healthy)
	go d.statusLoop(ctx)

	for {
		select {
		case sig := <-sigs:
			switch sig {
			case syscall.SIGHUP:
				res := d.reload(ctx)
				if !res.OK {
					d.log.Error("reload rejected; the running configuration is unchanged", "errors", strings.Join(res.Errors, "; "))
				}
			default:
				d.requestShutdown("signal " + sig.String())
			}
		case reason := <-d.shutdown:
			d.log.Info("stopping", "reason", reason)
			// Later SIGTERMs must not cut the drain short.
			go func() {
				for sig := range sigs {
					d.log.Warn("already stopping; signal ignored until the drain ends", "signal", sig.String())
				}
			}()
			d.stop()
			return nil
		}
	}
}

func (d *daemon) requestShutdown(reason string) {
	select {
	case d.shutdown <- reason:
	default:
	}
}

// start brings the node up in order and sends READY=1 at the end.
func (d *daemon) start(ctx context.Context) error {
	cfg := d.cfg()
	d.notify.Status("starting: loading identity")
	id, err := identity.Load(cfg.Node.Seed, cfg.Node.XKeySeed, d.stateDir)
	if err != nil {
		return err
	}
	d.id = id
	if err := d.logger.Reconfigure(d.logOptions(cfg, id.ID())); err != nil {
		return fmt.Errorf("logger: %w", err)
	}
	d.log.Info("nexd starting", "version", version.Version, "commit", version.Commit,
		"node_id", id.ID(), "node_name", cfg.Node.Name, "nexus", cfg.Node.Nexus,
		"identity", string(id.NodeSource), "state_dir", d.stateDir)

	d.notify.Status("starting: connecting to NATS")
	client, embed := d.natsOptions(cfg)
	conn, err := natsembed.Connect(ctx, client, embed, d.log)
	if err != nil {
		return fmt.Errorf("nats: %w", err)
	}
	d.conn = conn
	if hasTarget(cfg.LogTargets(), "nats") {
		d.logger.AttachNATS(conn.NC, id.ID())
	}

	if d.minter, err = d.newMinter(cfg); err != nil {
		return err
	}
	d.log.Info("credential minter", "minter", d.minter.Describe())
	if w := d.minter.Warning(); w != "" && cfg.Node.IssuerSigningKey != "" {
		// The other minters' weaknesses are among the config warnings below.
		d.log.Warn(w)
	}
	for _, w := range d.loaded.Warnings {
		d.log.Warn(w)
	}

	if cfg.Node.State == "kv" {
		kv, err := state.OpenKV(ctx, conn.NC, id.ID(), conn.JSDomain(), d.log)
		if err != nil {
			return err
		}
		d.store = d.metrics.CountStore(kv)
	} else {
		d.store = d.metrics.CountStore(node.NewMemStore())
	}

	d.node, err = node.New(node.Options{
		NC:                      conn.NC,
		NodeKey:                 id.Node,
		XKey:                    id.XKey,
		Name:                    cfg.Node.Name,
		Nexus:                   cfg.Node.Nexus,
		Version:                 version.Version,
		Commit:                  version.Commit,
		BuildDate:               version.BuildDate,
		Tags:                    cfg.Node.Tags,
		AuctionTTL:              cfg.Node.AuctionTTL,
		DeployTimeout:           cfg.Node.DeployTimeout,
		AllowRemoteRegistration: cfg.Node.AllowRemoteAgentRegistration,
		Minter:                  d.minter,
		Store:                   d.store,
		Emitter:                 d.emitter(cfg),
		Logger:                  d.log,
		OnLameduck:              d.onLameduck,
		Observer:                observer{Observer: metrics.Observer{M: d.metrics}, d: d},
	})
	if err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if err := d.node.Start(ctx); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	if cfg.Node.AllowRemoteAgentRegistration {
		d.log.Warn("remote nexlet registration is enabled", "nexus", cfg.Node.Nexus)
	}

	d.secrets = newSecretStore(d.stateDir)
	d.notify.Status("starting: opening control socket")
	d.metrics.WatchLive(metrics.Live{
		NATSReconnects: func() uint64 { return d.conn.Info().Reconnects },
		Workloads:      d.node.Workloads,
	})
	d.ctl, err = control.Listen(d.socket, control.ServerOptions{
		Backend:     backend{d},
		AllowOthers: cfg.Node.ControlAllowOthers,
		Logger:      d.log,
		Listener:    d.ctlListener,
	})
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	go d.ctl.Serve(ctx)
	d.log.Info("control socket listening", "path", d.ctl.Path(), "socket_activated", d.ctlListener != nil)
	if cfg.Node.MetricsListen != "" {
		if d.metricsL, err = d.metrics.Listen(cfg.Node.MetricsListen); err != nil {
			return fmt.Errorf("metrics: %w", err)
		}
		go func() {
			if err := d.metricsL.Serve(); err != nil {
				d.log.Error("metrics listener", "err", err)
			}
		}()
		d.log.Info("metrics listening", "addr", d.metricsL.Addr().String())
	}

	d.notify.Status("starting: nexlets")
	if d.nexlets, err = nexlets.New(ctx, nexlets.Options{
		Config:     cfg,
		NodeID:     id.ID(),
		Registry:   d.node,
		Minter:     d.minter,
		NC:         conn.NC,
		RuntimeDir: d.runtimeDir(),
		Logger:     d.log,
		OnExit:     d.metrics.NexletExit,
		OnFailed:   func(string) { d.notify.Status(d.statusLine()) },
	}); err != nil {
		return err
	}
	if err := d.nexlets.Start(ctx); err != nil {
		return err
	}
	wctx, wcancel := context.WithTimeout(ctx, cfg.Node.StartupTimeout)
	missing := d.nexlets.NamesOf(d.node.WaitForAgents(wctx, d.nexlets.AgentIDs()))
	wcancel()

	d.setPhase("running")
	d.node.SetState(protocol.NodeRunning)
	status := d.statusLine()
	if len(missing) > 0 {
		status += "; not registered: " + strings.Join(missing, ", ")
		d.log.Warn("nexlets did not register in time; the node is ready without them",
			"missing", strings.Join(missing, ","), "waited", cfg.Node.StartupTimeout.String())
	}
	d.log.Info("nex node ready", "status", status)
	return d.notify.Ready(status)
}

func (d *daemon) natsOptions(cfg *config.Config) (natsconn.Options, natsembed.Options) {
	port := 0
	if v := lookup(d.env, "NEXD_EMBEDDED_NATS_PORT"); v != "" {
		fmt.Sscanf(v, "%d", &port)
	}
	return natsconn.Options{
			Context:   cfg.NATS.Context,
			Servers:   cfg.NATS.Servers,
			CredsFile: cfg.NATS.CredsFile,
			Nkey:      cfg.NATS.Nkey,
			Seed:      cfg.NATS.Seed,
			JWT:       cfg.NATS.JWT,
			User:      cfg.NATS.User,
			Password:  cfg.NATS.Password,
			TLSCert:   cfg.NATS.TLSCert,
			TLSKey:    cfg.NATS.TLSKey,
			TLSCA:     cfg.NATS.TLSCA,
			TLSFirst:  cfg.NATS.TLSFirst,
			ConnName:  cfg.NATS.ConnName,
			Timeout:   cfg.NATS.Timeout,
			JSDomain:  cfg.NATS.JSDomain,
		}, natsembed.Options{
			InatsConfig: cfg.Node.InatsConfig,
			StateDir:    d.stateDir,
			Port:        port,
		}
}

func (d *daemon) newMinter(cfg *config.Config) (mint.Minter, error) {
	opts := mint.Options{Servers: d.conn.ClientURLs(), Nexus: cfg.Node.Nexus, JSDomain: cfg.NATS.JSDomain,
		// A nexlet cannot fetch new credentials while it runs, so its user must outlive
		// it (as upstream's 365 days); workload users live workload_creds_ttl and their
		// nexlet renews them before they expire.
		AgentTTL: nexletCredsTTL, WorkloadTTL: cfg.Node.WorkloadCredsTTL}
	n := cfg.Node
	switch {
	case n.IssuerSigningKey != "":
		m, err := mint.NewSigningKeyMinter(n.IssuerSigningKey, n.IssuerSigningKeyRootAccount, opts)
		if err != nil {
			return nil, fmt.Errorf("issuer_signing_key: %w", err)
		}
		return m, nil
	case n.IssuerNkey != "":
		m, err := mint.NewNkeyMinter(n.IssuerNkey, n.IssuerNkeySeed, opts)
		if err != nil {
			return nil, fmt.Errorf("issuer_nkey: %w", err)
		}
		return m, nil
	default:
		return mint.NewNoAuthMinter(opts), nil
	}
}

func (d *daemon) emitter(cfg *config.Config) node.Emitter {
	switch cfg.Node.Events {
	case "nats":
		return node.NATSEmitter{NC: d.conn.NC, Logger: d.log}
	case "logs":
		return node.LogEmitter{Logger: d.log}
	}
	return node.NoEmitter{}
}

// healthy gates the watchdog: the event loop answers and NATS is connected or
// reconnecting within bound.
func (d *daemon) healthy() bool {
	return d.conn != nil && d.conn.Healthy()
}

// statusLoop keeps STATUS= current while running.
func (d *daemon) statusLoop(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	last := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if p := d.getPhase(); p == "stopping" {
				return
			}
			s := d.statusLine()
			if s != last {
				d.notify.Status(s)
				last = s
			}
		}
	}
}

// statusLine says in one line what the node is doing.
func (d *daemon) statusLine() string {
	phase := d.getPhase()
	running := 0
	if d.node != nil {
		if ws, err := d.node.Workloads(context.Background()); err == nil {
			running = len(ws)
		}
	}
	nexlets, failed := 0, 0
	if d.nexlets != nil {
		for _, s := range d.nexlets.Statuses() {
			nexlets++
			if s.State == supervise.StateFailed {
				failed++
			}
		}
	}
	natsState := "nats connected"
	if d.conn != nil && !d.conn.Info().Connected {
		natsState = "nats disconnected"
	}
	s := fmt.Sprintf("%s: %d workloads, %d nexlets", phase, running, nexlets)
	if failed > 0 {
		s += fmt.Sprintf(" (%d failed)", failed)
	}
	s += ", " + natsState
	if phase == "lameduck" {
		d.mu.Lock()
		s += ", workloads stop at " + d.lameduckTill.UTC().Format(time.RFC3339)
		d.mu.Unlock()
	}
	return s
}

// onLameduck is called by the node once it enters lame duck mode (over NATS or the
// control socket): the nexlets keep workloads running until the delay ends and then
// stop them; the node shuts down after that.
func (d *daemon) onLameduck(delay time.Duration) {
	until := time.Now().Add(delay)
	d.mu.Lock()
	d.phase = "lameduck"
	d.lameduckTill = until
	d.mu.Unlock()
	d.log.Warn("entering lame duck mode", "workloads_stop_at", until.UTC().Format(time.RFC3339))
	d.notify.Status(d.statusLine())
	time.AfterFunc(delay, func() { d.requestShutdown("lame duck delay ended") })
}

// stop drains: workloads, nexlets, the API, the socket, then NATS.
func (d *daemon) stop() {
	d.setPhase("stopping")
	cfg := d.cfg()
	grace := cfg.Node.StopGrace
	d.notify.Stopping("stopping: draining workloads and nexlets")
	// Keep systemd from killing us while the drain is making progress.
	extend := grace + 15*time.Second
	d.notify.ExtendTimeout(extend)
	tick := time.NewTicker(extend / 2)
	done := make(chan struct{})
	go func() {
		for {
			select {
			case <-done:
				return
			case <-tick.C:
				d.notify.ExtendTimeout(extend)
			}
		}
	}()
	defer func() { tick.Stop(); close(done) }()

	if d.node != nil {
		d.node.SetState(protocol.NodeStopping)
		ctx, cancel := context.WithTimeout(context.Background(), grace+10*time.Second)
		d.node.StopAllWorkloads(ctx)
		cancel()
	}
	d.teardown(context.Background())
	d.log.Info("nexd stopped")
}

// teardown releases whatever start managed to bring up, in reverse order.
func (d *daemon) teardown(ctx context.Context) {
	if d.nexlets != nil {
		sctx, cancel := context.WithTimeout(ctx, d.cfg().Node.StopGrace+10*time.Second)
		if err := d.nexlets.Stop(sctx); err != nil {
			d.log.Error("stopping nexlets", "err", err)
		}
		cancel()
	}
	if d.node != nil {
		if err := d.node.Stop(ctx); err != nil {
			d.log.Warn("stopping node API", "err", err)
		}
	}
	if d.ctl != nil {
		d.ctl.Close()
	}
	if d.metricsL != nil {
		mctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		d.metricsL.Close(mctx)
		cancel()
	}
	// Publish the last log lines while the connection still exists.
	d.logger.AttachNATS(nil, "")
	if d.conn != nil {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		d.conn.Close(cctx)
		cancel()
	}
	d.logger.Close()
}

func hasTarget(ts []string, t string) bool {
	for _, x := range ts {
		if x == t {
			return true
		}
	}
	return false
}

// lookup returns the last value of key in env.
func lookup(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val
		}
	}
	return v
}

// firstDir takes the first of systemd's colon-separated directory list.
func firstDir(s string) string {
	if i := strings.IndexByte(s, ':'); i >= 0 {
		return s[:i]
	}
	return s
}

// runtimeDir holds fetched nexlet binaries: systemd's RuntimeDirectory when set, else
// under the state directory, else a temp dir.
func (d *daemon) runtimeDir() string {
	if rd := firstDir(lookup(d.env, "RUNTIME_DIRECTORY")); rd != "" {
		return rd
	}
	if d.stateDir != "" {
		return filepath.Join(d.stateDir, "run")
	}
	return filepath.Join(os.TempDir(), "nexd-"+d.id.ID()[:12])
}

// nexletCredsTTL is how long a nexlet's minted NATS user is valid.
const nexletCredsTTL = 365 * 24 * time.Hour
