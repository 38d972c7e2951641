package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// nativesOf lists the native nexlet processes of the node on state directory state,
// found by what their exec environment says: forked ones and those pre-started at main,
// not one exec'd at nexd's init (which cannot know the directory; see earlyNexlet).
func nativesOf(state string) []int {
	var out []int
	for _, pid := range allPIDs() {
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if strings.Contains(string(env), "NEX_NATIVE_STATE_DIR="+state+"\x00") {
			if st := procStatus(pid, "State"); st != "" && st[0] != 'Z' {
				out = append(out, pid)
			}
		}
	}
	return out
}

// earlyNexlet is nexd's (pid nexd) child native nexlet waiting for, or given, its
// hand-off, as its process id (which tells it from a later process with its pid).
func earlyNexlet(t *testing.T, nexd int) procid.ID {
	t.Helper()
	pid := nexletPID(nexd)
	env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if pid == 0 || !strings.Contains(string(env), supervise.EnvHandoff+"=3\x00") {
		t.Fatalf("nexd %d has no pre-started nexlet child (child %d, environ %q)", nexd, pid, env)
	}
	id, err := procid.Of(pid)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// liveNativeNexlet says whether pid (a number) is a live "nexlet native" process.
func liveNativeNexlet(pid string) bool {
	cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline")
	st, _ := os.ReadFile("/proc/" + pid + "/stat")
	return strings.Contains(string(cmd), "\x00nexlet\x00native\x00") && !strings.Contains(string(st), ") Z ")
}

// gone says whether the process id names no live process (gone, or a zombie).
func gone(id procid.ID) bool {
	return !id.Alive() || strings.HasPrefix(procStatus(id.PID, "State"), "Z")
}

// TestPrestartedNexletRegistersAndRuns: nexd execs its native nexlet at its package
// init (internal/earlynexlet/atinit) and hands it its start later. With an external NATS server, READY=1
// still comes once that nexlet registered, a workload deploys and runs, and the nexlet
// that runs is the pre-started process (its exec environment names the hand-off
// descriptor) whose credentials never showed in /proc/<pid>/environ, and every thread
// of it (those made before its hand-off too) is in its group. A restart of the
// nexlet forks a new one as before (its credentials in its exec environment), which
// runs workloads too.
func TestPrestartedNexletRegistersAndRuns(t *testing.T) {
	needCgroupV1(t, "hierarchies (root), where the native nexlet runs in its group")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	ns := newNotifySocket(t)
	n := startNode(t, nodeOpts{external: s.ClientURL(), notify: ns})
	ns.waitFor(t, "READY=1", 60*time.Second)
	var st control.Status
	if err := json.Unmarshal([]byte(n.mustCtl(t, "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	// Registered: offline until it registers, unknown until its first heartbeat.
	if len(st.Nexlets) != 1 || st.Nexlets[0].Name != "native" || st.Nexlets[0].Health == protocol.HealthOffline {
		t.Fatalf("at READY=1 the native nexlet is not registered: %+v", st.Nexlets)
	}
	pid := nexletPID(n.cmd.Process.Pid)
	if pid == 0 || st.Nexlets[0].PID != pid {
		t.Fatalf("native nexlet pid %d, status says %d", pid, st.Nexlets[0].PID)
	}
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(env), supervise.EnvHandoff+"=3\x00") {
		t.Fatalf("the running nexlet was not pre-started: environ %q", env)
	}
	if at := n.logAttr(t, "native nexlet pre-started; its start follows once nexd has built itself", "at"); at != "init" {
		t.Errorf("the nexlet was pre-started at %q, want at nexd's init:\n%s", at, n.out.String())
	}
	early := earlyNexlet(t, n.cmd.Process.Pid)
	if strings.Contains(string(env), "NEX_AGENT_") {
		t.Errorf("credentials in the pre-started nexlet's /proc environ: %q", env)
	}
	inGroup := ":memory:" + strings.TrimPrefix(n.cgroup, "/sys/fs/cgroup/memory") + "/nexlets/native\n"
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if !strings.Contains(string(cg), inGroup) {
		t.Errorf("the pre-started nexlet is not in its group below %s:\n%s", n.cgroup, cg)
	}
	// Every thread, also those its runtime and Ahead made before its hand-off, is in
	// its group (the move is a cgroup.procs write), but for its fork pool's, which wait
	// in groups of their own.
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil || len(tasks) < 2 {
		t.Fatalf("threads of the nexlet: %d (%v)", len(tasks), err)
	}
	for _, task := range tasks {
		cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/cgroup", pid, task.Name()))
		if !strings.Contains(string(cg), inGroup) && !strings.Contains(string(cg), "/.forkpool-") {
			t.Errorf("the pre-started nexlet's thread %s is outside its group below %s:\n%s", task.Name(), n.cgroup, cg)
		}
	}
	w := n.runWorkload(t, "--name", "first", "--", "/bin/sleep", "600")
	testkit.EventuallyWithin(t, 60*time.Second, "the workload runs", func() bool { return len(n.groupProcs(w.ID)) > 0 })

	n.mustCtl(t, "nexlet", "restart", "native")
	var next int
	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
		next = nexletPID(n.cmd.Process.Pid)
		return next != 0 && next != pid
	})
	env, _ = os.ReadFile(fmt.Sprintf("/proc/%d/environ", next))
	if strings.Contains(string(env), supervise.EnvHandoff) || !strings.Contains(string(env), "NEX_AGENT_NODE_ID=") {
		t.Errorf("the restarted nexlet was not forked as before: environ %q", env)
	}
	n.nativeSeen = false
	w2 := n.runWorkload(t, "--name", "second", "--", "/bin/sleep", "600")
	testkit.EventuallyWithin(t, 60*time.Second, "the second workload runs", func() bool { return len(n.groupProcs(w2.ID)) > 0 })
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if left := nativesOf(n.stateDir); len(left) > 0 || !gone(early) {
		t.Errorf("native nexlets left after the stop: %v, the pre-started %s alive %v", left, early, !gone(early))
	}
}

// TestPrestartedNexletNeverOrphaned: a pre-started native nexlet never outlives a nexd
// that did not hand it its start: the one nexd's init exec'd, nexd's child while nexd
// waits for NATS before the hand-off (an object-store agent makes the nexlets wait for
// the connection), is gone after a kill -9 of nexd; none is left after a nexd that
// failed its start after the pre-start (an agent binary that does not exist).
func TestPrestartedNexletNeverOrphaned(t *testing.T) {
	needCgroupV1(t, "hierarchies (root)")
	t.Parallel()
	t.Run("kill -9 before the hand-off", func(t *testing.T) {
		dir := t.TempDir()
		cfg := `{"node": {"up": {"agents": [{"uri": "nats://nexlets/some-nexlet"}]}}}`
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		ns := newNotifySocket(t)
		n := startNode(t, nodeOpts{external: "nats://127.0.0.1:1", notify: ns, dir: dir})
		ns.waitFor(t, "waiting for NATS", 60*time.Second)
		pre := earlyNexlet(t, n.cmd.Process.Pid)
		n.cmd.Process.Kill()
		n.wait(t, 30*time.Second)
		testkit.EventuallyWithin(t, 30*time.Second, "no native nexlet left", func() bool {
			return gone(pre) && len(nativesOf(n.stateDir)) == 0
		})
	})
	t.Run("start failed after the pre-start", func(t *testing.T) {
		s := testnats.Start(t, testnats.Options{})
		dir := t.TempDir()
		cfg := `{"node": {"up": {"agents": [{"uri": "file:///nonexistent/nexlet-binary"}]}}}`
		if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
			t.Fatal(err)
		}
		n := startNode(t, nodeOpts{external: s.ClientURL(), dir: dir})
		if code := n.wait(t, 60*time.Second); code != 1 {
			t.Fatalf("exit %d with a nexlet binary that does not exist, want 1:\n%s", code, n.out.String())
		}
		pid := n.logAttr(t, "native nexlet pre-started; its start follows once nexd has built itself", "pid")
		if pid == "" {
			t.Fatalf("no nexlet was pre-started:\n%s", n.out.String())
		}
		if left := nativesOf(n.stateDir); len(left) > 0 || liveNativeNexlet(pid) {
			t.Errorf("native nexlets left by the failed start: %v (pre-started %s)", left, pid)
		}
	})
}

