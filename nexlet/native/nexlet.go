// Package native is the native nexlet: it runs job and service workloads as host
// processes, each in its own cgroup below the nexlet's (or its own process group where
// cgroups are unavailable), with limits, restart policies, graceful stops, sealed
// environments, secrets, object-store artifacts and replay that adopts live workloads.
package native

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/names"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/stopmemo"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/nexlet/secrets"
	"github.com/nexd-project/nexd/protocol"
)

// Registration facts, as upstream's native nexlet registers.
const (
	Name         = "go_exec"
	RegisterType = "native"
	Description  = "Runs workloads as subprocesses on the host machine"
	Version      = "0.1.0"
)

// Feed is where the nexlet publishes logs and events; *nexlet.Runner implements it.
type Feed interface {
	Logger(workloadID, namespace, stream string) io.Writer
	EmitEvent(from, typ string, v any) error
}

// Config configures a native nexlet.
type Config struct {
	// TestHold lists the crash windows an e2e fault test holds this nexlet in
	// (testhold.Env, passed on by nexd; empty but in such a test).
	TestHold string
	// RuntimeDir holds workloads/<id>, the per-workload directories (required). When
	// the nexlet runs as root and workloads under other users could not reach it (an
	// ancestor is not searchable by others), the workloads live under
	// /run/nex-workloads/<hash of RuntimeDir> instead; WorkloadsDir says where.
	RuntimeDir string
	// Users is who workloads may run as (dynamic uids by default).
	Users UserPolicy
	// Secrets resolves secret://KEY values; nil makes such values fail the start.
	Secrets secrets.Store
	// Isolation is a cgroup spec for the nexlet's subtree (NEX_AGENT_CGROUP); empty runs
	// workloads in plain process groups.
	Cgroup string
	// CgroupDriver is "cgroupfs" (or empty: Cgroup's subtree) or "systemd": a transient
	// scope per workload (NEX_NATIVE_CGROUP_DRIVER).
	CgroupDriver string
	// XKey is the nexlet's curve key; a fresh one is made when nil.
	XKey nkeys.KeyPair
	// MaxWorkloads bounds running workloads; 0 is unlimited.
	MaxWorkloads int
	Logger       *slog.Logger
	// PollInterval is how often adopted workloads are checked (default 250ms).
	PollInterval time.Duration
	// DefaultLimits apply where a start request names no memory or pids limit (zero
	// fields: none).
	DefaultLimits Limits
	// ArtifactMax caps the size of a nats:// artifact; 0 is no cap.
	ArtifactMax int64
	// ArtifactDir is where nats:// artifacts are stored, on disk (the nexlet makes it
	// 0700); default <RuntimeDir>/artifacts. nexd sets <state_dir>/nexlets/<name>/artifacts.
	ArtifactDir string
	// ExitsDir is where nexd, the child subreaper, records the exits of workloads whose
	// nexlet had died (procid.WriteExit); "" when nobody records them.
	ExitsDir string
	// UIDLockSocket is nexd's socket that keeps copies of the nexlet's systemd uid
	// locks (EnvUIDLockSocket, sdkeep.go); "": none kept.
	UIDLockSocket string
	// PoolsAfter, when not nil, holds back what is made ahead for deploys (pooled
	// uids, record directories, fork pool groups) until it is closed: Main closes it
	// once the nexlet registered, which the node's start waits for. Deploys before
	// then make their own.
	PoolsAfter <-chan struct{}

	// workloadsBase replaces /run/nex-workloads (see RuntimeDir) for a test, so that
	// no other nexlet of the host (another test binary's, an e2e node's) sweeps the
	// test's workloads directories or meets them in its own sweep.
	workloadsBase string
	// asideRoots are a test's own directories for leftover trees moved aside
	// (ownAsideRoots), in place of the host's shared directories, for the same reason.
	asideRoots asideRoots
}

