package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/natsurl"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// node is a nexd under test with its own state dir, control socket, cgroup root and
// (unless external) embedded NATS port.
type node struct {
	*proc
	stateDir string
	socket   string
	natsURL  string // set by waitReady when embedded
	embedded bool
	// nativeSeen: the native nexlet has been seen healthy, so workloads can be placed.
	nativeSeen bool
	cgroup     string
}

type nodeOpts struct {
	external string   // NATS URL; "" = embedded on a free port
	extra    []string // more flags
	env      []string
	notify   *notifySocket
	stateDir string
	cgroup   string // reuse this cgroup root (a restart of the same node)
	// autoCgroup passes no --cgroup-root: the node detects its own (the test cleans
	// up after it).
	autoCgroup bool
	dir        string // working dir and HOME (where ./config.json is read); a temp dir when empty
	// publicSocket puts the control socket where other uids can reach it (its own
	// permission checks then decide), as /run/nex is on an installed node.
	publicSocket bool
	bin          string // the nexd binary; nexdBin when empty (a copy an "upgrade" replaces)
}

// cgroupRoot gives each test its own v1 subtree (when this host has writable v1
// memory cgroups), so tests never clean up each other's nexlets. It is named for this
// process (testkit.OwnedName), so a killed e2e binary's subtrees are removed by the
// next test binary's sweep.
func cgroupRoot(t testing.TB) string {
	t.Helper()
	base := "/sys/fs/cgroup/memory"
	if !cgroupV1Writable() {
		return ""
	}
	root := filepath.Join(base, testkit.OwnedName(t, "nexd-test-e2e-"))
	t.Cleanup(func() {
		// A test that killed nexd without a successor leaves its workloads running
		// (they outlive nexd by design): kill whatever is left before removing the tree.
		for i := 0; i < 20 && killTree(root) > 0; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		for _, h := range []string{"memory", "cpu", "pids", "cpuacct", "cpu,cpuacct"} {
			removeTree(filepath.Join("/sys/fs/cgroup", h, filepath.Base(root)))
		}
	})
	return root
}

// cgroupV1Writable: this host has cgroup v1 hierarchies and the test runs as root.
func cgroupV1Writable() bool {
	st, err := os.Stat("/sys/fs/cgroup/memory")
	return err == nil && st.IsDir() && os.Geteuid() == 0
}

// needCgroupV1 skips an e2e test in -short mode and on a host without writable cgroup
// v1 hierarchies; why completes "needs writable cgroup v1 ...".
func needCgroupV1(t *testing.T, why string) {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	if !cgroupV1Writable() {
		t.Skip("needs writable cgroup v1 " + why)
	}
}

// nodeRoots lists node id's own cgroup root, nexd/<id>, in every hierarchy that has one.
func nodeRoots(id string) []string {
	if id == "" { // would match nexd/ itself
		return nil
	}
	m, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", "nexd", id))
	return m
}

// removeNodeRoots kills what still runs below node id's own cgroup roots and removes
// them: the cleanup of a test whose node detected its root, run after the node stopped.
func removeNodeRoots(id string) {
	for _, root := range nodeRoots(id) {
		for i := 0; i < 20 && killTree(root) > 0; i++ {
			time.Sleep(50 * time.Millisecond)
		}
		removeTree(root)
	}
}

// killTree sends SIGKILL to every process in the cgroup tree and returns how many it found.
func killTree(dir string) int {
	n := 0
	if b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 0 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
				n++
			}
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return n
	}
	for _, e := range entries {
		if e.IsDir() {
			n += killTree(filepath.Join(dir, e.Name()))
		}
	}
	return n
}

// removeTree removes an (already empty) cgroup tree bottom-up.
func removeTree(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		if e.IsDir() {
			removeTree(filepath.Join(dir, e.Name()))
		}
	}
	syscall.Rmdir(dir)
}

