// Package nexlets manages the node's local nexlets: it detects the cgroup layout,
// resolves the native nexlet and the configured agents into supervised processes, hands
// each (re)start fresh registration credentials, and reports exits to the node's agent
// registry. The daemon builds one Manager, starts it once the node API serves, and
// stops it before the node.
package nexlets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/artifact"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/dirlock"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/privfile"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/internal/sdscope"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// NativeName is the supervisor's name for the built-in native nexlet.
const NativeName = "native"

// NexletOOMScoreAdj is the nexlets' oom_score_adj: under memory pressure the kernel
// kills a workload before the nexlet that watches all of them.
const NexletOOMScoreAdj = -500

// Registry is the part of the node that tracks nexlet registrations (*node.Node).
type Registry interface {
	// ExpectAgent reserves name and names (registration names known before the
	// nexlet registers, Spec.Names) for agentID.
	ExpectAgent(agentID, name string, names ...string)
	SetAgentKey(agentID, pub string)
	RemoveAgent(agentID, reason string)
	SetAgentProcessInfo(agentID string, restarts int, lastExit string, failed bool)
	// SetAgentLocal gives the channel to the start of agentID registering with key
	// (nil: that start ended).
	SetAgentLocal(agentID, key string, c *localchan.Client)
	// SetAdoptedLocal gives the channel an adopted nexlet agentID opened on nexd's
	// socket, for a registration on it signed with key (its start's).
	SetAdoptedLocal(agentID, key string, c *localchan.Client)
}

// Minter mints the registration credentials a nexlet starts with.
type Minter interface {
	MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error)
}

// Options are a Manager's dependencies, all required except the hooks, and except
// Registry and NC for a Manager that starts the native nexlet early (StartEarly): it
// gets the registry from Attach, and has no nats:// agents to fetch (NeedsNATS).
type Options struct {
	Config   *config.Config
	NodeID   string
	Registry Registry
	Minter   Minter
	NC       *nats.Conn // fetches nats:// agent binaries
	// RuntimeDir holds fetched nexlet binaries and the native nexlet's workload dirs.
	RuntimeDir string
	// RemoveRuntimeDir: RuntimeDir is a temp dir nexd chose for itself (no runtime_dir,
	// no state_dir), removed by a Stop that leaves nothing running. Left there, every
	// ephemeral node left a /tmp/nexd-<node id> behind (a new one each start).
	RemoveRuntimeDir bool
	Logger           *slog.Logger
	// Cgroups, when set, is used instead of detecting the cgroup layout (and moving
	// nexd into its supervisor cgroup): for tests that run a node in-process.
	Cgroups *cgroup.Manager
	// CgroupLockFD is the detected root's lock that a re-executing nexd kept open
	// across its execve (0: none), taken back instead of taken anew.
	CgroupLockFD int
	// KeepCgroupLock, when set, is called by Stop with the root's lock just before it
	// lets go (a re-exec keeps it across the execve: dirlock.Lock.KeepAcrossExec).
	KeepCgroupLock func(*dirlock.Lock)
	// Handed are the records of nexlets a re-executing nexd handed over in memory
	// (nil: read them from the state directory).
	Handed []supervise.Record
	// OnExit is called after every nexlet exit (metrics); OnFailed when one is given up.
	OnExit   func(name string, oom bool)
	OnFailed func(name string)
	// OnSocketRefused is called for each connection refused on the adopted nexlets'
	// socket (metrics).
	OnSocketRefused func()
	// DefaultGOGC is the native nexlet's $GOGC while go_gc_percent is 0 (nexd's own
	// default, or its $GOGC); empty: Go's.
	DefaultGOGC string
	// ProfileEnv is added to the native nexlet's environment (profdump.PassOn).
	ProfileEnv map[string]string
	// SystemdUIDDir, when set, is the native nexlet's systemd dynamic uid lock
	// directory (native.EnvSystemdUIDDir: nexd's own $NEX_NATIVE_SYSTEMD_UID_DIR,
	// passed on; tests keep their locks out of the host's /run/systemd/dynamic-uid).
	SystemdUIDDir string
	// TestHold, when set (e2e fault tests only), is passed on to the native nexlet
	// (testhold.Env).
	TestHold string
	// Prestarted, if set, is the native nexlet's process nexd started at its main
	// (NativeCommand, supervise.Prestart): its first start takes it.
	Prestarted *supervise.Prestarted
	// RegisterOverNATS: the native nexlet registers across the NATS server even with
	// a local channel (NEXD_LOCAL_REGISTER=off: nexbench's ready A/B, and e2e's
	// TestStolenNexletUser, which sniffs the registration reply on NATS).
	RegisterOverNATS bool
}

// Spec is one local nexlet: what to run and the agent id it registers with.
type Spec struct {
	Name    string
	AgentID string
	Process supervise.Spec
	// Unsigned: the nexlet cannot sign its registration (upstream's SDK), so it gets
	// no per-start key and the node accepts it by its agent id alone.
	Unsigned bool
	// Names are the names it registers under as far as nexd knows before it does: the
	// native nexlet's, and those it registered under in earlier runs (RecordName).
	// The node reserves them for it from the start, so no other nexlet takes one first.
	Names []string
}

