package nexlets

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// registry records what the manager tells the node.
type registry struct {
	mu       sync.Mutex
	expected map[string]string   // agent id -> name
	names    map[string][]string // agent id -> names reserved for it besides
	keys     map[string]string   // agent id -> registration public key
	removed  []string
	failed   []string
	adopted  map[string]string // agent id -> key of the adopted nexlet's socket connection
}

func newRegistry() *registry {
	return &registry{expected: map[string]string{}, names: map[string][]string{}, keys: map[string]string{}, adopted: map[string]string{}}
}

func (r *registry) adoptedLocal(id string) string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.adopted[id]
}

func (r *registry) ExpectAgent(id, name string, names ...string) {
	r.mu.Lock()
	r.expected[id] = name
	r.names[id] = names
	r.mu.Unlock()
}
func (r *registry) RemoveAgent(id, _ string) {
	r.mu.Lock()
	r.removed = append(r.removed, id)
	r.mu.Unlock()
}
func (r *registry) SetAgentKey(id, pub string)                      { r.mu.Lock(); r.keys[id] = pub; r.mu.Unlock() }
func (r *registry) SetAgentLocal(string, string, *localchan.Client) {}
func (r *registry) SetAdoptedLocal(id, key string, _ *localchan.Client) {
	r.mu.Lock()
	r.adopted[id] = key
	r.mu.Unlock()
}
func (r *registry) SetAgentProcessInfo(id string, _ int, _ string, failed bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if failed {
		r.failed = append(r.failed, id)
	}
}

type minter struct{}

func (minter) MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error) {
	return protocol.NatsConnectionData{NatsServers: []string{"nats://127.0.0.1:1"}, NatsUserName: "reg-" + agentID}, nil
}