// Nexlet implements nexlet.Agent.
type Nexlet struct {
	cfg     Config
	log     *slog.Logger
	xkp     nkeys.KeyPair
	xpub    string
	iso     isolation
	users   *users
	spawn   *spawner
	wdir    string   // where workloads/<id> live
	whold   *os.File // wdir's shared lock when it is in /run/nex-workloads, else nil (wdirs.go)
	started time.Time
	feed    Feed
	digests digestCache
	arts    *artifactStore
	watch   *watcher    // every workload's output and exit
	records *recordPool // record directories made ahead

	abandon  chan struct{}  // closed to let go of workloads without stopping them (tests)
	bg       sync.WaitGroup // what a stop leaves for after its reply (tidies, uid releases); Close waits for them
	ending   sync.WaitGroup // workload ends under way (track); Detach waits for them
	releases *releaser      // batches those releases
	starts   startGate      // starts in flight, which that later work lets go first
	oom      oomGate        // the nexlet's oom_score_adj raised while it forks a workload
	quiet    *quietGate     // holds a stop's tidy until starts and stops pause (quiet.go)
	// life ends when Shutdown begins. A stop has no context of its own (the Agent's
	// StopWorkload takes none): what only waits in a stop (a test hold) waits on this.
	life    context.Context
	endLife context.CancelFunc
	// beforeTidy, when set (tests: a slow removal), runs before a stopped workload's
	// leftovers are removed.
	beforeTidy func(id string)
	// beforeRelaunch, when set (tests: a detach at that moment), runs when a
	// workload's restart backoff is over, right before its process is launched again;
	// beforeEnd (tests: a supervisor that has not run yet) in a workload's supervisor
	// once it saw the workload's process end, before it handles the end;
	// beforeDetachedRecord (tests: a slow write) before a detached nexlet records an
	// end it reaped for the next nexlet (detachedExit); afterReap (tests: a nexlet
	// killed there) on the watcher's goroutine once it reaped a workload's process,
	// before anything else knows its exit; beforeLaunch (tests: a nexlet killed there)
	// in a start, once the workload's directory and user are made, before its launch;
	// afterRestartDue (tests: a nexlet killed there) once an end's due restart is
	// recorded, before the ended run's leftovers are killed; afterFork (tests: a nexlet
	// descheduled there, as under load) in a launch once the fork returned (the
	// workload's program runs), before anything else.
	beforeRelaunch, beforeEnd, beforeDetachedRecord, afterReap, beforeLaunch, afterRestartDue, afterFork func(id string)
	// afterBegin, when set (tests: a detach at that moment), runs once a deploy began
	// its workload's process p, before its supervisor starts.
	afterBegin func(id string, p *proc)
	// now is the wall clock the workloads' credential renewals wait by (time.Now; tests
	// step it as a host resumed from a pause sees it).
	now func() time.Time
	// killWait bounds the one wait of a run's end for its processes to be gone: its
	// kill's, a stop's for the main process after that kill and its tidy's kill
	// together (workload.killBy; killWaitDefault; tests shorten it).
	killWait time.Duration

	mu        sync.Mutex
	workloads map[string]*workload
	tidying   map[string]chan struct{} // stopped workloads whose leftovers are being removed (finish)
	// keptTidying: those of tidying stopped at nexd's or the nexlet's shutdown (a stop
	// whose workload the node keeps to start again): a replay waits for their tidy and
	// starts them, as it would once the tidy is over.
	keptTidying map[string]bool
	// recentStops remembers the workloads stopped lately (bounded), written as each leaves
	// the table, so a repeated stop is answered "already stopped at T" (StoppedBefore).
	recentStops *stopmemo.Memo
	// stopSeq numbers the stops recentStops takes (Entry.Seq): a replay answering a
	// registration made before one of them does not start its workload (StartReplayed).
	stopSeq uint64
	// memory names this nexlet's memory of the starts it took (memory.go): "" once a
	// stop at a shutdown dropped a record of one.
	memory    string
	lameduck  bool
	lameTimer *time.Timer
	// endsKept: finished workloads taken out of the table whose records stay, their
	// end not confirmed out of node state (forgetFinishedLocked), by when they ended.
	endsKept map[string]time.Time
}

// validID says whether id can name a workload's directories: 1-128 letters, digits,
// '_' or '-'.
func validID(id string) bool {
	const c = names.Alnum | names.Underscore | names.Dash
	return names.Valid(id, c, c, 128)
}