// Manager runs the local nexlets.
type Manager struct {
	o     Options
	log   *slog.Logger
	cg    *cgroup.Manager
	specs []Spec // in start order; fixed after New
	sup   *supervise.Supervisor
	// unlock releases the hold on the cgroup root (nil when the root came from Options).
	unlock func()
	// adoptKeys are the registration keys of nexlets left running by the previous
	// nexd, by name: they register again, signed with the key of their start.
	adoptKeys map[string]string
	recordDir string

	mu      sync.Mutex
	lastKey map[string]string // registration public key of each nexlet's newest start
	// locals are the node's ends of the channels to the native nexlets' current
	// starts, by name: the pair of one this nexd spawned, the socket connection of
	// one it adopted (adoptsock.go).
	locals map[string]*localchan.Client
	reg    Registry // nil until Attach when started early
	// keep: Stop leaves processes under the cgroup root (Detach), so the root stays
	// too. leave: Stop leaves the workloads' cgroups alone (LeaveWorkloads); the root
	// goes only when nothing runs below it.
	keep, leave bool
	// announced: the registry knows every nexlet (Attach, else Start).
	announced bool
	// named: the supervised nexlets RecordName kept a name for in this run.
	named map[string]bool
	// early holds the first start's result of each nexlet StartEarly started; Start
	// waits for it. earlyWG owns the goroutines that wait for them, and the one making
	// the uid lock socket (locksMade).
	early   map[string]chan error
	earlyWG sync.WaitGroup
	// adopted are the processes of the nexlets left running by the previous nexd,
	// by name, until they end: the only peers admitted on sock (adoptsock.go), whose
	// goroutine sockWG owns.
	adopted map[string]procid.ID
	sock    *net.UnixListener
	sockWG  sync.WaitGroup
	// locks keeps copies of the native nexlets' systemd uid locks (uidlocks.go); nil
	// until listenUIDLocks, or without a socket.
	locks *uidKeeper
	// locksMade is closed once StartEarly's listenUIDLocks, which runs beside the
	// native nexlet's early start (its cgroups and FIFOs), returned: env waits for it
	// before it names the socket. nil without StartEarly (Start listens inline).
	locksMade chan struct{}
}

// New detects cgroups (moving nexd into its supervisor cgroup), resolves every nexlet
// (fetching nats:// binaries) and builds the supervisor. Nothing runs until Start.
func New(ctx context.Context, o Options) (_ *Manager, err error) {
	cfg := o.Config
	m := &Manager{o: o, log: o.Logger, cg: o.Cgroups, reg: o.Registry, early: map[string]chan error{},
		locals: map[string]*localchan.Client{}, adopted: map[string]procid.ID{}}
	if m.cg == nil {
		// A detected root is this node's own (nexd/<node id> on v1), and whichever root
		// is used is held for the node's lifetime: start-up cleans up only what is
		// under a root it holds, so two nodes on a host never kill each other's work.
		cg, derr := cgroup.DetectFor(cfg.Node.CgroupRoot, o.NodeID, m.log)
		if derr != nil {
			return nil, fmt.Errorf("cgroups: %w", derr)
		}
		lock, lerr := cg.Lock(o.CgroupLockFD)
		if lerr != nil {
			return nil, fmt.Errorf("cgroups: %w", lerr)
		}
		m.unlock = func() {
			if o.KeepCgroupLock != nil {
				o.KeepCgroupLock(lock)
			}
			lock.Release()
		}
		detected := cg
		defer func() {
			if err == nil {
				return
			}
			// A start that fails here (a nexlet binary that cannot be had) leaves
			// no empty root of its own (detection made it) behind; one with a
			// process below it (an earlier nexd's, live_restore) is never removed.
			if rerr := detected.RemoveOwnRoot(); rerr != nil {
				m.log.Info("the node's cgroup root stays", "cgroup", detected.Path(), "reason", rerr.Error())
			}
			lock.Release()
		}()
		if cfg.Node.CgroupDriver == native.DriverSystemd && cg.Mode() == cgroup.ModeV2 {
			// Workloads get their limits from systemd, in scopes outside nexd.service.
			// Controllers enabled in the unit's cgroup would make the kernel refuse
			// the next nexd there while a nexlet of this one still runs (it outlives a
			// kill -9): systemd 252 would fail every restart with 219/CGROUP.
			cg.WithoutControllers("cgroup_driver systemd: workloads are limited in their scopes; nexlet limits are not enforced (no controllers in nexd.service, so that systemd can always start the next nexd)")
		}
		// On v2 the pre-started nexlet's cgroup warm-up (begun at nexd's package init)
		// may still write its pid into the root it read: EnterSupervisor waits for it
		// before it empties the root, or that late write would put the nexlet back and
		// the enabling of the controllers fail (docs/performance-notes.md, Ready). By now it is normally over:
		// its write began tens of milliseconds ago, and the kernel would hold this
		// first cgroup change behind it anyway (cgroup_mutex).
		if err := cg.EnterSupervisor(ctx, o.Prestarted.AwaitWarm); err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("cgroups: %w", err)
			}
			m.log.Warn("could not move nexd into its supervisor cgroup; running nexlets without limits", "err", err)
			cg = cgroup.Disabled("entering the supervisor cgroup failed: "+err.Error(), m.log)
		}
		m.cg = cg
	}
	cg := m.cg
	m.log.Info("cgroups", "mode", string(cg.Mode()), "root", cg.Path(), "enforced", strings.Join(cg.Enforced(), ","), "reason", cg.Reason())

	if m.specs, err = m.resolve(ctx, cfg); err != nil {
		return nil, err
	}
	// The native nexlet outlives nexd (live_restore, re-exec): one the previous nexd
	// left running keeps its agent id and registration key and is adopted, not started
	// a second time.
	recordDir := filepath.Join(o.RuntimeDir, "supervise")
	if cfg.Node.StateDir != "" {
		recordDir = filepath.Join(cfg.Node.StateDir, "nexlets")
	}
	m.adoptKeys, m.lastKey, m.recordDir = map[string]string{}, map[string]string{}, recordDir
	for i, sp := range m.specs {
		for _, name := range readNames(recordDir, sp.Name, m.log) {
			// Another's own name now (the configuration changed) is that one's: the node
			// binds a name to the first nexlet announced with it.
			if !slices.ContainsFunc(m.specs, func(o Spec) bool { return o.Name == name && o.Name != sp.Name }) {
				m.specs[i].Names = append(m.specs[i].Names, name)
			}
		}
	}
	var handed map[string]supervise.Record
	if o.Handed != nil {
		handed = map[string]supervise.Record{}
		for _, r := range o.Handed {
			handed[r.Name] = r
		}
	}
	var adopt []string
	for i, sp := range m.specs {
		if !sp.Process.Outlive {
			continue
		}
		adopt = append(adopt, sp.Name)
		rec, ok := supervise.ReadRecord(recordDir, sp.Name)
		if r, handed := handed[sp.Name]; handed {
			rec, ok = r, r.PID > 1 && r.ID().Alive()
		} else if other := rec.Meta["node_id"]; ok && other != "" && other != o.NodeID {
			m.endForeign(rec, other)
			ok = false
		}
		// A record without the digest (an older nexd's) counts as another policy: the
		// nexlet's environment cannot tell it (a pre-started one got its policy over the
		// hand-off pair, not in /proc/<pid>/environ), and adopted, it would be adopted
		// unchecked at every later restart too.
		if was := rec.Meta[metaWorkloadPolicy]; ok && isNative(sp.Name) && was != workloadPolicy(cfg, sp) {
			m.endOtherPolicy(rec, was == "")
			ok = false
		}
		if ok && rec.Meta["agent_id"] != "" {
			m.specs[i].AgentID = rec.Meta["agent_id"]
			m.adoptKeys[sp.Name] = rec.Meta["registration_key"]
			m.adopted[sp.Name] = rec.ID()
			m.log.Info("a nexlet left running by the previous nexd will be adopted", "nexlet", sp.Name, "pid", rec.PID, "agent_id", rec.Meta["agent_id"])
		}
	}
	// Workloads live beside the nexlets, not below them: a nexlet that dies takes
	// none with it, and nexd (the child subreaper) keeps the exit status of those
	// whose nexlet is gone until the restarted nexlet adopts them.
	oomAdj := 0
	if os.Geteuid() == 0 {
		oomAdj = NexletOOMScoreAdj
	}
	m.sup = supervise.New(supervise.Options{
		Cgroups:           cg.Sub("nexlets"),
		Workloads:         cg.Sub("workloads"),
		WorkloadsLimits:   cgroup.Limits{PidsMax: WorkloadsPidsMax(cfg.Node.WorkloadsPidsMax, m.log)},
		ExitsDir:          filepath.Join(o.RuntimeDir, "exits"),
		RecordDir:         recordDir,
		FIFODir:           filepath.Join(o.RuntimeDir, "supervise"),
		Meta:              m.meta,
		Adopt:             adopt,
		Handed:            handed,
		Orphans:           func() []procid.ID { return recordedWorkloads(o.RuntimeDir, adopt) },
		NexletOOMScoreAdj: oomAdj,
		RestartLimit:      cfg.Node.AgentRestartLimit,
		Grace:             cfg.Node.StopGrace,
		Logger:            m.log,
		Env:               m.env,
		Channel:           m.channel,
		Prestarted:        o.Prestarted,
		OnExit:            m.onExit,
		OnFailed:          m.onFailed,
	})
	return m, nil
}