func startNode(t testing.TB, o nodeOpts) *node {
	t.Helper()
	n := &node{stateDir: o.stateDir}
	if n.stateDir == "" {
		n.stateDir = t.TempDir()
	}
	// After the node's stop and its cgroup's removal (registered below).
	testkit.CleanNexletDirs(t, filepath.Join(n.stateDir, "run", "native"))
	n.socket = filepath.Join(t.TempDir(), "nexd.sock")
	if o.publicSocket {
		n.socket = filepath.Join(testkit.PublicDir(t), "nexd.sock")
	}
	args := []string{"--state-dir", n.stateDir, "--control-socket", n.socket, "--node-name", "e2e",
		"--startup-timeout", "60s"}
	env := append([]string{}, o.env...)
	if o.external != "" {
		n.natsURL = o.external
		if natsurl.Strip(o.external) != o.external {
			// A password or token: in the environment, as nexd takes it (a flag is refused).
			env = append(env, "NEX_NATS_SERVERS="+o.external)
		} else {
			args = append(args, "--nats.servers", o.external)
		}
	} else {
		// The embedded server binds a port of the kernel's choosing (-1: random), so
		// parallel tests never race for one; waitReady reads it back from status.
		n.embedded = true
		env = append(env, "NEXD_EMBEDDED_NATS_PORT=-1")
	}
	cg := o.cgroup
	if cg == "" && !o.autoCgroup {
		cg = cgroupRoot(t)
	}
	if cg != "" {
		n.cgroup = cg
		args = append(args, "--cgroup-root", cg)
	}
	args = append(args, o.extra...)
	n.proc = startNexd(t, nexdOpts{args: args, env: env, notify: o.notify, dir: o.dir, bin: o.bin})
	return n
}

// restart stops nexd with SIGTERM (exit 0 wanted) and starts the same node again with
// opts on the same cgroup root, waiting until it is ready: with live_restore, the next
// nexd adopts what the first left running.
func (n *node) restart(t *testing.T, opts nodeOpts) *node {
	t.Helper()
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d after SIGTERM\n%s", code, n.out.String())
	}
	opts.cgroup = n.cgroup // the same node: the same cgroup root
	n2 := startNode(t, opts)
	n2.waitReady(t)
	return n2
}

// waitReady waits until the control socket answers with state running. It asks
// in-process, not through nexctl, so that polling does not start a process every
// few milliseconds on a loaded machine.
func (n *node) waitReady(t testing.TB) control.Status {
	t.Helper()
	st := waitStatus(t, n.proc, n.socket, 90*time.Second, "nexd ready (state running)", func(st control.Status) bool {
		return st.State == "running"
	})
	if n.embedded {
		if !st.NATS.Embedded || st.NATS.Server == "" {
			t.Fatalf("embedded NATS not in status: %+v", st.NATS)
		}
		n.natsURL = st.NATS.Server
	}
	return st
}

// statusCallWait bounds one status call of a test. A control socket that nobody
// answers (systemd's, queueing connections while no nexd runs) must fail the call,
// not hang the test until the test binary's timeout, as a CI run once did.
const statusCallWait = 10 * time.Second

// statusOf asks the control socket at path for the node's status once, within
// statusCallWait.
func statusOf(path string) (control.Status, error) {
	c := control.NewClient(path)
	defer c.Close()
	return statusWithin(context.Background(), c)
}

// statusWithin is c's status call, within statusCallWait and ctx.
func statusWithin(ctx context.Context, c *control.Client) (control.Status, error) {
	ctx, cancel := context.WithTimeout(ctx, statusCallWait)
	defer cancel()
	return c.Status(ctx)
}

// mustStatus is statusOf, failing t naming why it asked.
func mustStatus(t testing.TB, path, why string) control.Status {
	t.Helper()
	st, err := statusOf(path)
	if err != nil {
		t.Fatalf("status (%s) on %s: %v", why, path, err)
	}
	return st
}