// New makes a native nexlet. Call SetFeed with the runner before the runner's Run.
func New(cfg Config) (*Nexlet, error) {
	if cfg.RuntimeDir == "" || !filepath.IsAbs(cfg.RuntimeDir) {
		return nil, fmt.Errorf("native nexlet: runtime dir %q must be an absolute path", cfg.RuntimeDir)
	}
	// Before any workload forks: what the nexlet's process inherited without
	// close-on-exec reached every workload a fork outside the v1 fork pool's own
	// tables started (TestAttackWorkloadGetsNoInheritedDescriptor). nexd marks its own
	// so before it starts a nexlet; a nexlet started otherwise (by hand, by another
	// supervisor, in a test binary) did not.
	inheritErr := earlynexlet.CloseInheritedOnExec()
	us, err := newUsers(cfg.Users, filepath.Join(filepath.Dir(filepath.Clean(cfg.RuntimeDir)), "dynamic-uid"))
	if err != nil {
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	us.asideRoots = cfg.asideRoots
	wdir, whold, err := workloadsDir(cfg.RuntimeDir, cfg.workloadsBase, us.root)
	if err != nil {
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	// A New that fails lets go of its workloads directory as Close does (removed when
	// empty and nobody else holds it), or an empty one stayed in /run/nex-workloads
	// until another nexlet's sweep (TestCgroupDriverRefused).
	built := false
	defer func() {
		if !built && whold != nil {
			removeWorkloadsDir(whold, wdir)
		}
	}()
	n := &Nexlet{cfg: cfg, log: cfg.Logger, started: time.Now().UTC(), workloads: map[string]*workload{}, tidying: map[string]chan struct{}{},
		keptTidying: map[string]bool{},
		recentStops: stopmemo.New(stopmemo.DefaultMax, stopmemo.DefaultAge),
		abandon:     make(chan struct{}), users: us, wdir: wdir, whold: whold, now: time.Now, killWait: killWaitDefault,
		quiet: newQuietGate(quietWindow, quietMax, quietBacklog)}
	n.life, n.endLife = context.WithCancel(context.Background())
	if n.log == nil {
		n.log = slog.New(slog.DiscardHandler)
	}
	if inheritErr != nil {
		n.log.Warn("descriptors the nexlet inherited may reach its workloads", "err", inheritErr)
	}
	if us.sdWarn != "" {
		n.log.Warn(us.sdWarn)
	}
	us.sd.keepAt(cfg.UIDLockSocket, n.log)
	us.log = n.log
	us.short = func() { n.quiet.hurry() } // a start short of pooled uids: the tidies go now
	n.releases = &releaser{u: us, log: n.log, wg: &n.bg, gate: &n.starts, hurry: make(chan struct{}), batch: releaseBatch}
	if n.cfg.PollInterval <= 0 {
		n.cfg.PollInterval = 250 * time.Millisecond
	}
	n.xkp = cfg.XKey
	if n.xkp == nil {
		kp, err := nkeys.CreateCurveKeys()
		if err != nil {
			return nil, fmt.Errorf("native nexlet: curve key: %w", err)
		}
		n.xkp = kp
	}
	pub, err := n.xkp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("native nexlet: curve key: %w", err)
	}
	n.xpub = pub
	if n.iso, err = n.chooseIsolation(cfg.Cgroup, cfg.CgroupDriver); err != nil {
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	adir := cfg.ArtifactDir
	if adir == "" {
		adir = filepath.Join(cfg.RuntimeDir, "artifacts")
	}
	if n.arts, err = newArtifactStore(adir, wdir); err != nil {
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	if n.watch, err = newWatcher(n.log, n.line); err != nil {
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	if n.spawn, err = newSpawner(); err != nil {
		n.watch.stop()
		return nil, fmt.Errorf("native nexlet: %w", err)
	}
	if us.root && cfg.Users.Pool > 0 {
		us.startPool(cfg.Users.Pool, wdir, whold != nil, cfg.PoolsAfter, n.log)
	}
	n.records = newRecordPool(filepath.Join(cfg.RuntimeDir, "procs"), DefaultRecordPool, cfg.ExitsDir != "", cfg.PoolsAfter, n.log)
	n.log.Info("workload users", "run_as", n.users.Describe(), "workloads_dir", n.wdir)
	n.oom.open(n.log) // before any fork: the descriptor is the nexlet's
	n.resumeStops()
	n.memory = n.loadMemory()
	built = true
	return n, nil
}

// WorkloadsDir is where the per-workload directories live.
func (n *Nexlet) WorkloadsDir() string { return n.wdir }

// RunsAs says who workloads run as ("dynamic uids 61184-65519", or the nexlet's own
// user when it is not root).
func (n *Nexlet) RunsAs() string { return n.users.Describe() }

// Close ends the nexlet's process-starting thread; call it after Shutdown. Workloads
// running without a cgroup die with it.
func (n *Nexlet) Close() {
	n.endLife()
	n.quiet.stopDeferring() // a pending tidy goes now, not at the end of its quiet wait
	n.releases.flush()      // a pending uid release goes now, not after its batch's wait
	n.bg.Wait()
	n.watch.stop()
	n.iso.close()
	n.spawn.close()
	n.oom.close()
	n.users.stopPool()
	n.users.sd.stopKeeping()
	n.users.sd.closeAll()
	n.records.stopRecordPool()
	if n.whold != nil && removeWorkloadsDir(n.whold, n.wdir) {
		n.log.Debug("workloads directory removed: nothing was left in it", "dir", n.wdir)
	}
	if si, ok := n.iso.(*scopeIsolation); ok {
		si.sd.Close()
	}
}

// Detach lets go of every workload without stopping it (the nexlet is about to exit
// and the next one adopts them).
func (n *Nexlet) Detach() {
	n.mu.Lock()
	select {
	case <-n.abandon:
	default:
		close(n.abandon)
		n.watch.detach()
	}
	if n.lameTimer != nil {
		n.lameTimer.Stop()
	}
	n.mu.Unlock()
	// An end that began before is recorded before the nexlet exits.
	n.ending.Wait()
	n.recordUnhandledEnds()
}

// SetFeed connects the nexlet to its runner's log and event feeds.
func (n *Nexlet) SetFeed(f Feed) { n.feed = f }

// XKey is the nexlet's public curve key, for sealing environments.
func (n *Nexlet) XKey() string { return n.xpub }

// IsolationMode is "cgroup" or "none".
func (n *Nexlet) IsolationMode() string { return n.iso.mode() }

// Register implements nexlet.Agent.
func (n *Nexlet) Register() (*protocol.RegisterAgentRequest, error) {
	return &protocol.RegisterAgentRequest{
		Name: Name, RegisterType: RegisterType, Description: Description, Version: Version,
		MaxWorkloads: float64(n.cfg.MaxWorkloads), PublicXKey: n.xpub, StartRequestSchema: StartRequestSchema,
		SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleJob, protocol.LifecycleService},
	}, nil
}

// Ping implements nexlet.Agent.
func (n *Nexlet) Ping() (*protocol.AgentSummary, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	state := "running"
	if n.lameduck {
		state = "lameduck"
	}
	return &protocol.AgentSummary{Name: Name, Type: RegisterType, StartTime: n.started, State: state,
		SupportedLifecycles: "job,service", Version: Version, WorkloadCount: n.activeLocked()}, nil
}

func (n *Nexlet) activeLocked() int {
	c := 0
	for _, w := range n.workloads {
		if !w.finished {
			c++
		}
	}
	return c
}

// Heartbeat implements nexlet.Agent.
func (n *Nexlet) Heartbeat() (*protocol.AgentHeartbeat, error) {
	sum, _ := n.Ping()
	n.mu.Lock()
	n.pruneLocked() // finished workloads past their retention
	nss := map[string]bool{}
	for _, w := range n.workloads {
		nss[w.ns] = true
	}
	n.mu.Unlock()
	data, err := json.Marshal(map[string]any{"namespace_count": len(nss), "register_type": RegisterType,
		"workload_count": sum.WorkloadCount, "isolation": n.iso.mode(),
		"runs_as": n.users.Describe()})
	if err != nil {
		return nil, err
	}
	return &protocol.AgentHeartbeat{Data: string(data), Summary: *sum}, nil
}

// limitAgain writes a held workload's cgroup limits again when a new nexd replays it to
// this nexlet (it adopted the nexlet): a nexd that stopped with live_restore on cgroup v2
// disabled its subtree's controllers (systemd 252 could not place the next nexd
// otherwise) and the next one enabled them again, without the workloads' limits.
func (n *Nexlet) limitAgain(w *workload) {
	sb, err := n.iso.sandbox(w.id, n.limitsOf(w))
	if err == nil {
		err = sb.readopt()
		letGo(sb) // the workload's own is w.sb
	}
	if err != nil {
		n.log.Warn("held workload: limits not applied again", "workload_id", w.id, "err", err)
	}
}

// StartWorkload implements nexlet.Agent. Every check happens before anything starts.
func (n *Nexlet) StartWorkload(id string, req *protocol.AgentStartWorkloadRequest, existing bool) (*protocol.StartWorkloadResponse, error) {
	return n.start(id, req, existing, noMark)
}

// noMark is the mark of a start that answers no registration known to the nexlet (a
// start, or a replay through StartWorkload): above every stop's number.
const noMark = math.MaxUint64

// StartReplayed implements nexlet.ReplayGuard: a replay answering a registration made
// at mark (StopsMark) starts nothing for a workload stopped at a request since.
func (n *Nexlet) StartReplayed(id string, req *protocol.AgentStartWorkloadRequest, mark uint64) (*protocol.StartWorkloadResponse, error) {
	return n.start(id, req, true, mark)
}

// StopsMark implements nexlet.ReplayGuard: RecentlyStopped and the number of the last
// stop it counts, under the lock that numbers them.
func (n *Nexlet) StopsMark() ([]string, uint64) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.recentStops.IDs(time.Now()), n.stopSeq
}

// rememberStopLocked numbers a stop and remembers it in recentStops, returning the
// stops the memory forgot. n.mu is held.
func (n *Nexlet) rememberStopLocked(id string, e stopmemo.Entry) []string {
	n.stopSeq++
	e.Seq = n.stopSeq
	return n.recentStops.Add(id, e)
}

func (n *Nexlet) start(id string, req *protocol.AgentStartWorkloadRequest, existing bool, mark uint64) (*protocol.StartWorkloadResponse, error) {
	if existing {
		n.holdReplay(id)
	}
	resp, err := n.startWorkload(id, req, existing, mark, func(protocol.Progress) {})
	if err != nil && existing && validID(id) && req.Request.Namespace != "" {
		// A replay that fails must not leave the node's state entry silent: the
		// workload is listed as failed with the reason until it is stopped.
		n.replayFailed(id, req, err)
		return &protocol.StartWorkloadResponse{ID: id, Name: req.Request.Name}, nil
	}
	return resp, err
}

// holdReplay is testhold.ReplayAfterTidy (Config.TestHold): a replay of a workload
// whose stop is recorded and under way waits until the stop ended and its tidy is over.
// Never in production.
func (n *Nexlet) holdReplay(id string) {
	if !testhold.Holds(n.cfg.TestHold, testhold.ReplayAfterTidy) {
		return
	}
	n.mu.Lock()
	w := n.workloads[id]
	stopping := w != nil && w.stopMarked
	n.mu.Unlock()
	if !stopping {
		return
	}
	n.log.Warn("test hold: the replay waits for the stop's end and tidy", "hold", testhold.ReplayAfterTidy, "workload_id", id)
	for deadline := time.Now().Add(testhold.ReplayAfterTidyMax); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		n.mu.Lock()
		_, tidying := n.tidying[id]
		over := n.workloads[id] != w && !tidying
		n.mu.Unlock()
		if over {
			break
		}
	}
	n.log.Warn("test hold: the replay goes on", "hold", testhold.ReplayAfterTidy, "workload_id", id)
}

// StartWorkloadProgress is a new start that reports how the download of a nats://
// artifact goes (nexlet.ProgressStarter).
func (n *Nexlet) StartWorkloadProgress(id string, req *protocol.AgentStartWorkloadRequest, report func(protocol.Progress)) (*protocol.StartWorkloadResponse, error) {
	return n.startWorkload(id, req, false, noMark, report)
}

// replayFailed lists a workload the node replayed but this nexlet could not start or
// adopt (for instance an environment sealed to a key it does not hold) as failed.
func (n *Nexlet) replayFailed(id string, req *protocol.AgentStartWorkloadRequest, cause error) {
	reason := "replay failed: " + cause.Error()
	if sb, err := n.iso.sandbox(id, Limits{}); err == nil {
		if procs, _ := sb.procs(); len(procs) > 0 {
			reason += fmt.Sprintf(" (its processes %v still run, unmanaged)", procs)
		}
		letGo(sb)
	}
	code := -1
	now := time.Now().UTC()
	w := &workload{id: id, ns: req.Request.Namespace, name: req.Request.Name, req: *req,
		dir: filepath.Join(n.wdir, id), state: protocol.WorkloadError, started: now, ended: now,
		finished: true, exitCode: &code, reason: reason, stop: make(chan stopRequest, 1), done: make(chan struct{})}
	close(w.done)
	n.mu.Lock()
	if _, held := n.workloads[id]; held {
		n.mu.Unlock()
		return
	}
	n.workloads[id] = w
	n.mu.Unlock()
	n.log.Error("replayed workload failed; listed as failed until stopped", "workload_id", id, "namespace", w.ns, "name", w.name, "err", cause)
}

// startWorkload starts id; existing: a replay, answering a registration made at mark
// (noMark when unknown).
func (n *Nexlet) startWorkload(id string, req *protocol.AgentStartWorkloadRequest, existing bool, mark uint64, report func(protocol.Progress)) (*protocol.StartWorkloadResponse, error) {
	st := steps.Start(n.log) // nil unless the nexlet logs at debug level
	n.starts.enter()
	n.quiet.touch()
	defer n.quiet.touch() // the window runs from the start's end (its first line follows)
	defer n.starts.leave()
	resp := &protocol.StartWorkloadResponse{ID: id, Name: req.Request.Name}
	if !validID(id) {
		return nil, nexlet.BadRequest(fmt.Errorf("workload id %q: want 1-128 letters, digits, '-' or '_'", id))
	}
	if req.Request.Namespace == "" {
		return nil, nexlet.BadRequest(errors.New("namespace is required"))
	}
	pl, err := parseStartRequest(req.Request.RunRequest, req.Request.WorkloadLifecycle)
	if err != nil {
		return nil, nexlet.BadRequest(err) // "run_request: <field>: …"
	}
	if i := argvSecret(pl.req.Argv); i >= 0 {
		if !existing {
			return nil, nexlet.BadRequest(fmt.Errorf("run_request: argv[%d] is a %s reference: a process's arguments are readable by every local user (/proc/<pid>/cmdline), so secrets are not resolved there; pass it in the environment instead (environment {\"NAME\": \"%s<key>\"}, readable by the workload's own uid only)", i, secrets.Scheme, secrets.Scheme))
		}
		// Deployed by a nexlet that still resolved it: a replay keeps what runs
		// (refused, the workload would be left unmanaged), and says so.
		n.log.Warn("replayed workload resolves a secret in its argv, which every local user can read; redeploy it with the secret in its environment",
			"workload_id", id, "namespace", req.Request.Namespace, "argv_index", i)
	}
	want, err := n.users.resolve(pl.req.User)
	if ae := (*adminUserError)(nil); errors.As(err, &ae) && existing {
		// Deployed before such users were refused: a replay keeps what runs (refused,
		// the workload would be left unmanaged), and says so.
		n.log.Warn("replayed workload runs as a user in the node's admin group, which new starts may not without allow_root_workloads; redeploy it as another user",
			"workload_id", id, "namespace", req.Request.Namespace, "user", ae.user, "group", ae.group)
		err = nil
	}
	if err != nil {
		return nil, err
	}
	env, argv, err := n.buildEnv(id, req, pl)
	if err != nil {
		return nil, err
	}
	st.Step("parse") // the run_request, its user, the environment
	n.mu.Lock()
	n.replayMeetsStopLocked(id, existing)
	kept := false
	if old := n.workloads[id]; existing && old != nil && old.keptStop && !old.finished {
		// A stop at the previous nexd's shutdown is under way (that nexd died in its
		// drain, and this one adopted the nexlet): the node kept the workload to start
		// it again, and this is that start. Before, the replay took the stopping
		// workload as held, and once its stop ended it ran nowhere while its end
		// report had the node remove it from its state (TestStopPastItsBoundAdoptedMidStop).
		kept = true
		n.mu.Unlock()
		n.quiet.hurry()
		n.starts.leave()
		<-old.done
		n.starts.enter()
		n.mu.Lock()
	}
	kept = existing && (kept || n.keptTidying[id])
	for ch := n.tidying[id]; ch != nil; ch = n.tidying[id] {
		if existing && !kept {
			// Stopped a moment ago: a replay was made before the stop's end reached
			// the node, which the tidy's WORKLOADSTOPPED tells; started again after
			// the tidy, the stopped service ran on (TestReplayDuringStopTidyStartsNothing).
			n.mu.Unlock()
			return resp, nil
		}
		// Stopped a moment ago: its cgroup, directory and record go first (and the
		// removal need not let this start go first meanwhile, nor wait for a quiet
		// moment).
		n.mu.Unlock()
		n.quiet.hurry()
		n.starts.leave()
		<-ch
		n.starts.enter()
		n.mu.Lock()
	}
	if n.lameduck && !existing {
		n.mu.Unlock()
		return nil, errors.New("the native nexlet is in lameduck mode and starts no new workloads")
	}
	if _, held := n.workloads[id]; existing && !held {
		if e, ok := n.recentStops.Get(id, protocol.SystemNamespace, time.Now()); ok && e.Seq > mark {
			// Stopped at a request after the registration this replay answers: the
			// node's state had it still (its stop under way then, the node that asked
			// killed before it removed it); the stop's end tells the node. Before, the
			// stopped workload ran again (TestReplayAfterStopTidyStartsNothing).
			n.mu.Unlock()
			n.log.Info("replay of a workload stopped after the registration it answers: not started again",
				"workload_id", id, "namespace", req.Request.Namespace, "stopped_at", e.At)
			return resp, nil
		}
	}
	if old, ok := n.workloads[id]; ok {
		if existing {
			running := !old.finished
			n.mu.Unlock()
			if running {
				n.limitAgain(old)
			}
			return resp, nil // already held (running or finished): never a second copy
		}
		if !old.finished {
			n.mu.Unlock()
			return nil, fmt.Errorf("workload %s is already running", id)
		}
		delete(n.workloads, id)
	}
	if n.cfg.MaxWorkloads > 0 && n.activeLocked() >= n.cfg.MaxWorkloads {
		n.mu.Unlock()
		return nil, fmt.Errorf("the native nexlet already runs its maximum of %d workloads", n.cfg.MaxWorkloads)
	}
	w := &workload{id: id, ns: req.Request.Namespace, name: req.Request.Name, req: *req, plan: pl, argv: argv,
		dir: filepath.Join(n.wdir, id), state: protocol.WorkloadStarting,
		started: time.Now().UTC(), stop: make(chan stopRequest, 1), done: make(chan struct{}),
		env: env, creds: req.WorkloadCreds, want: want, steps: st}
	n.workloads[id] = w
	n.mu.Unlock()

	p, adopted, err := n.begin(w, existing, report)
	if err != nil {
		n.mu.Lock()
		delete(n.workloads, id)
		n.mu.Unlock()
		close(w.done)
		return nil, err
	}
	if n.afterBegin != nil {
		n.afterBegin(id, p)
	}
	if p.due == nil {
		n.setState(w, protocol.WorkloadRunning)
	}
	if adopted && p.due == nil {
		n.log.Info("adopted live workload", "workload_id", id, "namespace", w.ns, "pid", p.pid)
	}
	n.startRenewal(w)
	w.steps = nil // a restart's launch is not timed
	go n.supervise(w, p, !adopted)
	st.Step("rest")
	st.Log(n.log, "start steps", "workload_id", id, "adopted", adopted)
	return resp, nil
}

// StartReplied reads what the workload of a new start wrote by now and forwards it
// (nexlet.StartReplier), right after the start's reply: a placement's announcement (its
// first line) then leaves on the socket pair just behind the reply, instead of waiting
// for the watcher's goroutine, which the Go scheduler runs only once one of the
// nexlet's Ps polls the netpoller (0.4 ms p50, 1.3 ms p75 after the write at load 9);
// read before the reply, as it was, its relay was on the reply's path in both
// processes.
func (n *Nexlet) StartReplied(id string) {
	n.mu.Lock()
	var outs [2]uint64
	if w := n.workloads[id]; w != nil && w.cur != nil {
		outs = w.cur.outs
	}
	n.mu.Unlock()
	n.watch.readNow(outs[:]...)
}

// buildEnv resolves secrets, opens the sealed environment and adds the NEX_* variables.
// The node's environment is never inherited.
func (n *Nexlet) buildEnv(id string, req *protocol.AgentStartWorkloadRequest, pl *plan) ([]string, []string, error) {
	ns := req.Request.Namespace
	vars := map[string]string{}
	for k, v := range pl.req.Environment {
		r, err := secrets.Resolve(n.cfg.Secrets, ns, v)
		if err != nil {
			return nil, nil, fmt.Errorf("run_request: environment %s: %w", k, err)
		}
		vars[k] = r
	}
	if e := pl.req.EncryptedEnvironment; e != nil {
		opened, err := n.openEnv(*e)
		if err != nil {
			return nil, nil, err
		}
		for k, v := range opened {
			if !envKeyRE().MatchString(k) || slices.Contains(reservedEnv, k) {
				return nil, nil, fmt.Errorf("run_request: encrypted_environment: variable %q may not be set", k)
			}
			r, err := secrets.Resolve(n.cfg.Secrets, ns, v)
			if err != nil {
				return nil, nil, fmt.Errorf("run_request: encrypted_environment %s: %w", k, err)
			}
			vars[k] = r
		}
	}
	creds := req.WorkloadCreds
	vars["NEX_WORKLOAD_NATS_SERVERS"] = strings.Join(creds.NatsServers, ",")
	vars["NEX_WORKLOAD_NATS_NKEY"] = creds.NatsUserSeed
	vars["NEX_WORKLOAD_NATS_B64_JWT"] = base64.StdEncoding.EncodeToString([]byte(creds.NatsUserJWT))
	if creds.InboxPrefix != "" {
		// For nats.CustomInboxPrefix: a scoped workload user may subscribe to no
		// other inbox.
		vars[protocol.EnvWorkloadInboxPrefix] = creds.InboxPrefix
	}
	if creds.NatsUserJWT != "" {
		vars[EnvCredsFile] = n.credsPath(id)
	}
	vars["NEX_WORKLOAD_ID"] = id
	vars["NEX_NAMESPACE"] = ns
	env := make([]string, 0, len(vars))
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		env = append(env, k+"="+vars[k])
	}
	// Only a replay gets here with a secret:// argument (see startWorkload).
	argv := make([]string, len(pl.req.Argv))
	for i, a := range pl.req.Argv {
		r, err := secrets.Resolve(n.cfg.Secrets, ns, a)
		if err != nil {
			return nil, nil, fmt.Errorf("run_request: argv[%d]: %w", i, err)
		}
		argv[i] = r
	}
	return env, argv, nil
}