// NeedsNATS says whether resolving the configured nexlets needs a NATS connection
// (an agent binary fetched from an object store): such a Manager cannot be built, nor
// its native nexlet started, before nexd has connected.
func NeedsNATS(cfg *config.Config) bool {
	for _, a := range cfg.Node.Agents {
		if ref, err := artifact.Parse(a.URI); err == nil && ref.Scheme == "nats" {
			return true
		}
	}
	return false
}

// StartEarly starts the native nexlet before the node exists (Options.Registry nil),
// so that its exec, runtime start and cgroup placement overlap with nexd's own NATS
// connect and the building of the node; it registers once the node API serves (the
// nexlet retries while nothing answers). It returns at once; Start waits for the
// start's result. One left running by the previous nexd is not adopted here: it is
// running already, and registers again as soon as it is told to (Start).
func (m *Manager) StartEarly(ctx context.Context) {
	if m.Adopting() {
		return
	}
	// The uid lock socket (a directory, a bind and two chmods: 1.2 ms of a start here)
	// is made while the supervisor cleans up and makes the nexlet's cgroups and FIFOs;
	// the start's environment, which names it, waits for it (docs/performance-notes.md, Ready).
	m.locksMade = make(chan struct{})
	m.earlyWG.Go(func() {
		defer close(m.locksMade)
		m.listenUIDLocks()
	})
	for _, s := range m.specs {
		if !s.Process.Outlive {
			continue
		}
		ch := make(chan error, 1)
		m.early[s.Name] = ch
		m.earlyWG.Go(func() { ch <- m.sup.Start(ctx, s.Process) })
	}
}

// Attach gives a Manager built before the node its registry: every nexlet is
// announced, with the key of its newest start (or, for one left running by the previous
// nexd, of its start then), and what happened to one started early meanwhile. Call it
// before the node API serves, so that the early nexlet's registration finds it.
func (m *Manager) Attach(reg Registry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.reg = reg
	m.announceLocked()
	for _, st := range m.sup.Statuses() {
		s, ok := m.ByName(st.Name)
		switch {
		case !ok:
		case st.State == supervise.StateFailed:
			reg.SetAgentProcessInfo(s.AgentID, st.Restarts, "failed: "+st.LastExit, true)
		case st.Restarts > 0:
			reg.SetAgentProcessInfo(s.AgentID, st.Restarts, st.LastExit, false)
		}
	}
}

// announceLocked tells the registry of every nexlet and its registration key.
func (m *Manager) announceLocked() {
	m.announced = true
	for _, s := range m.specs {
		m.reg.ExpectAgent(s.AgentID, s.Name, s.Names...)
		key := m.lastKey[s.Name]
		if key == "" {
			// If the adoption fails after all, the new start sets a new key.
			key = m.adoptKeys[s.Name]
		}
		if key != "" {
			m.reg.SetAgentKey(s.AgentID, key)
		}
		if c := m.locals[s.Name]; c != nil {
			m.reg.SetAgentLocal(s.AgentID, m.lastKey[s.Name], c)
		}
	}
}

// registry is the node's registry, nil before Attach.
func (m *Manager) registry() Registry {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.reg
}

// Start announces every nexlet to the registry (unless Attach did) and starts its
// process; for one StartEarly started, it waits for that start's result.
func (m *Manager) Start(ctx context.Context) error {
	m.mu.Lock()
	if !m.announced {
		m.announceLocked()
	}
	m.mu.Unlock()
	m.listenAdopted() // before the supervisor tells them to register again
	m.listenUIDLocks()
	for _, s := range m.specs {
		if ch, ok := m.early[s.Name]; ok {
			var err error
			select {
			case err = <-ch:
			case <-ctx.Done():
				err = ctx.Err()
			}
			if err != nil {
				return fmt.Errorf("nexlet %s: %w", s.Name, err)
			}
			continue
		}
		if err := m.sup.Start(ctx, s.Process); err != nil {
			return fmt.Errorf("nexlet %s: %w", s.Name, err)
		}
	}
	return nil
}