// waitStatus asks the control socket at path for the node's status, in-process, until
// cond holds of it, for at most bound (each call within statusCallWait), and returns
// that status. It fails t naming what it waited for and the last answer or error; at
// once, with nexd's output, when p (if not nil) exits first.
func waitStatus(t testing.TB, p *proc, path string, bound time.Duration, what string, cond func(control.Status) bool) control.Status {
	t.Helper()
	c := control.NewClient(path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), bound) // no call outlasts the bound
	defer cancel()
	var st control.Status
	last := "no answer"
	exited := false
	ok := testkit.WaitFor(bound, func() bool {
		if p != nil {
			select {
			case <-p.done:
				exited = true
				return true
			default:
			}
		}
		cur, err := statusWithin(ctx, c)
		if err != nil {
			last = err.Error()
			return false
		}
		st, last = cur, "state "+string(cur.State)
		return cond(cur)
	})
	switch {
	case exited:
		t.Fatalf("nexd exited while waiting for %s: %v\n%s", what, p.err, p.out.String())
	case !ok && p != nil:
		t.Fatalf("timed out after %v waiting for %s on %s; last: %s\n%s", bound, what, path, last, p.out.String())
	case !ok:
		t.Fatalf("timed out after %v waiting for %s on %s; last: %s", bound, what, path, last)
	}
	return st
}

// natsArgs are nexctl's flags for this node's NATS: the external server's URL, or none
// for the embedded server, which admits only users nexd signed (nexctl then asks the
// control socket for its URL and an admin credential, as a local admin's would).
func (n *node) natsArgs() []string {
	if n.natsURL == "" || n.embedded {
		return nil
	}
	return []string{"--nats.servers", n.natsURL}
}

// waitNative waits, once per node, until the native nexlet is healthy (which a bid
// needs). READY follows its first heartbeat (e2e TestBidRightAfterReady), so after
// waitReady this returns at once unless the nexlet restarted since or the READY was
// one that names nexlets not serving.
func (n *node) waitNative(t testing.TB) {
	t.Helper()
	if n.nativeSeen {
		return
	}
	waitStatus(t, n.proc, n.socket, testkit.DefaultWait, "native nexlet healthy", func(st control.Status) bool {
		for _, x := range st.Nexlets {
			if x.Name == "native" && x.Health == protocol.HealthHealthy {
				return true
			}
		}
		return false
	})
	n.nativeSeen = true
}

// ctl runs nexctl against this node (socket and NATS).
func (n *node) ctl(t testing.TB, args ...string) (string, string, int) {
	t.Helper()
	full := append([]string{"--control-socket", n.socket}, n.natsArgs()...)
	full = append(full, args...)
	return run(t, nil, nexctlBin(t), full...)
}

