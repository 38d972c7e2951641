package native

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/coldpages"
	"github.com/nexd-project/nexd/internal/memtrim"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/nexlet/secrets"
)

// Environment the node sets for the native nexlet, besides nexlet.ConnDataFromEnv's.
const (
	EnvCgroup       = "NEX_AGENT_CGROUP"          // cgroup spec of the nexlet's subtree
	EnvRuntimeDir   = "NEX_NATIVE_RUNTIME_DIR"    // workloads/<id> private dirs
	EnvStateDir     = "NEX_NATIVE_STATE_DIR"      // secrets/<namespace>/<key>
	EnvMaxWorkloads = "NEX_NATIVE_MAX_WORKLOADS"  // optional bound on running workloads
	EnvUsers        = "NEX_NATIVE_WORKLOAD_USERS" // named users start requests may ask for, comma-separated
	EnvAllowRoot    = "NEX_NATIVE_ALLOW_ROOT"     // "true": start requests may ask for root
	EnvUIDRange     = "NEX_NATIVE_UID_RANGE"      // dynamic uid range MIN-MAX
	EnvUIDLeaseDir  = "NEX_NATIVE_UID_LEASE_DIR"  // where dynamic uids are leased (default DefaultLeaseDir)
	// EnvSystemdUIDDir is systemd's dynamic uid lock directory, whose locks on the
	// leased uids the nexlet holds (default DefaultSystemdUIDDir; "-": none).
	EnvSystemdUIDDir = "NEX_NATIVE_SYSTEMD_UID_DIR"
	EnvExitsDir      = "NEX_NATIVE_EXITS_DIR"     // nexd's exit records of orphaned workloads
	EnvCgroupDriver  = "NEX_NATIVE_CGROUP_DRIVER" // "cgroupfs" (default) or "systemd"
	// Defaults for workloads whose start request names no limit, and the artifact cap
	// (bytes; 0 or absent: none, a negative size means "max": none either).
	EnvDefaultMemoryMax = "NEX_NATIVE_DEFAULT_MEMORY_MAX"
	EnvDefaultPidsMax   = "NEX_NATIVE_DEFAULT_PIDS_MAX"
	EnvArtifactMax      = "NEX_NATIVE_ARTIFACT_MAX"
	// EnvGOGC is GOGC ("off" or a percentage) for after the registration: the start
	// runs with Go's default, collecting less while the node waits for it.
	EnvGOGC = "NEX_NATIVE_GOGC"
	// EnvKeepStartupPages "true" keeps the binary's pages start-up faulted in resident
	// (keep_startup_pages); by default they are unmapped once registered (coldpages).
	EnvKeepStartupPages = "NEX_NATIVE_KEEP_STARTUP_PAGES"
	// EnvLogLevel is the lowest level nexd logs (slog's name: DEBUG, INFO, WARN,
	// ERROR), which the nexlet logs at too: nexd drops every line below it, and each
	// line wakes nexd to read and parse it, on the deploy's path ("workload started",
	// "workload output"). DEBUG includes each start's step timings. Absent: INFO. A
	// reload that changes nexd's level tells the nexlet over its local channel.
	EnvLogLevel = "NEX_NATIVE_LOG_LEVEL"
)

// ShutdownTimeout bounds how long Main waits for workloads to stop at exit.
const ShutdownTimeout = 2 * time.Minute