func (n *Nexlet) openEnv(e protocol.EncEnv) (map[string]string, error) {
	data, err := base64.StdEncoding.DecodeString(e.Base64EncryptedEnv)
	if err != nil {
		return nil, fmt.Errorf("run_request: encrypted_environment.base64_encrypted_env: %w", err)
	}
	clear, err := n.xkp.Open(data, e.EncryptedBy)
	if err != nil {
		return nil, fmt.Errorf("run_request: encrypted_environment: cannot open it with this nexlet's xkey %s (sealed for another key, or encrypted_by is wrong): %w", n.xpub, err)
	}
	var m map[string]string
	if err := json.Unmarshal(clear, &m); err != nil {
		return nil, fmt.Errorf("run_request: encrypted_environment: the opened data is not a JSON object of strings: %w", err)
	}
	return m, nil
}

// StopWorkload implements nexlet.Agent; it returns when the workload is gone.
func (n *Nexlet) StopWorkload(id string, req *protocol.StopWorkloadRequest) error {
	_, err := n.StopWorkloadReport(id, req)
	return err
}

// StopWorkloadReport implements nexlet.StopReporter: it returns when the workload is
// gone, saying whether it exited on SIGTERM or was killed at the end of its grace. A
// workload already stopping is waited for, never reported as not found.
func (n *Nexlet) StopWorkloadReport(id string, req *protocol.StopWorkloadRequest) (string, error) {
	return n.StopWorkloadRecorded(id, req, nil)
}

