package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// nativesOf lists the native nexlet processes of the node on state directory state,
// found by what their exec environment says (a pre-started one's too).
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

// TestPrestartedNexletRegistersAndRuns: nexd execs its native nexlet at its main and
// hands it its start later (supervise.Prestart). With an external NATS server, READY=1
// still comes once that nexlet registered, a workload deploys and runs, and the nexlet
// that runs is the pre-started process (its exec environment names the hand-off
// descriptor) whose credentials never showed in /proc/<pid>/environ. A restart of the
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
	if strings.Contains(string(env), "NEX_AGENT_") {
		t.Errorf("credentials in the pre-started nexlet's /proc environ: %q", env)
	}
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if !strings.Contains(string(cg), ":memory:"+strings.TrimPrefix(n.cgroup, "/sys/fs/cgroup/memory")+"/nexlets/native\n") {
		t.Errorf("the pre-started nexlet is not in its group below %s:\n%s", n.cgroup, cg)
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
	if left := nativesOf(n.stateDir); len(left) > 0 {
		t.Errorf("native nexlets left after the stop: %v", left)
	}
}

// TestPrestartedNexletNeverOrphaned: a pre-started native nexlet never outlives a nexd
// that did not hand it its start. Counted by the state directory its exec environment
// names: one while nexd waits for NATS before the hand-off (an object-store agent makes
// the nexlets wait for the connection), none after a kill -9 of nexd; none after a nexd
// that failed its start after the pre-start (an agent binary that does not exist).
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
		var pre []int
		testkit.EventuallyWithin(t, 30*time.Second, "the pre-started nexlet", func() bool {
			pre = nativesOf(n.stateDir)
			return len(pre) == 1
		})
		if child := nexletPID(n.cmd.Process.Pid); child != pre[0] {
			t.Fatalf("pre-started nexlet %d is not nexd's child (%d)", pre[0], child)
		}
		n.cmd.Process.Kill()
		n.wait(t, 30*time.Second)
		testkit.EventuallyWithin(t, 30*time.Second, "no native nexlet left", func() bool {
			return len(nativesOf(n.stateDir)) == 0
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
		if left := nativesOf(n.stateDir); len(left) > 0 {
			t.Errorf("native nexlets left by the failed start: %v (pre-started %s)", left, pid)
		}
	})
}

// TestLiveRestoreAdoptsWithoutPrestart: with live_restore, the nexd after a restart
// adopts the native nexlet the first one left running (itself pre-started) and starts
// no second one: the same single native nexlet runs for the state directory, before
// and after, the new nexd has no nexlet child, and the workload runs on.
func TestLiveRestoreAdoptsWithoutPrestart(t *testing.T) {
	needCgroupV1(t, "hierarchies (root), to find the workload's processes")
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	opts := nodeOpts{external: s.ClientURL(), extra: []string{"--live-restore"}}
	n := startNode(t, opts)
	n.waitReady(t)
	w := n.runWorkload(t, "--name", "kept", "--", "/bin/sleep", "600")
	testkit.EventuallyWithin(t, 60*time.Second, "the workload runs", func() bool { return len(n.groupProcs(w.ID)) > 0 })
	before := nativesOf(n.stateDir)
	if len(before) != 1 {
		t.Fatalf("native nexlets %v, want one", before)
	}
	opts.stateDir = n.stateDir
	n2 := n.restart(t, opts)
	if !strings.Contains(n2.out.String(), "adopted the running nexlet") {
		t.Fatalf("the running nexlet was not adopted:\n%s", n2.out.String())
	}
	if got := nativesOf(n.stateDir); !slices.Equal(got, before) {
		t.Errorf("native nexlets after the restart %v, want only the adopted %v", got, before)
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