// Main runs the native nexlet as a child of the node (`nexd nexlet native`): it reads
// its identity and registration credentials from env, registers, serves until ctx ends,
// then stops every workload with its grace. When detach fires first it exits and leaves
// every workload running instead. level, when not nil, is log's level: nexd changes it
// over the local channel when a reload changed its own. ahead, when not nil, is what a
// pre-started process built before its hand-off (BuildAhead); Main waits for it.
func Main(ctx context.Context, env func(string) string, log *slog.Logger, level *slog.LevelVar, detach, reattach <-chan os.Signal, ahead *Ahead) error {
	defer ahead.Wait()
	// The registration key is read while the nexlet builds itself: a process's first
	// ed25519 key builds the curve's tables (about 1 ms here), on the way to the
	// registration nexd's start waits for.
	var regKey nkeys.KeyPair
	var regKeyErr error
	regKeyRead := make(chan struct{})
	go func() {
		defer close(regKeyRead)
		regKey, regKeyErr = nexlet.RegistrationKeyFromEnv(env)
	}()
	defer func() { <-regKeyRead }()
	// The channel from the nexd that spawned it, marked close-on-exec before anything
	// forks: no workload may inherit it.
	lf, err := localchan.FromEnv(env)
	if err != nil {
		return err
	}
	var local *localchan.Server
	if lf != nil {
		if local, err = localchan.NewServer(lf); err != nil {
			return err
		}
		if level != nil {
			local.OnLogLevel = func(s string) {
				var l slog.Level
				if l.UnmarshalText([]byte(s)) == nil {
					level.Set(l)
				}
			}
		}
	}
	creds, err := nexlet.ConnDataFromEnv(env)
	if err != nil {
		return err
	}
	nodeID, agentID, err := nexlet.IdentityFromEnv(env)
	if err != nil {
		return err
	}
	// A node that takes the registration on the channel gets it there; else connect
	// while building the nexlet (its key, users, cgroups): Run registers on it.
	localReg := local != nil && localchan.ServesRegistration(env)
	var dial *nexlet.Dial
	var sock *nexlet.Socket
	if !localReg {
		dial = nexlet.DialAhead(ctx, creds, "nexlet-"+Name+"-register", log)
		defer dial.Close()
	} else {
		// Its own connection, with the credentials the registration returns, is made
		// after the registration, on the way to nexd's READY: the socket to the first
		// server is opened now, while the nexlet builds itself and registers.
		sock = nexlet.SocketAhead(creds.NatsServers)
		defer sock.Close()
	}
	// What is made ahead for deploys waits for the registration: nexd's start waits
	// for it, on a machine whose cores this start may share with nexd's.
	registered := make(chan struct{})
	cfg := Config{Cgroup: env(EnvCgroup), Logger: log, RuntimeDir: env(EnvRuntimeDir), ExitsDir: env(EnvExitsDir),
		TestHold:     env(testhold.Env),
		CgroupDriver: env(EnvCgroupDriver), PoolsAfter: registered}
	cfg.RuntimeDir = runtimeDir(env)
	xkeyDurable := func() error { return nil }
	stateDir := env(EnvStateDir)
	if stateDir == "" {
		stateDir = env("STATE_DIRECTORY")
	}
	if stateDir != "" {
		// Environments are sealed to this key and kept sealed in the node's state:
		// it must outlive this process, or a replay could not open them.
		if cfg.XKey, xkeyDurable, err = ahead.XKeyFor(XKeySeedPath(env)); err != nil {
			return err
		}
		// A first start's seed is written and synced while the nexlet builds itself;
		// the registration (which announces the key) waits for it below.
		defer func() { _ = xkeyDurable() }()
		// On disk, not in the runtime directory's tmpfs: see artifactStore.
		cfg.ArtifactDir = filepath.Join(stateDir, "nexlets", filepath.Base(cfg.RuntimeDir), "artifacts")
	} else {
		stateDir = "/var/lib/nexd"
		cfg.XKey, _, _ = ahead.XKeyFor("")
		log.Warn("no state directory: the xkey is new on every start, so sealed environments cannot be replayed after a restart")
	}
	cfg.Secrets = secrets.FileStore{Dir: filepath.Join(stateDir, "secrets")}
	if v := env(EnvMaxWorkloads); v != "" {
		if cfg.MaxWorkloads, err = strconv.Atoi(v); err != nil || cfg.MaxWorkloads < 0 {
			return fmt.Errorf("%s=%q: want a non-negative integer", EnvMaxWorkloads, v)
		}
	}
	if v := env(EnvUsers); v != "" {
		for u := range strings.SplitSeq(v, ",") {
			if u = strings.TrimSpace(u); u != "" {
				cfg.Users.Allowed = append(cfg.Users.Allowed, u)
			}
		}
	}
	if v := env(EnvAllowRoot); v != "" {
		if cfg.Users.AllowRoot, err = strconv.ParseBool(v); err != nil {
			return fmt.Errorf("%s=%q: want true or false", EnvAllowRoot, v)
		}
	}
	for _, v := range []struct {
		key string
		dst *int64
	}{{EnvDefaultMemoryMax, &cfg.DefaultLimits.MemoryMax}, {EnvDefaultPidsMax, &cfg.DefaultLimits.PidsMax}, {EnvArtifactMax, &cfg.ArtifactMax}} {
		if s := env(v.key); s != "" {
			if *v.dst, err = strconv.ParseInt(s, 10, 64); err != nil {
				return fmt.Errorf("%s=%q: want a number of bytes", v.key, s)
			}
			*v.dst = max(*v.dst, 0)
		}
	}
	cfg.Users.LeaseDir = env(EnvUIDLeaseDir)
	cfg.UIDLockSocket = env(EnvUIDLockSocket)
	switch cfg.Users.SystemdUIDDir = env(EnvSystemdUIDDir); cfg.Users.SystemdUIDDir {
	case "":
		cfg.Users.SystemdUIDDir = DefaultSystemdUIDDir
	case "-":
		cfg.Users.SystemdUIDDir = ""
	}
	cfg.Users.Pool = DefaultUIDPool
	if v := env(EnvUIDRange); v != "" {
		if cfg.Users.UIDMin, cfg.Users.UIDMax, err = ParseUIDRange(v); err != nil {
			return fmt.Errorf("%s: %w", EnvUIDRange, err)
		}
	}
	n, err := New(cfg)
	if err != nil {
		return err
	}
	defer n.Close()
	log.Info("native nexlet starting", "node_id", nodeID, "agent_id", agentID, "isolation", n.IsolationMode(),
		"runtime_dir", cfg.RuntimeDir, "xkey", n.XKey(), "workloads_run_as", n.RunsAs())
	if err := xkeyDurable(); err != nil {
		return err
	}
	<-regKeyRead
	if regKeyErr != nil {
		return regKeyErr
	}
	// nexd starts it while connecting itself, and decides how long it lives.
	opts := []nexlet.Option{nexlet.WithLogger(log), nexlet.WithRegistrationKey(regKey), nexlet.WithPatientStart(),
		nexlet.WithTestHold(cfg.TestHold)}
	if dial != nil {
		opts = append(opts, nexlet.WithRegistrationDial(dial))
	}
	if local != nil {
		opts = append(opts, nexlet.WithLocalChannel(local))
		if localchan.TakesFeeds(env) {
			opts = append(opts, nexlet.WithLocalFeeds())
		}
		if p := env(localchan.EnvSocket); p != "" {
			// A later nexd that adopts it (no pair with it) takes its channel there.
			opts = append(opts, nexlet.WithLocalSocket(p))
		}
	}
	if localReg {
		opts = append(opts, nexlet.WithLocalRegistration(), nexlet.WithConnectSocket(sock))
	}
	r, err := nexlet.NewRunner(ctx, nodeID, n, opts...)
	if err != nil {
		return err
	}
	n.SetFeed(r)
	err = r.Run(agentID, creds)
	sock.Close() // unless the connect took it: not to be held open while the nexlet runs
	if err != nil {
		return err
	}
	close(registered)
	if v := env(EnvGOGC); v != "" {
		gc, err := strconv.Atoi(v)
		if v == "off" {
			gc, err = -1, nil
		}
		if err != nil {
			log.Warn("ignoring an invalid GOGC; the collector keeps Go's default", "env", EnvGOGC, "value", v)
		} else {
			debug.SetGCPercent(gc)
		}
	}
	// While nexd is away (live_restore, a re-exec) this nexlet keeps running: it stays
	// the parent of its workloads, reaps them and keeps their exit statuses. A new
	// nexd that adopted it says so (reattach): it registers again and reports.
	var again sync.WaitGroup
	defer again.Wait()
	// Start-up's garbage and free heap go back once the nexlet is quiet, as a burst's do.
	tctx, stopTrim := context.WithCancel(ctx)
	again.Go(func() { memtrim.Run(tctx, memtrim.Options{}) })
	if env(EnvKeepStartupPages) != "true" {
		again.Go(func() { coldpages.DropLogged(log) })
	}
	defer stopTrim()
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-reattach:
			log.Info("adopted by a new nexd: registering again")
			again.Go(func() {
				if err := r.Reregister(); err != nil {
					log.Error("registering again failed", "err", err)
				}
			})
		case <-detach:
			// Asked to hand over: let go of the workloads without stopping them; the
			// next nexlet adopts them from their records.
			log.Info("detaching: workloads keep running for the next nexlet")
			n.Detach()
			return r.Shutdown()
		}
	}
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	return errors.Join(n.Shutdown(sctx), r.Shutdown())
}