// StopWorkloadRecorded implements nexlet.StopRecorder: StopWorkloadReport, calling
// recorded once the stop is in <runtime>/stops (before its SIGTERM). Not for a workload
// that had already ended (answered at once). A stop that comes while another stops it
// is told once that one's record is written (stopAndWait).
func (n *Nexlet) StopWorkloadRecorded(id string, req *protocol.StopWorkloadRequest, recorded func()) (string, error) {
	n.quiet.touch()
	n.mu.Lock()
	w := n.workloads[id]
	if w == nil || (req.Namespace != protocol.SystemNamespace && req.Namespace != w.ns) {
		n.mu.Unlock()
		return "", errors.New(protocol.ErrTextWorkloadNotFound)
	}
	if w.finished {
		delete(n.workloads, id)
		var forgot []string
		if !req.Keep { // as finish: a stop at nexd's shutdown is not one asked for
			forgot = n.rememberStopLocked(id, stopmemo.Entry{Namespace: w.ns, Type: w.req.Request.WorkloadType, How: "had already ended", At: time.Now()})
		}
		n.mu.Unlock()
		if req.Keep {
			// Its record goes and no stop is remembered: the memory of starts no
			// longer holds every start it took, as after finish's kept stop. Before,
			// it kept its name, and the node started the job again when its record
			// was never marked started (TestKeptStopOfAFinishedJobDropsTheMemory).
			n.dropMemory()
		}
		n.removeRecord(id)
		n.forgetStops(forgot)
		return "had already ended", nil
	}
	if req.Keep {
		w.keptStop = true // a replay meanwhile waits for it and starts the workload again
	}
	n.mu.Unlock()
	st := steps.Start(n.log) // nil unless the nexlet logs at debug level
	answered := make(chan struct{})
	defer close(answered)
	if !n.stopAndWait(w, stopRequest{grace: w.plan.grace, steps: st, answered: answered, record: !req.Keep, recorded: recorded}) {
		st = nil // another stop was pending: its supervisor timed that one
	}
	st.Step("wake")
	st.Log(n.log, "stop steps", "workload_id", id)
	n.mu.Lock()
	defer n.mu.Unlock()
	if w.exitCode == nil {
		// Its supervisor let it go: the nexlet detached, and the next one reports its end.
		return "", fmt.Errorf("workload %s: the nexlet handed its workloads over while it stopped; the next nexlet reports its end", id)
	}
	return stopHow(*w.exitCode, w.reason), nil
}