// Stop stops every nexlet (SIGTERM, grace, kill) and returns when they are gone. After
// a stop that left nothing running, the node's own cgroup root (one detection made for
// it, nexd/<node id> on v1) is removed: stopped nodes leave no empty groups behind.
func (m *Manager) Stop(ctx context.Context) error {
	m.stopAdoptedSocket()
	err := m.sup.Stop(ctx)
	m.earlyWG.Wait()
	m.mu.Lock()
	locks := m.locks
	m.mu.Unlock()
	locks.stop()
	for _, s := range m.specs {
		m.closeLocal(s.Name) // those of nexlets left running (live_restore)
	}
	m.mu.Lock()
	keep, leave := m.keep, m.leave
	m.mu.Unlock()
	// Before the unlock: a second nexd of the same node id is not using the dir.
	m.removeRuntimeDir(keep, leave, err)
	if m.unlock != nil {
		if !keep && err == nil {
			// After LeaveWorkloads (a start abandoned), workloads an earlier nexd left
			// there may run on: RemoveOwnRoot then refuses (it never removes a root with
			// a process below it), which is no failure. With none, the root goes as
			// after any stop: an abandoned start (SIGTERM while NATS is down) left it.
			switch rerr := m.cg.RemoveOwnRoot(); {
			case rerr != nil && leave:
				m.log.Info("the node's cgroup root stays: an earlier nexd's workloads may run there", "cgroup", m.cg.Path(), "reason", rerr.Error())
			case rerr != nil:
				m.log.Warn("could not remove the node's cgroup root after a clean stop", "cgroup", m.cg.Path(), "err", rerr)
			}
		}
		m.unlock()
	}
	return err
}

// removeRuntimeDir removes a temp runtime dir after a stop that left nothing running:
// not with Detach (the next nexd adopts the nexlets, and their records, FIFOs and
// workload dirs are there), nor with LeaveWorkloads (an earlier nexd's workloads may
// run on), nor after a failed stop.
func (m *Manager) removeRuntimeDir(keep, leave bool, stopErr error) {
	if !m.o.RemoveRuntimeDir || keep || leave || stopErr != nil {
		return
	}
	if err := os.RemoveAll(m.o.RuntimeDir); err != nil {
		m.log.Warn("could not remove the temporary runtime directory after a clean stop", "dir", m.o.RuntimeDir, "err", err)
	}
}

// Detach makes Stop leave the workloads running for the next nexd (live_restore).
func (m *Manager) Detach() {
	m.mu.Lock()
	m.keep = true
	m.mu.Unlock()
	m.sup.Detach()
}

// LeaveWorkloads makes Stop stop the nexlets but leave the workloads' cgroups alone
// (supervise.Supervisor.LeaveWorkloads).
func (m *Manager) LeaveWorkloads() {
	m.mu.Lock()
	m.leave = true
	m.mu.Unlock()
	m.sup.LeaveWorkloads()
}

// resolve turns the native nexlet and the configured agents into specs.
func (m *Manager) resolve(ctx context.Context, cfg *config.Config) ([]Spec, error) {
	var out []Spec
	used := map[string]int{}
	name := func(base string) string {
		used[base]++
		if used[base] == 1 {
			return base
		}
		return fmt.Sprintf("%s-%d", base, used[base])
	}
	if !cfg.Node.DisableNativeStart {
		exe, args, err := NativeCommand()
		if err != nil {
			return nil, err
		}
		n := name(NativeName)
		out = append(out, Spec{Name: n, AgentID: randid.New(), Process: supervise.Spec{
			Name:   n,
			Path:   exe,
			Args:   args,
			Limits: toCgroupLimits(cfg.Node.NativeLimits),
			// It stays the parent of its workloads while nexd is away.
			Outlive: true,
		}, Names: []string{native.Name}})
	}
	var js jetstream.JetStream
	for i, a := range cfg.Node.Agents {
		ref, err := artifact.Parse(a.URI)
		if err != nil {
			return nil, fmt.Errorf("agents[%d]: %w", i, err)
		}
		if ref.Scheme == "nats" && js == nil {
			if js, err = m.jetstream(cfg); err != nil {
				return nil, fmt.Errorf("agents[%d]: %w", i, err)
			}
		}
		path, err := artifact.Resolve(ctx, ref, js, filepath.Join(m.o.RuntimeDir, "nexlets"))
		if err != nil {
			return nil, fmt.Errorf("agents[%d] (%s): %w", i, a.URI, err)
		}
		base := filepath.Base(path)
		if ref.Scheme == "nats" {
			base = strings.SplitN(ref.Object, "_", 2)[0]
		}
		n := name(sanitizeName(base))
		out = append(out, Spec{Name: n, AgentID: randid.New(), Process: supervise.Spec{
			Name:   n,
			Path:   path,
			Args:   a.Argv,
			Env:    a.Env,
			Limits: toCgroupLimits(a.Limits),
		}, Unsigned: a.UnsignedRegistration})
	}
	return out, nil
}

// RecordName keeps that the supervised nexlet registered under name, so that the next
// run reserves it for that nexlet from its start (Spec.Names): before, a name was
// reserved only once registered in the run, and another nexlet that registered under
// it first took it. The first name a run records replaces those of earlier runs: a
// nexlet that now registers under another name (its configuration changed) gives the
// old one up from the next run, where before it was reserved for it in every run
// after, refusing the nexlet that now uses it until the file was removed by hand. A
// failed write is logged; the name is then reserved for this run only.
func (m *Manager) RecordName(supervised, name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	if m.named[supervised] {
		names = readNames(m.recordDir, supervised, m.log)
	}
	if slices.Contains(names, name) {
		return
	}
	if m.named == nil {
		m.named = map[string]bool{}
	}
	m.named[supervised] = true
	err := os.MkdirAll(m.recordDir, 0o700)
	if err == nil {
		err = privfile.Write(namesPath(m.recordDir, supervised), []byte(strings.Join(append(names, name), "\n")+"\n"))
	}
	if err != nil {
		m.log.Warn("cannot keep a nexlet's registration name for the next run", "nexlet", supervised, "name", name, "err", err)
	}
}

func namesPath(dir, supervised string) string { return filepath.Join(dir, supervised+".names") }