func (n *node) mustCtl(t testing.TB, args ...string) string {
	t.Helper()
	out, errOut, code := n.ctl(t, args...)
	if code != 0 {
		t.Fatalf("nexctl %v: exit %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
	}
	return out
}

// TestNotifySequence drives start, good and bad reloads, the watchdog and stop through
// a fake systemd, asserting the exact sd_notify protocol.
func TestNotifySequence(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	ns := newNotifySocket(t)
	dir := t.TempDir()
	cfgPath := filepath.Join(dir, "config.json")
	testkit.WriteFile(t, cfgPath, `{"logger": {"level": "info"}, "node": {"up": {"tags": {"pool": "blue"}}}}`)
	n := startNode(t, nodeOpts{notify: ns, extra: []string{"--config", cfgPath},
		env: []string{"WATCHDOG_USEC=400000"}})

	first := ns.waitFor(t, "STATUS=", 30*time.Second)
	if !strings.HasPrefix(first, "STATUS=starting") {
		t.Fatalf("first notification %q, want STATUS=starting…", first)
	}
	ready := ns.waitFor(t, "READY=1", 90*time.Second)
	if !strings.Contains(ready, "STATUS=running: 0 workloads, 1 nexlets, nats connected") {
		t.Fatalf("READY notification %q lacks the running status line", ready)
	}
	for _, m := range ns.all() {
		if strings.Contains(m, "WATCHDOG=1") && !strings.Contains(strings.Join(ns.all(), "|"), "READY=1") {
			t.Fatalf("watchdog ping before READY")
		}
	}
	ns.waitFor(t, "WATCHDOG=1", 10*time.Second)

	// A good reload: RELOADING=1 with MONOTONIC_USEC, then READY=1 with the outcome.
	testkit.WriteFile(t, cfgPath, `{"logger": {"level": "debug"}, "node": {"up": {"tags": {"pool": "green"}}}}`)
	n.signal(t, syscall.SIGHUP)
	rel := ns.waitFor(t, "RELOADING=1", 30*time.Second)
	if !strings.Contains(rel, "MONOTONIC_USEC=") {
		t.Fatalf("RELOADING without MONOTONIC_USEC: %q", rel)
	}
	done := ns.waitFor(t, "READY=1", 30*time.Second)
	if !strings.Contains(done, "STATUS=reloaded") {
		t.Fatalf("after reload: %q", done)
	}
	var tags map[string]string
	json.Unmarshal([]byte(n.mustCtl(t, "node", "info", n.waitReady(t).NodeID, "--json")), &struct {
		Tags *map[string]string `json:"tags"`
	}{&tags})
	if tags["pool"] != "green" {
		t.Fatalf("reloaded tag not applied: %v", tags)
	}

	// A bad reload keeps the old config and says why in STATUS.
	testkit.WriteFile(t, cfgPath, `{"logger": {"level": "loud"}}`)
	n.signal(t, syscall.SIGHUP)
	ns.waitFor(t, "RELOADING=1", 30*time.Second)
	bad := ns.waitFor(t, "READY=1", 30*time.Second)
	if !strings.Contains(bad, "STATUS=reload rejected") || !strings.Contains(bad, "logger.level") {
		t.Fatalf("bad reload status %q should name logger.level", bad)
	}
	// A restart-only key is rejected by name.
	testkit.WriteFile(t, cfgPath, `{"nexus": "other"}`)
	out, errOut, code := n.ctl(t, "reload")
	if code != 1 || !strings.Contains(errOut, "nexus") {
		t.Fatalf("reload of a restart-only key: exit %d, %s %s", code, out, errOut)
	}
	if st := n.waitReady(t); st.Nexus != "nexus" {
		t.Fatalf("nexus changed by a rejected reload: %q", st.Nexus)
	}

	n.signal(t, syscall.SIGTERM)
	stop := ns.waitFor(t, "STOPPING=1", 30*time.Second)
	_ = stop
	ns.waitFor(t, "EXTEND_TIMEOUT_USEC=", 30*time.Second)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit code %d after SIGTERM, want 0\n%s", code, n.out.String())
	}
}

// TestExternalNATS runs against an external in-process nats-server and answers a raw
// $NEX ping; SIGINT drains and exits 0.
func TestExternalNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	st := n.waitReady(t)
	if st.NATS.Embedded || !st.NATS.Connected {
		t.Fatalf("nats status %+v, want external and connected", st.NATS)
	}
	nc := testnats.Connect(t, s)
	msg, err := nc.Request(protocol.PingNodeSubject(st.NodeID), []byte(`{"filter":null}`), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var pong protocol.NodePingResponse
	if err := protocol.Decode(msg.Data, &pong); err != nil {
		t.Fatal(err)
	}
	if pong.NodeID != st.NodeID || pong.State != protocol.NodeRunning || pong.AgentCount != 1 {
		t.Fatalf("ping response %+v", pong)
	}
	n.signal(t, syscall.SIGINT)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d", code)
	}
	// The node's NATS service is gone after the drain.
	if _, err := nc.Request(protocol.PingNodeSubject(st.NodeID), []byte(`{"filter":null}`), time.Second); err == nil {
		t.Fatal("node still answers after exit")
	}
}