// stopHow says how a stopped workload ended.
func stopHow(code int, reason string) string {
	if strings.HasPrefix(reason, "killed after") {
		return reason
	}
	if reason == "" || reason == "exited" {
		return fmt.Sprintf("exited after SIGTERM (exit code %d)", code)
	}
	return fmt.Sprintf("exited after SIGTERM (exit code %d: %s)", code, reason)
}

// StoppedBefore implements nexlet.StopRecaller: a workload this nexlet stopped within
// the last hour (the last 1024), if namespace may see it.
func (n *Nexlet) StoppedBefore(id, namespace string) (time.Time, string, bool) {
	e, ok := n.recentStops.Get(id, namespace, time.Now())
	return e.At, e.How, ok
}

// stopAndWait asks w's supervisor to stop it and waits until it is gone; false if
// another stop was pending already (r then went nowhere). A stop that asks to be told
// when it is recorded (r.recorded) is told once w's stop is recorded, whichever stop's
// record that is: a stop that comes while another is pending, or while its supervisor
// already stops w (r then waits in w.stop unread), is the same stop. Before, such a
// second stop was never told, and the node answered a second concurrent `nexctl
// workload stop --no-wait` with Nexd-Stop-Unrecorded after its bound
// (e2e TestConcurrentNoWaitStopsRecordedOnce).
func (n *Nexlet) stopAndWait(w *workload, r stopRequest) bool {
	if r.recorded != nil {
		var once sync.Once
		said := r.recorded
		r.recorded = func() { once.Do(said) }
	}
	sent := true
	select {
	case w.stop <- r:
	default: // a stop is already pending
		sent = false
	}
	if r.record && r.recorded != nil {
		n.mu.Lock()
		marked := w.stopMarked
		if !marked && w.marked == nil {
			w.marked = make(chan struct{})
		}
		ch := w.marked
		n.mu.Unlock()
		if !marked {
			select {
			case <-ch:
				marked = true
			case <-w.done: // ended without a record (none could be written)
			}
		}
		if marked {
			r.recorded()
		}
	}
	<-w.done
	return sent
}