// namesFileMax is the most a names file of this version holds: node.MaxBoundNames
// names (a run binds no more) of at most protocol.MaxNameLen bytes, a line each.
const namesFileMax = node.MaxBoundNames * (protocol.MaxNameLen + 1)

// readNames are the registration names RecordName kept for the supervised nexlet. It
// reads at most namesFileMax bytes and node.MaxBoundNames names: an older nexd bound
// neither, so a nexlet that registered under ever new names grew the file without end,
// and reading it whole at start could take any amount of nexd's memory. A larger file
// is logged as an error naming it; the names in its first namesFileMax bytes are
// reserved, and the nexlet's first registration of the run rewrites it.
func readNames(dir, supervised string, log *slog.Logger) []string {
	path := namesPath(dir, supervised)
	f, err := os.Open(path)
	if err != nil {
		return nil
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, namesFileMax+1))
	if err != nil {
		return nil
	}
	over := len(b) > namesFileMax
	if over {
		b = b[:namesFileMax]
		b = b[:bytes.LastIndexByte(b, '\n')+1] // whole lines only
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l == "" || slices.Contains(out, l) {
			continue
		}
		if len(out) == node.MaxBoundNames {
			over = true
			break
		}
		out = append(out, l)
	}
	if over {
		log.Error("nexlet names file is larger than this version writes; reserving only its first names, and the nexlet's next registration rewrites it",
			"file", path, "names", len(out), "max_names", node.MaxBoundNames, "max_bytes", namesFileMax)
	}
	return out
}

// NativeCommand is the native nexlet's executable (nexd's own) and arguments.
func NativeCommand() (path string, args []string, err error) {
	path, args, err = earlynexlet.NativeCommand()
	if err != nil {
		return "", nil, fmt.Errorf("native nexlet: find own executable: %w", err)
	}
	return path, args, nil
}

func (m *Manager) jetstream(cfg *config.Config) (jetstream.JetStream, error) {
	if cfg.NATS.JSDomain != "" {
		return jetstream.NewWithDomain(m.o.NC, cfg.NATS.JSDomain)
	}
	return jetstream.New(m.o.NC)
}

// Specs returns the local nexlets in start order.
func (m *Manager) Specs() []Spec { return append([]Spec(nil), m.specs...) }

// Names returns the local nexlets' names in start order.
func (m *Manager) Names() []string {
	names := make([]string, 0, len(m.specs))
	for _, s := range m.specs {
		names = append(names, s.Name)
	}
	return names
}

// AgentIDs returns the agent ids the local nexlets register with.
func (m *Manager) AgentIDs() []string {
	ids := make([]string, 0, len(m.specs))
	for _, s := range m.specs {
		ids = append(ids, s.AgentID)
	}
	return ids
}

// NamesOf maps agent ids of local nexlets back to their names.
func (m *Manager) NamesOf(ids []string) []string {
	var out []string
	for _, id := range ids {
		for _, s := range m.specs {
			if s.AgentID == id {
				out = append(out, s.Name)
			}
		}
	}
	return out
}

// ByName finds a local nexlet.
func (m *Manager) ByName(name string) (Spec, bool) {
	for _, s := range m.specs {
		if s.Name == name {
			return s, true
		}
	}
	return Spec{}, false
}

// Statuses reports every local nexlet's process, as the supervisor sees it.
func (m *Manager) Statuses() []supervise.Status { return m.sup.Statuses() }

// Count says how many local nexlets there are and how many of them failed.
func (m *Manager) Count() (nexlets, failed int) { return m.sup.Count() }

// Restarts is how often the named nexlet was restarted since start or its last reset.
func (m *Manager) Restarts(name string) int {
	for _, st := range m.sup.Statuses() {
		if st.Name == name {
			return st.Restarts
		}
	}
	return 0
}

// Reset clears a nexlet's restart count and starts it again if it failed; reason is
// recorded as its last exit in node info.
func (m *Manager) Reset(name string, reason string) error {
	s, ok := m.ByName(name)
	if !ok {
		return fmt.Errorf("no local nexlet %q (local nexlets: %v)", name, m.Names())
	}
	if err := m.sup.Reset(name); err != nil {
		return err
	}
	if reg := m.registry(); reg != nil {
		reg.SetAgentProcessInfo(s.AgentID, m.Restarts(name), reason, false)
	}
	return nil
}

// LeftRunning returns the records of the nexlets a stop with Detach left running, for
// the re-exec handover.
func (m *Manager) LeftRunning() []supervise.Record {
	var out []supervise.Record
	for _, sp := range m.specs {
		if sp.Process.Outlive {
			if r, ok := supervise.ReadRecord(m.recordDir, sp.Name); ok {
				out = append(out, r)
			}
		}
	}
	return out
}

// Adopting reports whether nexlets left running by the previous nexd are adopted.
func (m *Manager) Adopting() bool { return len(m.adoptKeys) > 0 }

// HandOverUnregistered replaces adopted nexlets (left running by the previous nexd)
// that did not register again among missing (names): they cannot reach this nexd's
// NATS (another port, another server). Each lets go of its workloads and exits, and a
// new one adopts them. It returns the names handed over.
func (m *Manager) HandOverUnregistered(missing []string) []string {
	var out []string
	for _, name := range missing {
		if _, adopted := m.adoptKeys[name]; !adopted {
			continue
		}
		if err := m.sup.HandOver(name); err != nil {
			m.log.Warn("cannot replace an adopted nexlet that did not register again", "nexlet", name, "err", err)
			continue
		}
		m.log.Warn("an adopted nexlet did not register again; a new one takes over its workloads", "nexlet", name)
		out = append(out, name)
	}
	return out
}

// SetRestartLimit applies a reloaded agent_restart_limit.
func (m *Manager) SetRestartLimit(n int) { m.sup.SetRestartLimit(n) }

// Cgroups is the detected cgroup layout (never nil; disabled when none is writable).
func (m *Manager) Cgroups() *cgroup.Manager { return m.cg }