// TestLiveRestoreAdoptsWithoutPrestart: with live_restore, the nexd after a restart
// adopts the native nexlet the first one left running (itself pre-started) and keeps
// no second one (the one its init exec'd is killed at main): the same single native
// nexlet runs for the state directory, before and after, the new nexd has no nexlet
// child, and the workload runs on.
func TestLiveRestoreAdoptsWithoutPrestart(t *testing.T) {
	needCgroupV1(t, "hierarchies (root), to find the workload's processes")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	opts := nodeOpts{external: s.ClientURL(), extra: []string{"--live-restore"}}
	n := startNode(t, opts)
	n.waitReady(t)
	w := n.runWorkload(t, "--name", "kept", "--", "/bin/sleep", "600")
	testkit.EventuallyWithin(t, 60*time.Second, "the workload runs", func() bool { return len(n.groupProcs(w.ID)) > 0 })
	first := earlyNexlet(t, n.cmd.Process.Pid) // pre-started at init: no state dir in its environ
	if forked := nativesOf(n.stateDir); len(forked) > 0 {
		t.Fatalf("native nexlets %v beside the pre-started %s, want one", forked, first)
	}
	opts.stateDir = n.stateDir
	n2 := n.restart(t, opts)
	if !strings.Contains(n2.out.String(), "adopted the running nexlet") {
		t.Fatalf("the running nexlet was not adopted:\n%s", n2.out.String())
	}
	if got := nativesOf(n.stateDir); len(got) > 0 || gone(first) {
		t.Errorf("native nexlets after the restart %v (the adopted %s alive %v), want only the adopted", got, first, !gone(first))
	}
	if child := nexletPID(n2.cmd.Process.Pid); child != 0 {
		t.Errorf("the new nexd has a nexlet child %d beside the adopted one", child)
	}
	if len(n.groupProcs(w.ID)) == 0 {
		t.Error("the workload did not run on")
	}
	n2.signal(t, syscall.SIGINT)
	n2.wait(t, 60*time.Second)
}