// TestManagerStartsNexletsWithTheirEnvironment runs two copies of a real nexlet
// program that records its environment and exits: each gets a unique name, its own
// agent id, fresh registration credentials and key, and its configured variables; its
// exit reaches the registry and the hooks, and with no restarts allowed it is failed.
func TestManagerStartsNexletsWithTheirEnvironment(t *testing.T) {
	dir := t.TempDir()
	prog := testkit.WriteExecutable(t, filepath.Join(dir, "rec.nexlet"), "#!/bin/sh\nenv > \"$OUT_DIR/$NEX_AGENT_ASSIGNED_ID\"\nexit 3\n")
	cfg := &config.Config{Node: config.NodeConfig{DisableNativeStart: true, StopGrace: time.Second,
		Agents: []config.Agent{{URI: prog, Env: map[string]string{"OUT_DIR": dir, "MODE": "first"}},
			{URI: prog, Env: map[string]string{"OUT_DIR": dir}}}}}
	reg := &registry{expected: map[string]string{}, names: map[string][]string{}, keys: map[string]string{}}
	log := slog.New(slog.DiscardHandler)
	var mu sync.Mutex
	var exits, fails []string
	m, err := New(context.Background(), Options{Config: cfg, NodeID: "NODE1", Registry: reg, Minter: minter{},
		RuntimeDir: filepath.Join(dir, "run"), Logger: log, Cgroups: cgroup.Disabled("test", log),
		OnExit:   func(name string, _ bool) { mu.Lock(); exits = append(exits, name); mu.Unlock() },
		OnFailed: func(name string) { mu.Lock(); fails = append(fails, name); mu.Unlock() },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	if got := m.Names(); !slices.Equal(got, []string{"rec_nexlet", "rec_nexlet-2"}) {
		t.Fatalf("names %q, want the program's name made safe, then numbered", got)
	}
	if err := m.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	testkit.Eventually(t, "both nexlets failed", func() bool { mu.Lock(); defer mu.Unlock(); return len(fails) == 2 })

	reg.mu.Lock()
	defer reg.mu.Unlock()
	for i, s := range m.Specs() {
		if reg.expected[s.AgentID] != s.Name {
			t.Errorf("%s not announced to the registry: %v", s.Name, reg.expected)
		}
		b, err := os.ReadFile(filepath.Join(dir, s.AgentID))
		if err != nil {
			t.Fatalf("%s did not record its environment: %v", s.Name, err)
		}
		env := map[string]string{}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, "="); ok {
				env[k] = v
			}
		}
		if env["NEX_AGENT_NODE_ID"] != "NODE1" || env["NEX_AGENT_NATS_USER"] != "reg-"+s.AgentID ||
			env["NEX_AGENT_NATS_SERVERS"] != "nats://127.0.0.1:1" {
			t.Errorf("%s environment lacks its identity or credentials: %v", s.Name, env)
		}
		kp, err := nkeys.FromSeed([]byte(env[protocol.EnvAgentRegistrationSeed]))
		if err != nil {
			t.Fatalf("%s registration seed: %v", s.Name, err)
		}
		if pub, _ := kp.PublicKey(); reg.keys[s.AgentID] != pub {
			t.Errorf("%s: the registry holds key %q, the nexlet got %q", s.Name, reg.keys[s.AgentID], pub)
		}
		if want := map[int]string{0: "first", 1: ""}[i]; env["MODE"] != want {
			t.Errorf("%s MODE=%q, want %q", s.Name, env["MODE"], want)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if len(reg.removed) != 2 || len(reg.failed) != 2 || len(exits) != 2 {
		t.Errorf("exits not reported: removed %v, failed %v, OnExit %v", reg.removed, reg.failed, exits)
	}
}

// attachedRun is a manager of agents (and the native nexlet) on dir's state directory,
// not started, attached to a registry that records what it is told: one run of nexd.
func attachedRun(t *testing.T, dir string, agents ...config.Agent) (*Manager, *registry) {
	t.Helper()
	return attachedRunLog(t, dir, slog.New(slog.DiscardHandler), agents...)
}

// attachedRunLog is attachedRun logging to log.
func attachedRunLog(t *testing.T, dir string, log *slog.Logger, agents ...config.Agent) (*Manager, *registry) {
	t.Helper()
	cfg := &config.Config{Node: config.NodeConfig{StateDir: filepath.Join(dir, "state"), StopGrace: time.Second,
		Agents: agents}}
	reg := &registry{expected: map[string]string{}, names: map[string][]string{}, keys: map[string]string{}}
	m, err := New(context.Background(), Options{Config: cfg, NodeID: "NODE1", Minter: minter{},
		RuntimeDir: filepath.Join(dir, "run"), Logger: log, Cgroups: cgroup.Disabled("test", log)})
	if err != nil {
		t.Fatal(err)
	}
	m.Attach(reg)
	return m, reg
}

// TestRecordedNamesReservedNextRun: a name a supervised nexlet registered under
// (RecordName, from the node's OnNameBound) is announced with it in the next run,
// before it registers, and the native nexlet's registration name always is: the node
// reserves them from the start (daemon/node TestRogueNexletSquatsNameAtStart).
func TestRecordedNamesReservedNextRun(t *testing.T) {
	dir := t.TempDir()
	prog := testkit.WriteExecutable(t, filepath.Join(dir, "wasm"), "#!/bin/sh\nexec sleep 600\n")
	run := func() (*Manager, *registry) { return attachedRun(t, dir, config.Agent{URI: prog}) }
	m, _ := run()
	m.RecordName("wasm", "wasmtime")
	m.RecordName("wasm", "wasmtime") // kept once
	if err := m.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	m, _ = run()
	// This run registers under another name (its configuration changed): the one
	// before is no longer reserved from the next run on. Before, it stayed reserved
	// for it in every run, refusing the nexlet that now registers under it.
	m.RecordName("wasm", "wasmtime2")
	m.RecordName("wasm", "wasmtime3") // a second name in the same run is kept too
	if err := m.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	m, reg := run()
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	want := map[string][]string{NativeName: {native.Name}, "wasm": {"wasmtime2", "wasmtime3"}}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, s := range m.Specs() {
		if !slices.Equal(s.Names, want[s.Name]) || !slices.Equal(reg.names[s.AgentID], want[s.Name]) {
			t.Errorf("%s: spec names %q, announced %q; want %q", s.Name, s.Names, reg.names[s.AgentID], want[s.Name])
		}
	}
}

// TestKeptNameOfAnotherIsNoSupervisedName: a name nexlet x registered under in an
// earlier run is the name another nexlet is now supervised as (the configuration
// changed: x registered as "echo", and a nexlet echo was added). It is not announced
// as x's: the node binds a name to the first nexlet announced with it, and x, announced
// first, held echo's own name, so echo's registration was refused (403 reserved for
// supervised nexlet "x") for the whole run, until x's registration under another name
// rewrote its record for the next.
func TestKeptNameOfAnotherIsNoSupervisedName(t *testing.T) {
	dir := t.TempDir()
	x := testkit.WriteExecutable(t, filepath.Join(dir, "x"), "#!/bin/sh\nexec sleep 600\n")
	echo := testkit.WriteExecutable(t, filepath.Join(dir, "echo"), "#!/bin/sh\nexec sleep 600\n")
	m, _ := attachedRun(t, dir, config.Agent{URI: x})
	m.RecordName("x", "echo")
	m.RecordName("x", "xtra")
	if err := m.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}
	m, reg := attachedRun(t, dir, config.Agent{URI: x}, config.Agent{URI: echo})
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	want := map[string][]string{NativeName: {native.Name}, "x": {"xtra"}, "echo": nil}
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, s := range m.Specs() {
		if !slices.Equal(s.Names, want[s.Name]) || !slices.Equal(reg.names[s.AgentID], want[s.Name]) {
			t.Errorf("%s: spec names %q, announced %q; want %q", s.Name, s.Names, reg.names[s.AgentID], want[s.Name])
		}
	}
}

// TestOversizedNamesFileReadBounded: a names file an older nexd grew without bound (a
// nexlet that registered under ever new names; here 64 MiB: 20 names, then one
// repeated) is read at start only as far as this version writes (node.MaxBoundNames
// names of protocol.MaxNameLen bytes, 1,040 bytes): its first 16 names are reserved and
// an error names the file; the start allocated 25 KiB. Before, it was read whole: 172
// MiB allocated (the file, its string, its lines), all 21 names reserved, nothing
// logged. A file as large as this version writes is read whole, silently.
func TestOversizedNamesFileReadBounded(t *testing.T) {
	dir := t.TempDir()
	prog := testkit.WriteExecutable(t, filepath.Join(dir, "wasm"), "#!/bin/sh\nexec sleep 600\n")
	file := filepath.Join(dir, "state", "nexlets", "wasm.names")
	if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
		t.Fatal(err)
	}
	var first []string
	var b strings.Builder
	for i := range 20 {
		first = append(first, fmt.Sprintf("old%02d", i))
		b.WriteString(first[i] + "\n")
	}
	filler := strings.Repeat("grown-by-an-older-nexd\n", 4096)
	for b.Len() < 64<<20 {
		b.WriteString(filler)
	}
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	b = strings.Builder{}
	var logs testkit.Buffer
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	m, reg := attachedRunLog(t, dir, slog.New(slog.NewTextHandler(&logs, nil)), config.Agent{URI: prog})
	runtime.ReadMemStats(&after)
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 1<<20 {
		t.Errorf("the start allocated %d KiB reading a 64 MiB names file, want under 1 MiB", alloc>>10)
	}
	reg.mu.Lock()
	for _, s := range m.Specs() {
		if s.Name == "wasm" && (!slices.Equal(s.Names, first[:16]) || !slices.Equal(reg.names[s.AgentID], first[:16])) {
			t.Errorf("wasm: spec names %q, announced %q; want the file's first 16, %q", s.Names, reg.names[s.AgentID], first[:16])
		}
	}
	reg.mu.Unlock()
	if got := logs.String(); !strings.Contains(got, "level=ERROR") || !strings.Contains(got, "names file is larger") || !strings.Contains(got, file) {
		t.Errorf("log %q, want an error naming %s", got, file)
	}
	if err := m.Stop(context.Background()); err != nil {
		t.Fatal(err)
	}

	// As large as this version writes: 16 names of the longest length.
	var full []string
	for i := range 16 {
		full = append(full, fmt.Sprintf("%02d", i)+strings.Repeat("n", protocol.MaxNameLen-2))
	}
	if err := os.WriteFile(file, []byte(strings.Join(full, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs2 testkit.Buffer
	m, reg = attachedRunLog(t, dir, slog.New(slog.NewTextHandler(&logs2, nil)), config.Agent{URI: prog})
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	reg.mu.Lock()
	defer reg.mu.Unlock()
	for _, s := range m.Specs() {
		if s.Name == "wasm" && !slices.Equal(reg.names[s.AgentID], full) {
			t.Errorf("wasm announced %q, want the file's 16 names", reg.names[s.AgentID])
		}
	}
	if got := logs2.String(); strings.Contains(got, "names file") {
		t.Errorf("a names file of this version's size logged %q", got)
	}
}

func TestSanitizeName(t *testing.T) {
	for in, want := range map[string]string{"echo-nexlet": "echo-nexlet", "a.b c/d": "a_b_c_d", "": "nexlet", "ü": "_"} {
		if got := sanitizeName(in); got != want {
			t.Errorf("sanitizeName(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestNativeNexletGetsGoRuntimeSettings: go_gc_percent and go_memory_limit reach the
// native nexlet as NEX_NATIVE_GOGC (set once it registered) and GOMEMLIMIT (read by
// its Go runtime before main); with 0 the
// nexlet gets nexd's default GOGC (DefaultGOGC) and Go's memory limit.
func TestNativeNexletGetsGoRuntimeSettings(t *testing.T) {
	for _, c := range []struct {
		gc              int
		limit           int64
		def             string
		wantGC, wantMem string
	}{{50, 64 << 20, "", "50", "67108864"}, {-1, 0, "", "off", ""}, {0, 0, "", "", ""}, {0, 0, "50", "50", ""}, {80, 0, "50", "80", ""}} {
		cfg := &config.Config{Node: config.NodeConfig{StopGrace: time.Second, GoGCPercent: c.gc, GoMemoryLimit: c.limit}}
		m := bareManager(t, cfg, slog.New(slog.DiscardHandler), c.def)
		env := m.env(NativeName)
		if env[native.EnvGOGC] != c.wantGC || env["GOMEMLIMIT"] != c.wantMem {
			t.Errorf("go_gc_percent %d, go_memory_limit %d: GOGC=%q GOMEMLIMIT=%q, want %q and %q", c.gc, c.limit, env[native.EnvGOGC], env["GOMEMLIMIT"], c.wantGC, c.wantMem)
		}
	}
}

// TestNativeNexletGetsMaxWorkloads: native_max_workloads reaches the built-in native
// nexlet as the variable it reads; unset, nothing is set (an agents entry named native
// keeps its own; e2e TestFullNexletStaleHeartbeat).
func TestNativeNexletGetsMaxWorkloads(t *testing.T) {
	for _, c := range []struct {
		max int
		set bool
	}{{0, false}, {3, true}} {
		cfg := &config.Config{Node: config.NodeConfig{StopGrace: time.Second, NativeMaxWorkloads: c.max}}
		env := bareManager(t, cfg, slog.New(slog.DiscardHandler), "").env(NativeName)
		v, set := env[native.EnvMaxWorkloads]
		if set != c.set || (set && v != strconv.Itoa(c.max)) {
			t.Errorf("native_max_workloads %d: %s=%q (set %v)", c.max, native.EnvMaxWorkloads, v, set)
		}
	}
}

// bareManager is a Manager with no nexlets, for what it would give the native one.
func bareManager(t *testing.T, cfg *config.Config, log *slog.Logger, defaultGOGC string) *Manager {
	t.Helper()
	m, err := New(context.Background(), Options{Config: cfg, NodeID: "NODE1", Registry: &registry{expected: map[string]string{}, names: map[string][]string{}, keys: map[string]string{}},
		Minter: minter{}, RuntimeDir: filepath.Join(t.TempDir(), "run"), Logger: log, Cgroups: cgroup.Disabled("test", log), DefaultGOGC: defaultGOGC})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	return m
}

// TestNativeNexletLogsAtNodeLevel: the native nexlet is told nexd's level, so that it
// writes no line nexd would wake up to parse and then drop (at warn: "workload
// started" and every "workload output" line of a deploy).
func TestNativeNexletLogsAtNodeLevel(t *testing.T) {
	for level, want := range map[slog.Level]string{slog.LevelDebug: "DEBUG", slog.LevelInfo: "INFO", slog.LevelWarn: "WARN",
		slog.LevelError: "ERROR", slog.LevelError + 4: "ERROR"} {
		cfg := &config.Config{Node: config.NodeConfig{StopGrace: time.Second}}
		m := bareManager(t, cfg, slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: level})), "")
		if got := m.env(NativeName)[native.EnvLogLevel]; got != want {
			t.Errorf("nexd at %v: %s=%q, want %q", level, native.EnvLogLevel, got, want)
		}
	}
}

// TestReloadedLevelReachesNativeNexlet: a level changed by a reload reaches the native
// nexlet over its local channel (it started with the one before).
func TestReloadedLevelReachesNativeNexlet(t *testing.T) {
	var level slog.LevelVar
	cfg := &config.Config{Node: config.NodeConfig{StopGrace: time.Second}}
	m := bareManager(t, cfg, slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: &level})), "")
	if got := m.env(NativeName)[native.EnvLogLevel]; got != "INFO" {
		t.Fatalf("started with %s=%q, want INFO", native.EnvLogLevel, got)
	}
	end := m.channel(NativeName)
	if end == nil {
		t.Fatal("no local channel for the native nexlet")
	}
	s, err := localchan.NewServer(end)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	got := make(chan string, 1)
	s.OnLogLevel = func(l string) { got <- l }
	served := make(chan error, 1)
	go func() { served <- s.Serve(func(*localchan.Request) {}) }()
	defer func() { _ = s.Close(); <-served }()
	level.Set(slog.LevelWarn)
	m.SetLogLevel()
	select {
	case l := <-got:
		if l != "WARN" {
			t.Fatalf("nexlet told %q, want WARN", l)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the nexlet was never told the reloaded level")
	}
}

// TestNativePreviewIsTheStartsEnvironment: what nexd previews to the pre-started
// native nexlet (NativePreview) is what its start's environment sets, with and without
// a state directory; a preview that differs would make the nexlet redo its xkey seed
// at its start (native.Ahead), on READY's path.
func TestNativePreviewIsTheStartsEnvironment(t *testing.T) {
	for _, stateDir := range []string{"", t.TempDir()} {
		cfg := &config.Config{Node: config.NodeConfig{StopGrace: time.Second, StateDir: stateDir}}
		m := bareManager(t, cfg, slog.New(slog.DiscardHandler), "")
		env := m.env(NativeName)
		preview := NativePreview(cfg, m.o.RuntimeDir)
		if len(preview) == 0 {
			t.Fatal("empty preview")
		}
		for _, kv := range preview {
			k, v, _ := strings.Cut(kv, "=")
			if env[k] != v {
				t.Errorf("state dir %q: previewed %s=%q, the start sets %q", stateDir, k, v, env[k])
			}
		}
		if native.XKeySeedPath(func(k string) string { return env[k] }) == "" && stateDir != "" {
			t.Errorf("state dir %q: the start names no xkey seed", stateDir)
		}
	}
}

// TestWorkloadsPidsMax: workloads_pids_max -1 is no bound, a number is itself, and 0
// is three quarters of the lesser of the kernel's pid_max and threads-max as this host
// has them.
func TestWorkloadsPidsMax(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if got := WorkloadsPidsMax(-1, log); got != 0 {
		t.Errorf("-1: %d, want 0 (none)", got)
	}
	if got := WorkloadsPidsMax(64, log); got != 64 {
		t.Errorf("64: %d", got)
	}
	read := func(f string) int64 {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Skip(err)
		}
		v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	want := min(read("/proc/sys/kernel/pid_max"), read("/proc/sys/kernel/threads-max")) * 3 / 4
	if got := WorkloadsPidsMax(0, log); got != want || got <= 0 {
		t.Errorf("auto: %d, want %d", got, want)
	}
}