// WorkloadStats reads a workload's cgroup: workloads/<id> beside the nexlets, or its
// scope with cgroup_driver systemd.
func (m *Manager) WorkloadStats(id string) (cgroup.Stats, bool) {
	if !protocol.IsToken(id) { // joined into a path below: never "..", never a slash
		return cgroup.Stats{}, false
	}
	if m.o.Config.Node.CgroupDriver == native.DriverSystemd {
		dir := sdscope.CgroupDir(id)
		if _, err := os.Stat(dir); err != nil {
			return cgroup.Stats{}, false
		}
		st, err := cgroup.OpenDir(dir, m.log).Stats()
		return st, err == nil
	}
	if g, ok := m.cg.Open("workloads/" + id); ok {
		st, err := g.Stats()
		return st, err == nil
	}
	return cgroup.Stats{}, false
}

// env is called before every (re)start of a nexlet: the configured env plus the
// NEX_AGENT_* variables with freshly minted registration credentials.
func (m *Manager) env(name string) map[string]string {
	s, ok := m.ByName(name)
	if !ok {
		return nil
	}
	creds, err := m.o.Minter.MintRegister(s.AgentID, m.o.NodeID)
	if err != nil {
		// The nexlet starts without credentials, fails to register and is restarted.
		m.log.Error("cannot mint registration credentials", "nexlet", name, "err", err)
	}
	env := map[string]string{}
	for k, v := range s.Process.Env {
		env[k] = v
	}
	for k, v := range agentEnv(creds, m.o.NodeID, s.AgentID) {
		env[k] = v
	}
	// A fresh key for every start: the nexlet signs its registration with it, so no
	// other process can register under this nexlet's name, and a dead predecessor's
	// key is worthless.
	if s.Unsigned {
		m.log.Warn("nexlet registers unsigned (unsigned_registration): its agent id is its only proof of identity", "nexlet", name)
	} else if seed, pub, err := registrationKey(); err != nil {
		m.log.Error("cannot create a registration key; the nexlet will be refused", "nexlet", name, "err", err)
	} else {
		env[protocol.EnvAgentRegistrationSeed] = seed
		m.mu.Lock()
		m.lastKey[name] = pub
		if m.reg != nil { // else Attach announces it
			m.reg.SetAgentKey(s.AgentID, pub)
		}
		m.mu.Unlock()
	}
	if isNative(name) {
		// It registers on its local channel (channel), not across the NATS server:
		// nexd's READY waits for that registration.
		if !m.o.RegisterOverNATS {
			env[localchan.EnvCalls] = localchan.CallRegister
		}
		// Its workloads' feeds come on the channel too (the node checks and publishes
		// them), and wait in the nexlet while no node takes them.
		env[localchan.EnvFeeds] = "1"
		// A later nexd that adopts it takes its channel on this socket (adoptsock.go).
		env[localchan.EnvSocket] = AdoptedSocketPath(m.o.RuntimeDir)
		if m.locksMade != nil {
			<-m.locksMade // StartEarly's, begun before this start
		}
		m.mu.Lock()
		if m.locks != nil {
			// nexd keeps copies of its systemd uid locks there (uidlocks.go).
			env[native.EnvUIDLockSocket] = UIDLockSocketPath(m.o.RuntimeDir)
		}
		m.mu.Unlock()
		if m.o.SystemdUIDDir != "" {
			env[native.EnvSystemdUIDDir] = m.o.SystemdUIDDir
		}
		env[native.EnvRuntimeDir] = filepath.Join(m.o.RuntimeDir, name) // previewed: NativePreview
		env[native.EnvUsers] = strings.Join(m.o.Config.Node.WorkloadUsers, ",")
		env[native.EnvAllowRoot] = strconv.FormatBool(m.o.Config.Node.AllowRootWorkloads)
		env[native.EnvUIDRange] = m.o.Config.Node.WorkloadUIDRange
		if d := m.o.Config.Node.StateDir; d != "" {
			env[native.EnvStateDir] = d
		}
		if d := m.sup.ExitsDir(); d != "" {
			env[native.EnvExitsDir] = d
		}
		// What a tenant may take when its request names no limit, and how large an
		// artifact the nexlet downloads: a workload cannot take the node down by default.
		n := m.o.Config.Node
		env[native.EnvDefaultMemoryMax] = strconv.FormatInt(n.WorkloadDefaults.MemoryMax, 10)
		env[native.EnvDefaultPidsMax] = strconv.FormatInt(n.WorkloadDefaults.PidsMax, 10)
		env[native.EnvArtifactMax] = strconv.FormatInt(n.ArtifactMaxSize, 10)
		if n.CgroupDriver != "" {
			env[native.EnvCgroupDriver] = n.CgroupDriver
		}
		// Unset, an agents entry's own NEX_NATIVE_MAX_WORKLOADS stays.
		if n.NativeMaxWorkloads > 0 {
			env[native.EnvMaxWorkloads] = strconv.Itoa(n.NativeMaxWorkloads)
		}
		// Nothing below nexd's level: nexd would wake to parse such a line and drop it.
		// A reload's new level goes over the local channel (SetLogLevel).
		env[native.EnvLogLevel] = lowestLevel(m.log).String()
		// The collector's percentage the nexlet sets once it is registered (its start
		// runs with Go's default, as nexd's does); the memory limit its runtime reads
		// before main.
		switch {
		case n.GoGCPercent < 0:
			env[native.EnvGOGC] = "off"
		case n.GoGCPercent > 0:
			env[native.EnvGOGC] = strconv.Itoa(n.GoGCPercent)
		case m.o.DefaultGOGC != "":
			env[native.EnvGOGC] = m.o.DefaultGOGC
		}
		if n.KeepStartupPages {
			env[native.EnvKeepStartupPages] = "true"
		}
		if n.GoMemoryLimit > 0 {
			env["GOMEMLIMIT"] = strconv.FormatInt(n.GoMemoryLimit, 10)
		}
		maps.Copy(env, m.o.ProfileEnv)
		if m.o.TestHold != "" {
			env[testhold.Env] = m.o.TestHold
		}
	}
	return env
}

// NativePreview is what the native nexlet's start will set of its directories, for a
// pre-started one (supervise's Prestarted.Preview), with runtimeDir Options.RuntimeDir
// and cfg the configuration: what env sets for it, which the nexlet checks at its
// hand-off (native.Ahead).
func NativePreview(cfg *config.Config, runtimeDir string) []string {
	env := []string{native.EnvRuntimeDir + "=" + filepath.Join(runtimeDir, NativeName)}
	if d := cfg.Node.StateDir; d != "" {
		env = append(env, native.EnvStateDir+"="+d)
	}
	return env
}