// GetWorkload implements nexlet.Agent: the start request as deployed, so an encrypted
// environment stays sealed. With targetXKey it is re-sealed for that key (a clone).
func (n *Nexlet) GetWorkload(id, targetXKey string) (*protocol.StartWorkloadRequest, error) {
	n.mu.Lock()
	w := n.workloads[id]
	n.mu.Unlock()
	if w == nil {
		return nil, errors.New(protocol.ErrTextWorkloadNotFound)
	}
	out := w.req.Request
	out.Tags = maps.Clone(out.Tags)
	if targetXKey == "" || w.plan == nil || w.plan.req.EncryptedEnvironment == nil {
		return &out, nil
	}
	rr, err := n.reseal(out.RunRequest, *w.plan.req.EncryptedEnvironment, targetXKey)
	if err != nil {
		// Upstream ignores the target; so do we when it is unusable. Still sealed.
		n.log.Warn("clone: environment not re-sealed for the target", "workload_id", id, "err", err)
		return &out, nil
	}
	out.RunRequest = rr
	return &out, nil
}

func (n *Nexlet) reseal(runRequest string, e protocol.EncEnv, target string) (string, error) {
	if !nkeys.IsValidPublicCurveKey(target) {
		return "", fmt.Errorf("target xkey %q is not a public curve key", target)
	}
	data, err := base64.StdEncoding.DecodeString(e.Base64EncryptedEnv)
	if err != nil {
		return "", fmt.Errorf("reseal: %w", err)
	}
	clear, err := n.xkp.Open(data, e.EncryptedBy)
	if err != nil {
		return "", fmt.Errorf("reseal: %w", err)
	}
	sealed, err := n.xkp.Seal(clear, target)
	if err != nil {
		return "", fmt.Errorf("reseal for %s: %w", target, err)
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal([]byte(runRequest), &m); err != nil {
		return "", fmt.Errorf("reseal: %w", err)
	}
	m["encrypted_environment"], _ = json.Marshal(protocol.EncEnv{
		Base64EncryptedEnv: base64.StdEncoding.EncodeToString(sealed), EncryptedBy: n.xpub})
	b, err := json.Marshal(m)
	return string(b), err
}

// QueryWorkloads implements nexlet.Agent.
func (n *Nexlet) QueryWorkloads(namespace string, filter []string) ([]protocol.WorkloadSummary, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := []protocol.WorkloadSummary{}
	for _, id := range slices.Sorted(maps.Keys(n.workloads)) {
		w := n.workloads[id]
		if namespace != protocol.SystemNamespace && namespace != w.ns {
			continue
		}
		if len(filter) > 0 && !slices.Contains(filter, w.id) && !slices.Contains(filter, w.name) {
			continue
		}
		ns := w.ns
		md := map[string]string{"isolation": n.iso.mode(), "restarts": strconv.Itoa(w.restarts)}
		if !w.finished && w.ident.name != "" {
			md["uid"] = strconv.FormatUint(uint64(w.ident.uid), 10)
			md["user"] = w.ident.name
		}
		if w.pid > 0 && !w.finished {
			md["pid"] = strconv.Itoa(w.pid)
		}
		if w.sha256 != "" {
			md["sha256"] = w.sha256
		}
		if w.exitCode != nil {
			md["exit_code"] = strconv.Itoa(*w.exitCode)
		}
		if w.reason != "" {
			md["reason"] = w.reason
		}
		if w.restarts > 0 {
			md["restarts"] = strconv.Itoa(w.restarts)
		}
		runtime := "--"
		if !w.finished {
			runtime = time.Since(w.started).Round(time.Second).String()
		}
		out = append(out, protocol.WorkloadSummary{ID: w.id, Name: w.name, Namespace: &ns, Runtime: runtime,
			StartTime: w.started.Format(time.RFC3339), Tags: maps.Clone(w.req.Request.Tags),
			WorkloadLifecycle: string(w.req.Request.WorkloadLifecycle), WorkloadState: w.state,
			WorkloadType: w.req.Request.WorkloadType, Metadata: md})
		if out[len(out)-1].Tags == nil {
			out[len(out)-1].Tags = map[string]string{}
		}
	}
	return out, nil
}

// SetLameduck implements nexlet.Agent: workloads keep running until before has elapsed,
// then each is stopped with its grace. No new workload starts meanwhile.
func (n *Nexlet) SetLameduck(before time.Duration) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.lameduck {
		return nil
	}
	n.lameduck = true
	n.quiet.stopDeferring() // its drain waits for the tidies (stopAll)
	n.log.Info("lameduck: stopping workloads after delay", "delay", before)
	n.lameTimer = time.AfterFunc(before, func() { n.stopAll(true) })
	return nil
}