// TestEarlyNexletFallsBack: the native nexlet nexd's init exec'd is used only when
// the configuration agrees with what its runtime read at exec. With go_memory_limit set
// (GOMEMLIMIT, read before main) it is killed and one is pre-started at main with the
// limit, which registers and runs workloads; with disable_native_start it is killed and
// none runs. Either way the init's process is gone, not left waiting.
func TestEarlyNexletFallsBack(t *testing.T) {
	needCgroupV1(t, "hierarchies (root), where the native nexlet runs in its group")
	t.Parallel()
	t.Run("go_memory_limit", func(t *testing.T) {
		t.Parallel()
		s := testnats.Start(t, testnats.Options{})
		n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--go-memory-limit", "256M"}})
		n.waitReady(t)
		init := n.logAttr(t, "native nexlet started at init not used: the configuration sets a variable its runtime read otherwise", "pid")
		if v := n.logAttr(t, "native nexlet started at init not used: the configuration sets a variable its runtime read otherwise", "var"); v != "GOMEMLIMIT" {
			t.Fatalf("the init's nexlet was not set aside for GOMEMLIMIT (var %q):\n%s", v, n.out.String())
		}
		if at := n.logAttr(t, "native nexlet pre-started; its start follows once nexd has built itself", "at"); at != "main" {
			t.Errorf("pre-started at %q, want main", at)
		}
		if liveNativeNexlet(init) {
			t.Errorf("the init's nexlet %s is still alive", init)
		}
		pid := nexletPID(n.cmd.Process.Pid)
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if !strings.Contains(string(env), "GOMEMLIMIT=268435456\x00") || !strings.Contains(string(env), supervise.EnvHandoff+"=3\x00") {
			t.Errorf("the running nexlet %d was not pre-started with the limit: environ %q", pid, env)
		}
		w := n.runWorkload(t, "--name", "limited", "--", "/bin/sleep", "600")
		testkit.EventuallyWithin(t, 60*time.Second, "the workload runs", func() bool { return len(n.groupProcs(w.ID)) > 0 })
	})
	t.Run("disable_native_start", func(t *testing.T) {
		t.Parallel()
		s := testnats.Start(t, testnats.Options{})
		n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--disable-native-start",
			"--agents.uri", "file:///bin/sleep", "--agents.argv", "600"}})
		testkit.EventuallyWithin(t, 60*time.Second, "the agent runs", func() bool {
			return strings.Contains(n.out.String(), "nexlet started")
		})
		for _, pid := range allPIDs() {
			if st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); strings.Contains(string(st), fmt.Sprintf(") S %d ", n.cmd.Process.Pid)) || strings.Contains(string(st), fmt.Sprintf(") Z %d ", n.cmd.Process.Pid)) {
				if liveNativeNexlet(fmt.Sprint(pid)) || strings.Contains(string(st), ") Z ") {
					t.Errorf("nexd has a child %d: %s", pid, st)
				}
			}
		}
		n.signal(t, syscall.SIGTERM)
		n.wait(t, 60*time.Second)
	})
}

// TestPrestartedNexletKeepsItsXKey: the pre-started native nexlet makes a curve key
// while it waits for its hand-off (native.Ahead). A first start stores that key's seed
// and announces the key it stored; a later nexd's pre-started nexlet, which made a key
// ahead too, finds the stored seed and announces that one (environments sealed to it
// must still open), and the stored seed stays as it was.
func TestPrestartedNexletKeepsItsXKey(t *testing.T) {
	needCgroupV1(t, "hierarchies (root), where the native nexlet runs in its group")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	seedPath := filepath.Join(n.stateDir, "nexlets", "native", native.XKeySeedFile)
	stored := func() (seed []byte, pub string) {
		t.Helper()
		seed, err := os.ReadFile(seedPath)
		if err != nil {
			t.Fatal(err)
		}
		kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(seed))
		if err != nil {
			t.Fatal(err)
		}
		if pub, err = kp.PublicKey(); err != nil {
			t.Fatal(err)
		}
		return seed, pub
	}
	seed, pub := stored()
	early := earlyNexlet(t, n.cmd.Process.Pid)
	if got := n.logAttr(t, "native nexlet starting", "xkey"); got != pub {
		t.Fatalf("the first start announces xkey %s, stores %s", got, pub)
	}
	n2 := n.restart(t, nodeOpts{external: s.ClientURL(), stateDir: n.stateDir})
	if again := earlyNexlet(t, n2.cmd.Process.Pid); again == early {
		t.Fatalf("the second nexd runs the first one's nexlet %s, not one pre-started anew", again)
	}
	if got := n2.logAttr(t, "native nexlet starting", "xkey"); got != pub {
		t.Fatalf("a pre-started nexlet with a stored seed announces xkey %s, not the stored %s", got, pub)
	}
	if seed2, _ := stored(); !bytes.Equal(seed2, seed) {
		t.Fatal("the stored seed changed on the second start")
	}
}