// isNative says whether the nexlet called name is a native nexlet (nexd's own binary).
func isNative(name string) bool { return name == NativeName || strings.HasPrefix(name, NativeName+"-") }

// channel makes the local channel for a start of a native nexlet (called after env,
// so the start's registration key is known): the nexlet's end for the supervisor to
// pass on; the node's end stays here and goes to the registry, to be used once a
// registration signed with that key arrives. Other nexlets get none: NATS only.
func (m *Manager) channel(name string) *os.File {
	s, ok := m.ByName(name)
	if !ok || !isNative(name) {
		return nil
	}
	m.closeLocal(name)
	nodeEnd, nexletEnd, err := localchan.Pair()
	if err != nil {
		m.log.Warn("no local channel to the nexlet; start requests go over NATS", "nexlet", name, "err", err)
		return nil
	}
	c, err := localchan.NewClient(nodeEnd)
	if err != nil {
		nexletEnd.Close()
		m.log.Warn("no local channel to the nexlet; start requests go over NATS", "nexlet", name, "err", err)
		return nil
	}
	m.mu.Lock()
	m.locals[name] = c
	if m.reg != nil { // else Attach gives it
		m.reg.SetAgentLocal(s.AgentID, m.lastKey[name], c)
	}
	m.mu.Unlock()
	return nexletEnd
}

// closeLocal closes the channel to the nexlet's last start, if any.
func (m *Manager) closeLocal(name string) {
	m.mu.Lock()
	c := m.locals[name]
	delete(m.locals, name)
	reg := m.reg
	m.mu.Unlock()
	if c == nil {
		return
	}
	if s, ok := m.ByName(name); ok && reg != nil {
		reg.SetAgentLocal(s.AgentID, "", nil)
	}
	_ = c.Close()
	if n := c.Cut(); n > 0 {
		m.log.Warn("gave up flushing the nexlet's feed batches to NATS on the channel's close; the nexlet keeps them and sends them again to the next nexd",
			"nexlet", name, "batches", n)
	}
}

// meta is what the record of an outliving nexlet keeps for the next nexd: the agent id
// it registers under and the public half of its start's registration key.
func (m *Manager) meta(name string) map[string]string {
	s, _ := m.ByName(name)
	m.mu.Lock()
	defer m.mu.Unlock()
	meta := map[string]string{"agent_id": s.AgentID, "registration_key": m.lastKey[name], "node_id": m.o.NodeID}
	if isNative(name) {
		meta[metaWorkloadPolicy] = workloadPolicy(m.o.Config, s)
	}
	return meta
}

// metaWorkloadPolicy keys a native nexlet's workloadPolicy in its record.
const metaWorkloadPolicy = "workload_policy"