// stopAll stops every workload; record: the stops are recorded as asked for (a lame
// duck drain, after which the node removes them from its state; not a shutdown's, whose
// workloads start again), as the node's own drain stops, which find one of these
// pending and wait for it instead.
func (n *Nexlet) stopAll(record bool) {
	n.mu.Lock()
	var ws []*workload
	for _, w := range n.workloads {
		if !w.finished {
			ws = append(ws, w)
		}
	}
	n.mu.Unlock()
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Go(func() { n.stopAndWait(w, stopRequest{grace: w.plan.grace, record: record}) })
	}
	wg.Wait()
	n.waitTidied()  // nexd removes the workloads' cgroup root once they are all gone
	n.watch.flush() // their last lines go out while the feed is still connected
}

// Shutdown stops every workload with its grace (the node is shutting down).
func (n *Nexlet) Shutdown(ctx context.Context) error {
	n.endLife()
	n.mu.Lock()
	n.lameduck = true
	if n.lameTimer != nil {
		n.lameTimer.Stop()
	}
	n.mu.Unlock()
	n.quiet.stopDeferring()
	done := make(chan struct{})
	go func() { n.stopAll(false); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("native nexlet shutdown: %w", ctx.Err())
	}
}

func (n *Nexlet) emit(from, typ string, v any) {
	if n.feed == nil {
		return
	}
	if err := n.feed.EmitEvent(from, typ, v); err != nil {
		n.log.Warn("event not published", "type", typ, "err", err)
	}
}

func (n *Nexlet) setState(w *workload, s protocol.WorkloadState) {
	n.mu.Lock()
	w.state = s
	n.mu.Unlock()
}

// ReplayDone implements nexlet.ReplayAware. Directories and records of earlier
// workloads the node did not replay are removed when nothing runs in them any more. A
// workload still alive there is left running and reported: the node may have failed to
// read its state, and killing on such a failure would lose work (stop it with `nexctl`
// after a replay, or kill its cgroup by hand).
func (n *Nexlet) ReplayDone(ids []string) {
	seen := map[string]bool{}
	for _, dir := range []string{n.wdir, filepath.Join(n.cfg.RuntimeDir, "procs")} {
		ents, err := os.ReadDir(dir)
		if err != nil {
			continue
		}
		for _, e := range ents {
			id := e.Name()
			if !e.IsDir() || !validID(id) || slices.Contains(ids, id) || seen[id] {
				continue
			}
			seen[id] = true
			n.forgetLeftover(id)
		}
	}
}

func (n *Nexlet) forgetLeftover(id string) {
	n.mu.Lock()
	_, held := n.workloads[id]
	_, tidying := n.tidying[id] // stopped: its own tidy removes it
	n.mu.Unlock()
	if held || tidying {
		return
	}
	sb, err := n.iso.sandbox(id, Limits{})
	if err != nil {
		n.log.Warn("unreplayed workload: sandbox", "workload_id", id, "err", err)
		return
	}
	defer letGo(sb) // left running, or tidied below
	if procs, _ := sb.procs(); len(procs) > 0 {
		n.log.Warn("a workload the node did not replay is still running; leaving it alone", "workload_id", id, "pids", procs)
		return
	}
	n.mu.Lock()
	_, held = n.workloads[id] // a start may have raced us
	_, tidying = n.tidying[id]
	held = held || tidying
	n.mu.Unlock()
	if !held {
		dir := filepath.Join(n.wdir, id)
		prev, _ := readIdent(dir)
		n.cleanup(&workload{id: id, sb: sb, dir: dir, ident: prev}, nil, false)
		n.removeRecord(id)
	}
}
