package daemon

import (
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/identity"
	"github.com/nexd-project/nexd/daemon/metrics"
	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/daemon/natsembed"
	"github.com/nexd-project/nexd/daemon/nexlets"
	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/dirlock"
	"github.com/nexd-project/nexd/internal/logstream"
	"github.com/nexd-project/nexd/internal/profdump"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/version"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// server is the fully built node: build sets every field before anything serves, so
// nothing here is ever nil.
type server struct {
	*daemon
	// ctx is the node's lifetime: the owned goroutines end when the stop cancels it.
	ctx    context.Context
	cancel context.CancelFunc

	id         *identity.Identity
	stateDir   string // "" for an ephemeral node
	runtimeDir string
	conn       *natsconn.Conn
	minter     mint.Minter
	metrics    *metrics.Metrics
	node       *node.Node
	status     statusCount // the status line's workload count
	nexlets    *nexlets.Manager
	secrets    *secretStore
	ctl        *switchBackend // what the control socket serves
	revokes    goroutines     // credential revocations, awaited before NATS closes
	// revokeRetries ends with the wait for revokes: their retries stop then.
	revokeRetries     context.Context
	stopRevokeRetries context.CancelFunc
	kv                *state.KV  // the state bucket (state "kv"), else nil
	jetstream         jsWatch    // what JetStream last said about kv
	disk              *diskWatch // whether the state and runtime directories can be written
	// tombstones stand in for kv's removals that failed (with a state_dir), else nil.
	tombstones *node.Tombstones

	reloadMu       sync.Mutex // one reload at a time (SIGHUP and the socket)
	nexletsStopped sync.Once  // stopNexlets

	// watchdogTaken is closed when serve's health-gated watchdog starts; bridging says
	// a degraded start-up's pings already continue until then (bridgeWatchdog).
	watchdogTaken chan struct{}
	bridging      bool
}

// buildHooks let tests replace what would touch the host beyond the test's reach.
type buildHooks struct {
	// cgroups, when set, is used instead of detecting cgroups (and moving the process).
	cgroups func() *cgroup.Manager
}

// goroutineWait bounds how long the stop waits for the owned goroutines to end.
const goroutineWait = 15 * time.Second

// build constructs every component in dependency order, pushing each one's closer as
// it comes up. Only the control socket serves, and only the start-up backend; the node
// API, nexlets, full control API and metrics start in serve. startCtx bounds the
// blocking steps (connecting, fetching nexlets).
func (d *daemon) build(ctx, startCtx context.Context, hooks buildHooks) (*server, error) {
	cfg := d.cfg()
	s := &server{daemon: d, stateDir: cfg.Node.StateDir, watchdogTaken: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(ctx)
	s.revokeRetries, s.stopRevokeRetries = context.WithCancel(s.ctx)
	// Unwound next to last: whatever else was started has ended or been closed by then.
	d.closers.push("goroutines", func(context.Context) error {
		s.cancel()
		if !d.own.wait(goroutineWait) {
			return fmt.Errorf("some did not end within %s", goroutineWait)
		}
		return nil
	})

	d.own.goFn(warmUp)
	d.notify.Status("starting: loading identity")
	if err := privateStateDir(s.stateDir, d.log); err != nil {
		return nil, err
	}
	// One nexd per directory: a second one on the same state or runtime dir would
	// adopt, end or clean up the first's nexlets and workloads as its own leftovers.
	if err := d.holdDir("state_dir", s.stateDir, stateLock, 0o700); err != nil {
		return nil, err
	}
	// A first start's seeds become durable while the native nexlet starts (below).
	id, err := identity.Begin(cfg.Node.Seed, cfg.Node.XKeySeed, s.stateDir)
	if err != nil {
		return nil, err
	}
	s.id = id
	// Owns the seeds' writes should the start end before they are waited for.
	d.closers.push("identity", func(context.Context) error { return id.Persisted() })
	// A temp runtime dir of this node's own (no runtime_dir, no state_dir) is removed by
	// a stop that leaves nothing running.
	var tempRuntimeDir bool
	s.runtimeDir, tempRuntimeDir = runtimeDir(cfg, id.ID())
	// 0711: the native nexlet's workloads, under other uids, reach their directories
	// through it (it makes it so itself when missing).
	if made, err := ownDir("runtime_dir", s.runtimeDir, 0o711, stateDirGroups()); err != nil {
		return nil, err
	} else if made {
		d.log.Info("made the runtime directory", "dir", s.runtimeDir, "mode", "0711")
	}
	if err := d.holdDir("runtime_dir", s.runtimeDir, runtimeLock, 0o711); err != nil {
		return nil, err
	}
	if p := d.prestarted; p != nil {
		// Both directories are this nexd's now: the pre-started native nexlet reads or
		// stores its xkey's seed there while nexd builds itself (docs/performance-notes.md, Ready).
		if err := p.Preview(nexlets.NativePreview(cfg, s.runtimeDir)); err != nil {
			d.log.Debug("pre-started native nexlet not told its directories", "err", err)
		}
	}
	if err := d.logger.Reconfigure(d.logOptions(cfg, id.ID())); err != nil {
		return nil, fmt.Errorf("logger: %w", err)
	}
	d.log.Info("nexd starting", "version", version.Version, "commit", version.Commit,
		"node_id", id.ID(), "node_name", cfg.Node.Name, "nexus", cfg.Node.Nexus,
		"identity", string(id.NodeSource), "state_dir", s.stateDir)

	client, embed := natsOptions(cfg)
	// After `nexctl node reexec`: what the previous image handed over in a memfd (taken
	// before any nexlet starts: its descriptor is no child's business).
	var handed []supervise.Record
	var users *mint.Users
	h, err := takeHandover(d.log)
	if err != nil {
		d.log.Warn("re-exec: the state handed over in the memfd is unusable; rebuilding it from the state directory", "err", err)
	} else if h != nil {
		d.log.Info("re-exec: state handed over in a memfd", "nexlets", len(h.Nexlets), "workload_users", len(h.Users.Workloads))
		handed, users = h.Nexlets, &h.Users
	}
	if h != nil || err != nil {
		// A re-exec: systemd's watchdog runs on through it.
		s.feedWatchdogUntilServed()
	}
	nopts := nexlets.Options{
		Handed:           handed,
		Config:           cfg,
		NodeID:           id.ID(),
		Minter:           nil, // below
		RuntimeDir:       s.runtimeDir,
		RemoveRuntimeDir: tempRuntimeDir,
		Logger:           d.log,
		OnExit:           func(name string, oom bool) { s.metrics.NexletExit(name, oom) },
		OnFailed:         func(string) { d.notify.Status(s.statusLine()) },
		OnSocketRefused:  func() { s.metrics.NexletSocketRefused() },
		ProfileEnv:       profdump.PassOn(os.Getenv),
		TestHold:         os.Getenv(testhold.Env),                   // e2e fault tests only
		SystemdUIDDir:    os.Getenv(native.EnvSystemdUIDDir),        // tests: their own lock directory
		RegisterOverNATS: os.Getenv("NEXD_LOCAL_REGISTER") == "off", // nexbench ready A/B; TestStolenNexletUser
		Prestarted:       d.prestarted,
		DefaultGOGC:      cmp.Or(os.Getenv("GOGC"), strconv.Itoa(config.DefaultGoGCPercent)),
	}
	// The cgroup root's lock goes across a re-exec as the dir locks do.
	nopts.CgroupLockFD, _ = d.inheritedLock("cgroup_root")
	nopts.KeepCgroupLock = func(l *dirlock.Lock) { d.keepAcrossExec("cgroup_root", l) }
	s.metrics = metrics.New()
	// The native nexlet starts as early as its credentials can be minted: with an
	// external server the configuration names, before nexd's own connect, so that its
	// exec, runtime start and cgroup placement overlap with the connect, the state
	// bucket and the building of the node. It registers once the node API serves.
	var early *earlyNexlets
	if urls, ok := natsembed.ExternalClientURLs(client, embed); ok && !cfg.Node.DisableNativeStart && !nexlets.NeedsNATS(cfg) {
		if err := s.newMinter(urls, users); err != nil {
			return nil, err
		}
		nopts.Minter = s.minter
		early = s.startNexletsEarly(startCtx, nopts, hooks)
	}

	// Nothing shows the node id beyond this process and its nexlet until it is durable.
	if err := id.Persisted(); err != nil {
		return nil, err
	}

	// The control socket answers from here on (opened while the early nexlet starts:
	// its group lookup is no business of the nexlet's): status from the snapshot while
	// the node is built (startupBackend); serve swaps in the full API once everything
	// runs.
	if err := s.openControl(startupBackend{d: d, nodeID: id.ID()}); err != nil {
		return nil, err
	}
	// The nexlets' manager is built before NATS is asked for: a start that cannot have
	// it (a cgroup root another node holds, a nexlet binary missing) ends here, as
	// before it was built beside the steps above.
	if err := early.wait(); err != nil {
		return nil, err
	}

	doneWaiting := d.waitingFor("NATS")
	s.conn, err = natsembed.Connect(startCtx, client, embed, d.log)
	doneWaiting()
	s.bridgeWatchdog()
	if err != nil {
		return nil, fmt.Errorf("nats: %w", err)
	}
	// Start-up status shows the connection from here on (JetStream may be what is
	// still missing).
	d.update(func(v *snapshot) { v.natsInfo = s.conn.Info })
	d.closers.push("NATS connection", func(ctx context.Context) error {
		// Publish the last log lines while the connection still exists.
		d.logger.AttachNATS(nil, "")
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		s.conn.Close(cctx)
		return nil
	})
	if hasTarget(cfg.LogTargets(), "nats") {
		d.logger.AttachNATS(s.conn.NC, id.ID())
	}
	// Revocations need NATS: they end before it closes.
	d.closers.push("revocations", func(context.Context) error {
		s.stopRevokeRetries() // an attempt under way still ends within revokeTimeout
		if !s.revokes.wait(revokeTimeout + 5*time.Second) {
			return fmt.Errorf("some did not end within %s", revokeTimeout+5*time.Second)
		}
		return nil
	})

	if s.minter == nil {
		if err := s.newMinter(s.conn.ClientURLs(), users); err != nil {
			return nil, err
		}
	}
	for _, w := range d.view().loaded.Warnings {
		d.log.Warn(w)
	}

	var store node.Store = node.NewMemStore()
	if cfg.Node.State == "kv" {
		if s.kv, err = d.openKVPatiently(startCtx, func(ctx context.Context) (*state.KV, error) {
			return state.OpenReplicatedKV(ctx, s.conn.NC, id.ID(), s.conn.JSDomain(), cfg.Node.StateReplicas, d.log)
		}); err != nil {
			return nil, err
		}
		s.bridgeWatchdog()
		// Before the NATS connection closes (closers run last pushed first): the
		// compaction of delete markers the node's start read found may still run.
		kv := s.kv
		d.closers.push("state bucket compaction", func(context.Context) error { kv.Close(); return nil })
		store = s.kv
		s.jetstream.writes = s.kv
		if s.stateDir != "" {
			// A stopped workload whose removal from the bucket fails stays stopped:
			// a tombstone here keeps it out of every replay until a retry removes it.
			ts, err := node.NewTombstones(s.kv, filepath.Join(s.stateDir, "tombstones"), d.log)
			if err != nil {
				return nil, err
			}
			d.closers.push("state removal retries", func(context.Context) error { ts.Close(); return nil })
			store, s.tombstones = ts, ts
		}
	}
	if cfg.Node.LogStream {
		s.keepLogStream(startCtx, cfg.Node.LogStreamMaxAge, cfg.Node.LogStreamMaxBytes)
	}
	s.disk = newDiskWatch(d.log, map[string]string{"state directory": cfg.Node.StateDir, "runtime directory": s.runtimeDir})
	s.node, err = node.New(node.Options{
		NC:                      s.conn.NC,
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
		LocalStarts:             os.Getenv("NEXD_LOCAL_STARTS"), // a benchmark's A/B switch
		TestHold:                os.Getenv(testhold.Env),        // e2e fault tests only
		KnownSchemas:            []string{native.StartRequestSchema},
		AllowRemoteRegistration: cfg.Node.AllowRemoteAgentRegistration,
		AllowDirectFeeds:        cfg.Node.AllowNexletDirectFeeds,
		RemoteNexlets:           remoteNexlets(cfg.Node.RemoteNexlets),
		TrustedNodes:            cfg.TrustedNodes,
		Minter:                  s.minter,
		DrainOutcomeFile:        drainOutcomeFile(s.stateDir),
		CanPlace:                canPlace(s.jetstream.refusal, s.disk.placeCheck),
		CanBid:                  canPlace(s.jetstream.bidRefusal, s.disk.bidRefusal),
		Store:                   s.metrics.CountStore(store),
		Emitter:                 s.emitter(cfg),
		Logger:                  d.log,
		OnLameduck:              s.onLameduck,
		// s.nexlets is there before any nexlet registers.
		OnNameBound: func(sup, name string) { s.nexlets.RecordName(sup, name) },
		Observer:    observer{Observer: metrics.Observer{M: s.metrics}, s: s},
		// s.nexlets is built next, before the node serves.
		WorkloadResources: func(id string) (protocol.WorkloadResources, bool) {
			st, ok := s.nexlets.WorkloadStats(id)
			return protocol.WorkloadResources{CPUUsageNsec: st.CPUUsageNsec, MemoryBytes: st.MemoryCurrent,
				MemoryMax: st.MemoryMax, OOMKills: st.OOMKills}, ok
		},
	})
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}

	if s.nexlets != nil {
		s.nexlets.Attach(s.node)
	} else {
		nopts.Registry, nopts.Minter, nopts.NC = s.node, s.minter, s.conn.NC
		if hooks.cgroups != nil {
			nopts.Cgroups = hooks.cgroups()
		}
		if s.nexlets, err = nexlets.New(startCtx, nopts); err != nil {
			return nil, err
		}
	}
	s.secrets = newSecretStore(s.stateDir)
	s.metrics.WatchLive(metrics.Live{
		NATSReconnects: s.conn.Reconnects,
		NATSConnected:  s.conn.Connected,
		JetStream:      s.jetstream.metric,
		Leafs: func() (int, int) {
			if l := s.leafStatus(); l != nil {
				return l.Remotes, l.Connected
			}
			return 0, 0
		},
		// During a NATS outage the last known listing (nexd_nats_connected says 0),
		// not an empty one: the workloads run on.
		Workloads: func(ctx context.Context) ([]protocol.WorkloadSummary, error) {
			ws, _, err := s.node.KnownWorkloads(ctx)
			return ws, err
		},
		State:            func() string { return string(s.view().phase) },
		AuctionDrops:     s.node.AuctionDrops,
		AuctionsNotBid:   s.node.NotBid,
		ListChecksFailed: s.node.ListChecksFailed,
		Tombstones:       func() int { return len(s.tombstoneList()) },
		ReplylessDropped: s.node.ReplylessDropped,
		Nexlets: func(ctx context.Context) ([]metrics.NexletHealth, error) {
			ns, err := backend{s}.Nexlets(ctx)
			out := make([]metrics.NexletHealth, 0, len(ns))
			for _, n := range ns {
				out = append(out, metrics.NexletHealth{Name: n.Name, State: string(n.State), Health: string(n.Health),
					EndsUnheard: n.EndsUnheard != nil})
			}
			return out, err
		},
	})
	s.metrics.WatchNexletBounds(s.node)
	return s, nil
}

// earlyNexlets is the native nexlet's early start (startNexletsEarly), which runs
// beside nexd's build until build waits for it.
type earlyNexlets struct {
	done chan struct{} // closed once the manager is built, or failed (err)
	err  error
}

// wait waits for the early start's manager (none: nil) and says why there is none.
// Build waits for it, and so does its closer, so the goroutine always has an owner.
func (e *earlyNexlets) wait() error {
	if e == nil {
		return nil
	}
	<-e.done
	return e.err
}

// startNexletsEarly builds the nexlets' manager and starts the native nexlet in a
// goroutine, beside nexd's own steps up to its NATS connect (the identity's
// durability, the control socket): the manager's first cgroup change (the node's
// root) waits for the kernel's cgroup_mutex, which the pre-started nexlet's cgroup
// warm-up holds through an RCU grace period (3-15 ms here), and nexd's start no longer
// waits with it (docs/performance-notes.md, Ready). s.nexlets is set before e.done closes.
func (s *server) startNexletsEarly(startCtx context.Context, o nexlets.Options, hooks buildHooks) *earlyNexlets {
	e := &earlyNexlets{done: make(chan struct{})}
	// Pushed before the start, where the closer was pushed when the start ran inline.
	// Should the start be abandoned before serve takes over the stop (below it): what
	// runs in the workloads' cgroups then is an earlier nexd's, which this one never
	// got to know: left for the nexd that adopts it (live_restore) or replays it.
	s.closers.push("nexlets started early", func(ctx context.Context) error {
		if e.wait() != nil {
			return nil // no manager, nothing started
		}
		s.nexlets.LeaveWorkloads()
		return s.stopNexlets(ctx)
	})
	go func() {
		defer close(e.done)
		if hooks.cgroups != nil {
			o.Cgroups = hooks.cgroups()
		}
		m, err := nexlets.New(startCtx, o)
		if err != nil {
			e.err = err
			return
		}
		s.nexlets = m
		m.StartEarly(startCtx)
	}()
	return e
}

// The lock files of the state and runtime dirs: two names, so that one directory given
// as both is held once of each.
const (
	stateLock   = "nexd-state.lock"
	runtimeLock = "nexd-runtime.lock"
)

// envDirLocks names the locks a re-executing nexd kept open across its execve for its
// new image: "state_dir=<fd>,runtime_dir=<fd>,cgroup_root=<fd>".
const envDirLocks = "NEXD_DIRLOCK_FDS"

// holdDir takes dir (config key key) for this nexd until the process ends or the
// closers unwind; another nexd on it is a start-up error naming the dir and its pid.
// The lock is close-on-exec, so the nexlets and workloads left running (live_restore)
// never hold it; a re-exec keeps it across its execve (keepAcrossExec) and the new
// image takes it back, so no other nexd takes the dir in between.
func (d *daemon) holdDir(key, dir, name string, perm os.FileMode) error {
	fd, inherited := d.inheritedLock(key)
	if dir == "" {
		if inherited {
			dirlock.Forget(fd, name)
		}
		return nil
	}
	var l *dirlock.Lock
	var err error
	if inherited {
		l, err = dirlock.Inherit(fd, dir, name, perm)
	} else {
		l, err = dirlock.Hold(dir, name, perm)
	}
	if errors.Is(err, dirlock.ErrHeld) {
		return fmt.Errorf("%s %w: another nexd runs on it; give each node its own %s", key, err, key)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", key, err)
	}
	if n := l.Note(); n != "" {
		d.log.Warn("a local user held nexd's lock", "key", key, "detail", n)
	}
	d.closers.push(key+" lock", func(context.Context) error {
		d.keepAcrossExec(key, l)
		l.Release()
		return nil
	})
	return nil
}

// inheritedLock takes the descriptor of lock key (a config key: state_dir, runtime_dir,
// cgroup_root) that the previous image kept across its re-exec (envDirLocks), once.
func (d *daemon) inheritedLock(key string) (fd int, ok bool) {
	d.lockMu.Lock()
	defer d.lockMu.Unlock()
	if d.inheritedDirLocks == nil {
		d.inheritedDirLocks = map[string]int{}
		if v, ok := os.LookupEnv(envDirLocks); ok {
			os.Unsetenv(envDirLocks) // no nexlet sees it
			for kv := range strings.SplitSeq(v, ",") {
				k, fd, _ := strings.Cut(kv, "=")
				if n, err := strconv.Atoi(fd); err == nil && n > 2 {
					// Close-on-exec at once, whether this image knows the key or not:
					// a lock an image of another version kept must not pass to the
					// nexlets and workloads this one starts.
					unix.CloseOnExec(n)
					d.inheritedDirLocks[k] = n
				}
			}
		}
	}
	fd, ok = d.inheritedDirLocks[key]
	delete(d.inheritedDirLocks, key)
	return fd, ok
}

// keepAcrossExec is called with lock key just before it is let go at a stop: during a
// re-exec (keepDirLocks) it keeps a descriptor of l open across the execve and names it
// in keptDirLocks for the new image (envDirLocks), so the lock is never free between
// the two images. A nil l (nothing held) is skipped.
func (d *daemon) keepAcrossExec(key string, l *dirlock.Lock) {
	if l == nil || !d.keepDirLocks.Load() {
		return
	}
	fd, err := l.KeepAcrossExec()
	if err != nil {
		d.log.Warn("re-exec: a lock is let go before the exec", "lock", key, "err", err)
		return
	}
	d.lockMu.Lock()
	d.keptDirLocks = append(d.keptDirLocks, key+"="+strconv.Itoa(fd))
	d.lockMu.Unlock()
}

// runtimeDir holds fetched nexlet binaries and workload directories: runtime_dir (which
// config resolves from $RUNTIME_DIRECTORY or state_dir), else a temp dir of this node
// (temp).
func runtimeDir(cfg *config.Config, nodeID string) (dir string, temp bool) {
	if cfg.Node.RuntimeDir != "" {
		return cfg.Node.RuntimeDir, false
	}
	return filepath.Join(os.TempDir(), "nexd-"+nodeID[:12]), true
}

func natsOptions(cfg *config.Config) (natsconn.Options, natsembed.Options) {
	port := cfg.Node.EmbeddedNATSPort
	if port == 0 {
		port = -1 // any free port; natsembed reads 0 as its default
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
			// The node's inboxes, where nothing it mints may publish: see
			// protocol.NodeInboxRoot (TestAttackNexletForgesIntoNodeWatcher).
			InboxPrefix: protocol.NodeInboxPrefix(randid.New()),
		}, natsembed.Options{
			InatsConfig: cfg.Node.InatsConfig,
			StateDir:    cfg.Node.StateDir,
			Port:        port,
			LeafRemote:  cfg.NATS.LeafRemote,
			LeafCreds:   cfg.NATS.LeafCreds,
			JSDomain:    cfg.NATS.JSDomain,
		}
}

// embeddedTrust is the zero-config embedded server's operator setup, nil when nexd
// uses --inats-config or an external NATS.
func (s *server) embeddedTrust() *natsembed.Trust {
	if srv, ok := s.conn.InProcess().(*natsembed.Server); ok && srv != nil {
		return srv.Trust()
	}
	return nil
}

// newMinter makes the credential minter for nexlets and workloads that dial servers,
// and gives it the workload users a re-executing nexd handed over (nil: none), before
// any nexlet registers: the replay mints newer users.
func (s *server) newMinter(servers []string, users *mint.Users) error {
	var trust *natsembed.Trust
	if s.conn != nil {
		trust = s.embeddedTrust()
	}
	m, err := newMinter(s.cfg(), servers, trust)
	if err != nil {
		return err
	}
	s.minter = m
	s.log.Info("credential minter", "minter", m.Describe())
	if w := m.Warning(); w != "" && s.cfg().Node.IssuerSigningKey != "" {
		// The other minters' weaknesses are among the config warnings.
		s.log.Warn(w)
	}
	if r, ok := m.(mint.Remembering); ok && users != nil {
		if err := r.Remember(*users); err != nil {
			s.log.Warn("re-exec: the handed-over workload users are unusable; they expire instead of being revoked", "err", err)
		}
	}
	return nil
}

// stopNexlets stops the nexlets once: serve's closer, or the one build pushed after
// starting the native nexlet early, whichever comes first.
func (s *server) stopNexlets(ctx context.Context) error {
	var err error
	s.nexletsStopped.Do(func() {
		sctx, cancel := context.WithTimeout(ctx, s.cfg().Node.StopGrace+10*time.Second)
		defer cancel()
		err = s.nexlets.Stop(sctx)
	})
	return err
}

func newMinter(cfg *config.Config, servers []string, trust *natsembed.Trust) (mint.Minter, error) {
	opts := mint.Options{Servers: servers, Nexus: cfg.Node.Nexus, JSDomain: cfg.NATS.JSDomain,
		// Nexlets renew their own users (RENEWAGENT) and their workloads' users
		// (RENEWCREDS) before they expire.
		AgentTTL: cfg.Node.NexletCredsTTL, WorkloadTTL: cfg.Node.WorkloadCredsTTL}
	n := cfg.Node
	switch {
	case trust != nil:
		// The embedded server's own account: scoped users signed by its signing key,
		// revoked in the account JWT (which nexd holds) when a workload stops.
		opts.Revoker = &mint.AccountRevoker{OperatorSigner: trust.OperatorSigner(), Load: trust.LoadAccount,
			Push: trust.PushAccount, Retain: max(cfg.Node.WorkloadCredsTTL, cfg.Node.NexletCredsTTL) + time.Hour}
		return mint.NewSigningKeyMinter(trust.SigningSeed(), trust.AccountPub(), opts)
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

func (s *server) emitter(cfg *config.Config) node.Emitter {
	switch cfg.Node.Events {
	case "nats":
		return node.NATSEmitter{NC: s.conn.NC, Logger: s.log}
	case "logs":
		return node.LogEmitter{Logger: s.log}
	}
	return node.NoEmitter{}
}

func hasTarget(ts []string, t string) bool {
	for _, x := range ts {
		if x == t {
			return true
		}
	}
	return false
}

// remoteNexlets converts the configured remote_nexlets for the node.
func remoteNexlets(in []config.RemoteNexlet) []node.RemoteNexlet {
	out := make([]node.RemoteNexlet, len(in))
	for i, r := range in {
		out[i] = node.RemoteNexlet{Name: r.Name, Type: r.Type, PublicKey: r.PublicKey}
	}
	return out
}

// keepLogStream creates (or updates) the bounded stream of workload output
// (log_stream). Its first try is part of start-up, so output is kept from the first
// workload on. When JetStream does not answer or cannot place the stream yet (a cluster
// still forming: retryableJS), the stream is made in the background, retried until it
// is or the node stops (patiently); workload output flows live meanwhile, only its
// history is missing. Before, one failure was logged and the stream never made.
func (s *server) keepLogStream(startCtx context.Context, maxAge time.Duration, maxBytes int64) {
	var js jetstream.JetStream
	var err error
	if domain := s.conn.JSDomain(); domain != "" {
		js, err = jetstream.NewWithDomain(s.conn.NC, domain)
	} else {
		js, err = jetstream.New(s.conn.NC)
	}
	if err != nil {
		s.log.Error("log_stream is on but the stream cannot be created", "err", err)
		return
	}
	ensure := func(ctx context.Context) error { return logstream.Ensure(ctx, js, maxAge, maxBytes) }
	kept := func() {
		s.log.Info("keeping workload output", "stream", logstream.Stream, "max_age", maxAge, "max_bytes", maxBytes)
	}
	tctx, cancel := context.WithTimeout(startCtx, 5*time.Second)
	err = ensure(tctx)
	cancel()
	if err == nil {
		kept()
		return
	}
	if retry, _ := retryableJS(err); !retry {
		s.log.Error("log_stream is on but the stream cannot be created", "err", err)
		return
	}
	s.log.Warn("log_stream: JetStream cannot make the stream yet; retrying in the background (workload output flows live meanwhile, without a history)", "err", err)
	ctx, cancel := context.WithCancel(s.ctx)
	done := make(chan struct{})
	if !s.own.goFn(func() {
		defer close(done)
		if err := s.patiently(ctx, "the log stream", ensure); err != nil {
			if ctx.Err() == nil {
				s.log.Error("log_stream is on but the stream cannot be created", "err", err)
			}
			return
		}
		kept()
	}) {
		cancel()
		return
	}
	// Unwound before the NATS connection closes: the retries end with the node's stop,
	// not on a closed connection.
	s.closers.push("log stream retries", func(context.Context) error {
		cancel()
		<-done
		return nil
	})
}

// ownDir makes dir (mode perm) when missing and refuses it unless nexd's user or root
// owns it, every directory on the way to it and every symlink followed to reach it,
// and no other user may write in it or, without the sticky bit, in a directory on the
// way: a directory a local user made first (under a parent anyone may write to, or the
// temp runtime dir a configured node_seed names in advance), or one under a directory
// or symlink of hers, is hers to swap (rename nexd's away, also while nexd runs, and put
// her own or a symlink in its place): seeds, secrets, a fetched nexlet binary nexd runs
// as root. A group's write permission counts as others' unless trusted says its members
// gain nothing by it (see dirGroups). The way is checked before anything is made on it.
//
// Of dir only the last name is made (made says so), as systemd's StateDirectory= and
// RuntimeDirectory= make theirs: a missing directory above it is refused, naming it (a
// path with a typo, or a file system not mounted yet: nexd made the whole chain and
// started afresh there, a new identity and no state; TestOwnDirMakesItsOwnNameOnly).
func ownDir(key, dir string, perm os.FileMode, trusted dirGroups) (made bool, err error) {
	if err := safePath(key, dir, true, trusted); err != nil {
		return false, err
	}
	switch err := os.Mkdir(dir, perm); {
	case err == nil:
		made = true
	case errors.Is(err, fs.ErrNotExist):
		parent := filepath.Dir(filepath.Clean(dir))
		return false, fmt.Errorf("%s %s: directory %s does not exist: nexd makes %s when missing, but no directory above it; create it or correct the path", key, dir, parent, filepath.Base(dir))
	case !errors.Is(err, fs.ErrExist):
		return false, fmt.Errorf("%s %s: %w", key, dir, err)
	}
	return made, safePath(key, dir, false, trusted)
}

// dirGroups says which groups may have write permission on nexd's directories: those
// whose members could already do what renaming in them gives (replace seeds, secrets or
// a nexlet binary nexd runs as root, or move the control socket away and read admins'
// requests). Root's group 0 always; nexd's own primary group when nexd is not root (as
// its own uid is: `make run` in a checkout made under umask 002, a user's private
// group); for the control socket's directory also the control group (`nex`), whose
// members are the socket's admins and may deploy into any namespace anyway. Not group
// nex for the state and runtime directories: its members are not root.
type dirGroups struct {
	controlGID uint32 // the control group's gid, trusted when hasControl
	hasControl bool
}

func stateDirGroups() dirGroups { return dirGroups{} }

// controlDirGroups looks the control group up (as control.Listen does).
func controlDirGroups() dirGroups {
	var g dirGroups
	if gr, err := user.LookupGroup(control.DefaultGroup); err == nil {
		if gid, err := strconv.ParseUint(gr.Gid, 10, 32); err == nil {
			g.controlGID, g.hasControl = uint32(gid), true
		}
	}
	return g
}

func (g dirGroups) trusts(gid uint32) bool {
	switch {
	case gid == 0:
		return true
	case os.Geteuid() != 0 && int(gid) == os.Getegid():
		return true
	}
	return g.hasControl && gid == g.controlGID
}

// groupName names gid for an error ("staff (gid 50)", or the number alone).
func groupName(gid uint32) string {
	if g, err := user.LookupGroupId(strconv.FormatUint(uint64(gid), 10)); err == nil {
		return fmt.Sprintf("%s (gid %d)", g.Name, gid)
	}
	return fmt.Sprintf("gid %d", gid)
}

// safePath resolves dir name by name as the kernel does, checking what ownDir
// requires; with missingOK a missing name ends the walk (ownDir makes the rest under a
// directory that passed).
func safePath(key, dir string, missingOK bool, groups dirGroups) error {
	trusted := func(uid uint32) bool { return uid == 0 || int(uid) == os.Geteuid() }
	groupWrite := func(path string, st *syscall.Stat_t) error {
		// The group class's write bit is the ACL mask when the directory has named
		// entries: without it, no group and no named user may write in it.
		if st.Mode&0o020 == 0 {
			return nil
		}
		acl, err := accessACL(path)
		if err != nil {
			return fmt.Errorf("%s %s: %s: %w", key, dir, path, err)
		}
		groupObjWrites := acl == nil
		for _, e := range acl {
			switch {
			case e.perm&0o2 == 0:
			case e.tag == aclGroupObj:
				groupObjWrites = true
			case e.tag == aclUser && !trusted(e.id):
				return fmt.Errorf("%s %s: %s has an ACL entry that lets uid %d write in it: that user could replace what nexd keeps there; fix: setfacl -x u:%d %s", key, dir, path, e.id, e.id, path)
			case e.tag == aclGroup && !groups.trusts(e.id):
				g := groupName(e.id)
				return fmt.Errorf("%s %s: %s has an ACL entry that lets group %s write in it: the group's members could replace what nexd keeps there; fix: setfacl -x g:%d %s", key, dir, path, g, e.id, path)
			}
		}
		if !groupObjWrites || groups.trusts(st.Gid) {
			return nil
		}
		g := groupName(st.Gid)
		return fmt.Errorf("%s %s: %s (mode %04o, group %s) is writable by its group: the group's members could replace what nexd keeps there; fix: chmod g-w %s, or chgrp root %s", key, dir, path, st.Mode&0o7777, g, path, path)
	}
	abs := dir
	if !filepath.IsAbs(dir) { // not filepath.Abs: its Clean takes "l/.." away, which the kernel resolves through l
		wd, err := os.Getwd()
		if err != nil {
			return fmt.Errorf("%s %s: %w", key, dir, err)
		}
		abs = wd + "/" + dir
	}
	cur, pending, links := "/", strings.Split(abs, "/"), 0
	for len(pending) > 0 {
		name := pending[0]
		pending = pending[1:]
		switch name {
		case "", ".":
			continue
		case "..":
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, name)
		var st syscall.Stat_t
		if err := syscall.Lstat(next, &st); err != nil {
			if missingOK && errors.Is(err, syscall.ENOENT) {
				return nil
			}
			return fmt.Errorf("%s %s: %w", key, dir, err)
		}
		if st.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			if !trusted(st.Uid) {
				return fmt.Errorf("%s %s: %s is a symlink owned by uid %d: another user may point it elsewhere; use a directory of nexd's own", key, dir, next, st.Uid)
			}
			if links++; links > 40 {
				return fmt.Errorf("%s %s: too many symlinks", key, dir)
			}
			target, err := os.Readlink(next)
			if err != nil {
				return fmt.Errorf("%s %s: %w", key, dir, err)
			}
			if filepath.IsAbs(target) {
				cur = "/"
			}
			pending = append(strings.Split(target, "/"), pending...)
			continue
		}
		switch {
		case st.Mode&syscall.S_IFMT != syscall.S_IFDIR:
			return fmt.Errorf("%s %s: %s is not a directory", key, dir, next)
		case !trusted(st.Uid):
			return fmt.Errorf("%s %s: %s is owned by uid %d, not by nexd's uid %d or root: that user could replace what nexd keeps there; fix: remove it, or chown it to uid %d, or use another directory", key, dir, next, st.Uid, os.Geteuid(), os.Geteuid())
		case st.Mode&0o002 != 0 && st.Mode&syscall.S_ISVTX == 0:
			return fmt.Errorf("%s %s: %s (mode %04o) is writable by every user: any of them could replace what nexd keeps there; fix: chmod o-w %s", key, dir, next, st.Mode&0o7777, next)
		case st.Mode&syscall.S_ISVTX == 0:
			if err := groupWrite(next, &st); err != nil {
				return err
			}
		}
		cur = next
	}
	// The directory itself: no other user may write in it, sticky or not.
	var st syscall.Stat_t
	if err := syscall.Stat(cur, &st); err != nil {
		return fmt.Errorf("%s %s: %w", key, dir, err)
	}
	if st.Mode&0o002 != 0 {
		return fmt.Errorf("%s %s (mode %04o) is writable by every user: any of them could replace what nexd keeps there; fix: chmod o-w %s", key, dir, st.Mode&0o7777, dir)
	}
	return groupWrite(cur, &st)
}

// The tags of a POSIX ACL's entries (linux/posix_acl.h) that may let others write.
const (
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclGroup    = 0x08
)

// aclEntry is one entry of a POSIX access ACL as the kernel stores it in the
// system.posix_acl_access attribute (linux/posix_acl_xattr.h).
type aclEntry struct {
	tag, perm uint16
	id        uint32
}

// accessACL reads path's POSIX access ACL: nil when it has none (its mode says all) or
// its file system keeps none. A named user or group with write permission there is
// counted in the mode only as the group class's write bit (the mask), under the
// directory's group: it must be read to know who may write.
func accessACL(path string) ([]aclEntry, error) {
	buf := make([]byte, 4+8*64)
	for {
		n, err := unix.Lgetxattr(path, "system.posix_acl_access", buf)
		switch {
		case errors.Is(err, unix.ENODATA) || errors.Is(err, unix.EOPNOTSUPP):
			return nil, nil
		case errors.Is(err, unix.ERANGE):
			buf = make([]byte, 2*len(buf))
			continue
		case err != nil:
			return nil, fmt.Errorf("its ACL: %w", err)
		case n < 4 || (n-4)%8 != 0 || binary.LittleEndian.Uint32(buf) != 2:
			return nil, fmt.Errorf("its ACL (%d bytes) is not one this nexd reads", n)
		}
		var acl []aclEntry
		for b := buf[4:n]; len(b) >= 8; b = b[8:] {
			acl = append(acl, aclEntry{tag: binary.LittleEndian.Uint16(b), perm: binary.LittleEndian.Uint16(b[2:]), id: binary.LittleEndian.Uint32(b[4:])})
		}
		return acl, nil
	}
}

// privateStateDir makes the state directory (seeds, the embedded server's keys,
// secrets, JetStream) nexd's alone: 0700, also when it already existed with a looser
// mode (`mkdir -p` under umask 022), so no other user or workload can list or read it.
func privateStateDir(dir string, log *slog.Logger) error {
	if dir == "" {
		return nil
	}
	made, err := ownDir("state_dir", dir, 0o700, stateDirGroups())
	if err != nil {
		return err
	}
	if made {
		log.Info("made the state directory", "dir", dir, "mode", "0700")
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state_dir %s: %w", dir, err)
	}
	if mode := fi.Mode().Perm(); mode&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("state_dir %s has mode %04o and holds the node's keys: chmod 700 failed: %w", dir, mode, err)
		}
		log.Warn("state_dir was readable by others; made it 0700", "dir", dir, "was", fmt.Sprintf("%04o", mode))
	}
	return nil
}

// tombstoneList lists the stopped workloads whose removal from node state is pending.
func (s *server) tombstoneList() []node.Tombstone {
	if s.tombstones == nil {
		return nil
	}
	return s.tombstones.List()
}

// drainOutcomeFile is where the node keeps its last lame duck drain's outcome ("" for
// an ephemeral node, which keeps nothing).
func drainOutcomeFile(stateDir string) string {
	if stateDir == "" {
		return ""
	}
	return filepath.Join(stateDir, "last-drain.json")
}