// workloadPolicy digests what a native nexlet takes from the configuration at its
// start (its environment) and keeps for its life: whom workloads may run as and what
// they may take by default. A nexlet left running with another is not adopted.
func workloadPolicy(cfg *config.Config, s Spec) string {
	n := cfg.Node
	h := sha256.New()
	fmt.Fprintf(h, "users=%q root=%t uids=%q memory=%d pids=%d artifact=%d driver=%q",
		n.WorkloadUsers, n.AllowRootWorkloads, n.WorkloadUIDRange, n.WorkloadDefaults.MemoryMax,
		n.WorkloadDefaults.PidsMax, n.ArtifactMaxSize, n.CgroupDriver)
	for _, k := range slices.Sorted(maps.Keys(s.Process.Env)) {
		fmt.Fprintf(h, " %q=%q", k, s.Process.Env[k])
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// endOtherPolicy ends a native nexlet the previous nexd left running with a workload
// policy this configuration no longer has (allow_root_workloads or workload_users taken
// away, say, and nexd restarted to apply it), or with none recorded (unrecorded: an
// older nexd's record): adopted, it would go on running start requests by the old one. A new nexlet starts instead and adopts its workloads, as
// after its crash; those keep running as they were started.
func (m *Manager) endOtherPolicy(rec supervise.Record, unrecorded bool) {
	recorded := "another"
	if unrecorded {
		recorded = "none (recorded by an older nexd)"
	}
	m.log.Warn("the native nexlet left running was started with another workload policy (workload_users, allow_root_workloads, workload_uid_range, workload limits, artifact_max_size or cgroup_driver), or one not recorded; ending it so that a new one takes this configuration's",
		"nexlet", rec.Name, "pid", rec.PID, "recorded_policy", recorded)
	if err := supervise.EndRecorded(m.recordDir, rec, foreignEndWait); err != nil {
		m.log.Error("cannot end the native nexlet left with another workload policy", "nexlet", rec.Name, "pid", rec.PID, "err", err)
	}
}

// endForeign ends a nexlet left running for another node id instead of adopting it:
// a first start killed after its early nexlet started and before the new node id was
// durable leaves one, and the next nexd is another node. Adopted, it would register
// for the node that never came to be (READY waits for adoptedRegisterWait before it
// is replaced). It never ran a workload of this node. The other node's own cgroup root
// (nexd/<id> on v1), empty once the nexlet is gone, is removed; one that still holds
// processes is left and named.
func (m *Manager) endForeign(rec supervise.Record, other string) {
	m.log.Warn("a nexlet left running for another node id is not adopted; ending it", "nexlet", rec.Name,
		"pid", rec.PID, "its_node_id", other)
	if err := supervise.EndRecorded(m.recordDir, rec, foreignEndWait); err != nil {
		m.log.Warn("cannot end the nexlet left for another node id", "nexlet", rec.Name, "pid", rec.PID, "err", err)
		return
	}
	if m.o.Config.Node.CgroupRoot != "" || m.o.Cgroups != nil || !nkeys.IsValidPublicServerKey(other) {
		return // the root is this node's (configured or given), or there is none to name
	}
	cg, err := cgroup.DetectFor("", other, slog.New(slog.DiscardHandler))
	if err != nil || cg.Mode() != cgroup.ModeV1 || cg.Path() == m.cg.Path() {
		return
	}
	lock, err := cg.Lock(0)
	if err != nil {
		m.log.Warn("the cgroup root of the other node id is held; left in place", "path", cg.Path(), "err", err)
		return
	}
	defer lock.Release()
	// The killed process leaves the cgroup as it is reaped, by its parent (not nexd).
	deadline := time.Now().Add(foreignEndWait)
	for {
		err = cg.RemoveOwnRoot()
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		m.log.Warn("cannot remove the cgroup root of the other node id", "path", cg.Path(), "err", err)
		return
	}
	m.log.Info("removed the cgroup root of the other node id", "path", cg.Path())
}

// foreignEndWait bounds ending a nexlet left for another node id, and removing its root.
const foreignEndWait = 5 * time.Second

// registrationKey makes a per-start registration key.
func registrationKey() (seed, pub string, err error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return "", "", err
	}
	s, err := kp.Seed()
	if err != nil {
		return "", "", err
	}
	pub, err = kp.PublicKey()
	return string(s), pub, err
}

// agentEnv is the NEX_AGENT_* environment upstream's SDK reads.
func agentEnv(c protocol.NatsConnectionData, nodeID, agentID string) map[string]string {
	return map[string]string{
		"NEX_AGENT_NATS_SERVERS":     strings.Join(c.NatsServers, ","),
		"NEX_AGENT_NATS_USER_SEED":   c.NatsUserSeed,
		"NEX_AGENT_NATS_B64_JWT":     b64(c.NatsUserJWT),
		"NEX_AGENT_NATS_USER":        c.NatsUserName,
		"NEX_AGENT_NATS_PASSWORD":    c.NatsUserPassword,
		"NEX_AGENT_NATS_USER_NKEY":   c.NatsUserNkey,
		"NEX_AGENT_NODE_ID":          nodeID,
		"NEX_AGENT_ASSIGNED_ID":      agentID,
		protocol.EnvAgentInboxPrefix: c.InboxPrefix,
	}
}

func b64(s string) string {
	if s == "" {
		return ""
	}
	return base64.StdEncoding.EncodeToString([]byte(s))
}

// onExit drops the nexlet's registration: a restarted nexlet registers again.
func (m *Manager) onExit(name string, exit supervise.ExitInfo) {
	s, ok := m.ByName(name)
	if !ok {
		return
	}
	m.mu.Lock()
	delete(m.adopted, name) // a later start is this nexd's child, with a pair
	m.mu.Unlock()
	m.closeLocal(name)
	if m.o.OnExit != nil {
		m.o.OnExit(name, exit.OOM)
	}
	if reg := m.registry(); reg != nil { // else Attach reports it
		reg.RemoveAgent(s.AgentID, exit.Reason)
		reg.SetAgentProcessInfo(s.AgentID, m.Restarts(name), exit.Reason, false)
	}
}

// onFailed marks a given-up nexlet offline in node info.
func (m *Manager) onFailed(name string, last supervise.ExitInfo) {
	s, ok := m.ByName(name)
	if !ok {
		return
	}
	reg := m.registry()
	if reg == nil {
		return // Attach reports it; the node the hook tells does not exist yet
	}
	reg.SetAgentProcessInfo(s.AgentID, m.Restarts(name), "failed: "+last.Reason, true)
	if m.o.OnFailed != nil {
		m.o.OnFailed(name)
	}
}

// WorkloadsPidsMax is the pids limit of all workloads together that workloads_pids_max
// asks for (0 or less: none): -1 none, 0 three quarters of what the kernel allows
// (the lesser of kernel.pid_max and kernel.threads-max), so that workloads that fork
// without end leave nexd, its nexlets and the host a quarter to fork in; a
// workload's own pids_max is its start request's, which a tenant chooses.
func WorkloadsPidsMax(v int64, log *slog.Logger) int64 {
	if v != 0 {
		return max(v, 0)
	}
	lim := int64(0)
	for _, f := range []string{"/proc/sys/kernel/pid_max", "/proc/sys/kernel/threads-max"} {
		b, err := os.ReadFile(f)
		if err != nil {
			log.Warn("workloads_pids_max: cannot read the kernel's limit; workloads are not bounded together", "file", f, "err", err)
			return 0
		}
		n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil || n <= 0 {
			log.Warn("workloads_pids_max: cannot read the kernel's limit; workloads are not bounded together", "file", f, "err", fmt.Errorf("%q: not a positive number", b))
			return 0
		}
		if lim == 0 || n < lim {
			lim = n
		}
	}
	return max(lim*3/4, 1)
}

func toCgroupLimits(l config.Limits) cgroup.Limits {
	return cgroup.Limits{MemoryMax: l.MemoryMax, MemoryHigh: l.MemoryHigh, CPUMax: l.CPUMax, PidsMax: l.PidsMax}
}

func sanitizeName(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	if b.Len() == 0 {
		return "nexlet"
	}
	return b.String()
}

// recordedWorkloads lists the workload main processes that the outliving nexlets named
// recorded, each in <runtime_dir>/<nexlet>/procs/<workload id>/pid ("<pid> <start time>",
// the native nexlet's records).
func recordedWorkloads(runtimeDir string, nexlets []string) []procid.ID {
	var out []procid.ID
	for _, name := range nexlets {
		files, _ := filepath.Glob(filepath.Join(runtimeDir, name, "procs", "*", "pid"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			if id, err := procid.Parse(strings.TrimSpace(string(b))); err == nil {
				out = append(out, id)
			}
		}
	}
	return out
}

// SetLogLevel tells the native nexlets the level nexd logs at now (a reload changed
// it), over their local channels (the pair of one it started, the socket of one it
// adopted): they log nothing below it. One started later gets it in its environment;
// one adopted without a channel (an older nexlet) keeps the level it was started with.
func (m *Manager) SetLogLevel() {
	level := lowestLevel(m.log).String()
	m.mu.Lock()
	locals := maps.Clone(m.locals)
	m.mu.Unlock()
	for name, c := range locals {
		if err := c.LogLevel(level); err != nil {
			m.log.Debug("nexlet not told the new log level", "nexlet", name, "err", err)
		}
	}
}

// lowestLevel is the lowest of slog's four levels log logs at (ERROR when none).
func lowestLevel(log *slog.Logger) slog.Level {
	for _, l := range []slog.Level{slog.LevelDebug, slog.LevelInfo, slog.LevelWarn} {
		if log.Enabled(context.Background(), l) {
			return l
		}
	}
	return slog.LevelError
}