// TestIdentityPersistence: the same state dir gives the same node id; no state dir
// gives a new one each start.
func TestIdentityPersistence(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := t.TempDir()
	var ids []string
	for i := 0; i < 2; i++ {
		n := startNode(t, nodeOpts{external: s.ClientURL(), stateDir: dir})
		ids = append(ids, n.waitReady(t).NodeID)
		n.signal(t, syscall.SIGTERM)
		n.wait(t, 60*time.Second)
	}
	if ids[0] != ids[1] {
		t.Fatalf("node id changed across restarts with a state dir: %v", ids)
	}
	seed, err := os.ReadFile(filepath.Join(dir, "node.seed"))
	if err != nil || !strings.HasPrefix(string(seed), "SN") {
		t.Fatalf("persisted seed: %q %v", seed, err)
	}

	// Ephemeral: no --state-dir and no STATE_DIRECTORY.
	var eph []string
	for i := 0; i < 2; i++ {
		socket := filepath.Join(t.TempDir(), "s.sock")
		p := startNexd(t, nexdOpts{args: []string{"--nats.servers", s.ClientURL(), "--control-socket", socket,
			"--disable-native-start"}})
		n := &node{proc: p, socket: socket, natsURL: s.ClientURL()}
		id := n.waitReady(t).NodeID
		eph = append(eph, id)
		// Its runtime dir is a temp dir of its own (nexd's environment has no
		// $TMPDIR), gone after the stop: each start left one behind before.
		runtime := filepath.Join("/tmp", "nexd-"+id[:12])
		if _, err := os.Stat(filepath.Join(runtime, "exits")); err != nil {
			t.Fatalf("ephemeral node's runtime dir while it runs: %v", err)
		}
		p.signal(t, syscall.SIGTERM)
		p.wait(t, 60*time.Second)
		if _, err := os.Stat(runtime); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("ephemeral node left its runtime dir %s behind (%v)", runtime, err)
		}
	}
	if eph[0] == eph[1] {
		t.Fatalf("ephemeral nodes share an id: %v", eph)
	}
}

// TestCheckAndUsage covers --check (redacted, exit codes), --help and --version.
func TestCheckAndUsage(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	kp, _ := nkeys.CreateServer()
	seed, _ := kp.Seed()
	out, _, code := run(t, []string{"NEX_NODE_SEED=" + string(seed)}, nexdBin(t), "--check", "--tags", "a=b")
	if code != 0 || !strings.Contains(out, "[redacted]") || strings.Contains(out, string(seed)) ||
		!strings.Contains(out, "configuration is valid") {
		t.Fatalf("--check: exit %d\n%s", code, out)
	}
	out, errOut, code := run(t, nil, nexdBin(t), "--check", "--tags", "nex.os=x", "--state", "sql", "--logger.level", "loud")
	if code == 0 || !strings.Contains(errOut, "nex.") || !strings.Contains(errOut, "state") || !strings.Contains(errOut, "logger.level") {
		t.Fatalf("--check with errors: exit %d\n%s\n%s", code, out, errOut)
	}
	out, _, code = run(t, nil, nexdBin(t), "node", "up", "--help")
	for _, want := range []string{"--node-seed", "--nats.servers", "--logger.target", "--agents.uri", "--state-dir", "--control-socket"} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("--help lacks %s (exit %d)", want, code)
		}
	}
	out, _, code = run(t, nil, nexdBin(t), "--version")
	if code != 0 || !strings.Contains(out, "commit") || !strings.Contains(out, "built") {
		t.Fatalf("--version: %q", out)
	}
	_, errOut, code = run(t, nil, nexdBin(t), "--no-such-flag")
	if code != 2 || !strings.Contains(errOut, "no-such-flag") {
		t.Fatalf("unknown flag: exit %d %s", code, errOut)
	}
}

var _ = nats.DefaultURL
