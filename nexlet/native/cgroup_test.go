package native

import (
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// cgroupSpec gives a spec for a fresh v1 subtree of this machine's real hierarchies,
// removed with anything left in it when the test ends; it skips where v1 is not writable.
func cgroupSpec(t testing.TB) string {
	t.Helper()
	for _, c := range []string{"memory", "cpu", "pids"} {
		if unix := filepath.Join("/sys/fs/cgroup", c); !writableDir(unix) {
			t.Skipf("no writable cgroup v1 %s hierarchy here", c)
		}
	}
	m, err := cgroup.Detect("/sys/fs/cgroup/memory/"+testkit.OwnedName(t, "nexd-test-native-"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Mode() != cgroup.ModeV1 {
		t.Skipf("cgroup mode %s here", m.Mode())
	}
	t.Cleanup(func() {
		g, err := m.Create("", cgroup.Limits{})
		if err != nil {
			t.Errorf("cgroup cleanup: %v", err)
			return
		}
		if err := g.Remove(); err != nil {
			t.Errorf("cgroup cleanup: %v", err)
		}
	})
	return m.Spec()
}

func writableDir(p string) bool {
	f, err := os.CreateTemp(p, ".probe")
	if err == nil {
		f.Close()
		os.Remove(f.Name())
		return true
	}
	d := filepath.Join(p, fmt.Sprintf("nexd-probe-%d", rand.Int64()))
	if os.Mkdir(d, 0o755) == nil {
		os.Remove(d)
		return true
	}
	return false
}

func TestCgroupGrandchildAndLimits(t *testing.T) {
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{Cgroup: spec})
	if !strings.HasPrefix(tn.IsolationMode(), "cgroup") {
		t.Fatalf("isolation = %s", tn.IsolationMode())
	}
	pidFile := filepath.Join(sharedDir(t), "gc.pid")
	uri := script(t, `sleep 1000 & echo $! > "$1"; echo forked; wait`)
	fn.mustStart("cgfork", startReq(protocol.LifecycleService, "cgfork", map[string]any{"uri": uri, "argv": []string{pidFile},
		"limits": map[string]any{"memory_max": "64M", "pids_max": 20, "cpu_max": 0.5}}, fn.creds()))
	fn.waitLog("cgfork", "stdout", "forked")
	b, _ := os.ReadFile(pidFile)
	gc, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	cg, _ := os.ReadFile("/proc/" + strconv.Itoa(gc) + "/cgroup")
	if !strings.Contains(string(cg), "/cgfork") {
		t.Errorf("grandchild not in the workload's cgroup:\n%s", cg)
	}
	if fn.stop("cgfork", testNS); alive(gc) {
		t.Errorf("grandchild %d survived the stop", gc)
	}
	if p := fn.procsOf("cgfork"); len(p) != 0 {
		t.Errorf("left: %v", p)
	}
}

func TestCgroupOOMReported(t *testing.T) {
	spec := cgroupSpec(t)
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("needs /usr/bin/python3 to allocate memory")
	}
	fn := newFakeNode(t)
	fn.startNexlet(Config{Cgroup: spec})
	uri := script(t, `exec /usr/bin/python3 -c "b = b'a' * (512 << 20); print(len(b))"`)
	fn.mustStart("oom", startReq(protocol.LifecycleJob, "oom", map[string]any{"uri": uri,
		"limits": map[string]any{"memory_max": "32M"}}, fn.creds()))
	ev := fn.stoppedEvent("oom")
	if ev.Error == nil || !strings.Contains(ev.Error.Message, "OOM") || ev.Error.Code != "137" {
		t.Errorf("event error = %+v", ev.Error)
	}
}

func TestCgroupReplayAdopts(t *testing.T) {
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	runtime := t.TempDir()
	first := fn.startNexlet(Config{RuntimeDir: runtime, Cgroup: spec})
	uri := script(t, `echo up; exec sleep 1000`)
	live := startReq(protocol.LifecycleService, "live", map[string]any{"uri": uri}, fn.creds())
	dead := startReq(protocol.LifecycleService, "dead", map[string]any{"uri": uri}, fn.creds())
	fn.mustStart("cglive", live)
	fn.waitLog("cglive", "stdout", "up")
	p := fn.procsOf("cglive")
	if len(p) != 1 {
		t.Fatalf("procs = %v", p)
	}
	first.crash()
	fn.mu.Lock()
	fn.existing = map[string]protocol.AgentStartWorkloadRequest{"cglive": live, "cgdead": dead}
	fn.mu.Unlock()
	fn.startNexlet(Config{RuntimeDir: runtime, Cgroup: spec})
	testkit.Eventually(t, "dead one started", func() bool { return len(fn.procsOf("cgdead")) == 1 })
	testkit.Eventually(t, "live one adopted", func() bool {
		s, ok := fn.summary("cglive")
		return ok && s.WorkloadState == protocol.WorkloadRunning && s.Metadata["pid"] == strconv.Itoa(p[0])
	})
	if got := fn.procsOf("cglive"); len(got) != 1 || got[0] != p[0] {
		t.Errorf("cglive procs = %v, want only %d", got, p[0])
	}
	fn.stop("cglive", testNS)
	fn.stop("cgdead", testNS)
	if alive(p[0]) || len(fn.procsOf("cgdead")) != 0 {
		t.Errorf("processes survived stops")
	}
}

// TestCgroupWorkloadHasNoNewPrivs: a workload started into its v1 cgroup carries
// no_new_privs like one in a plain process group (the fork for v1 once ran on a thread
// without the flag).
func TestCgroupWorkloadHasNoNewPrivs(t *testing.T) {
	needRoot(t)
	spec := cgroupSpec(t)
	fn := newFakeNode(t)
	fn.startNexlet(Config{Cgroup: spec})
	for i := range 3 { // the first from the fork pool or not, and the ones after
		id := fmt.Sprintf("nnp%d", i)
		fn.mustStart(id, startReq(protocol.LifecycleService, id, map[string]any{"uri": "file:///bin/sleep", "argv": []string{"1000"}}, fn.creds()))
		s, _ := fn.summary(id)
		pid, _ := strconv.Atoi(s.Metadata["pid"])
		if v := statusField(t, pid, "NoNewPrivs"); v != "1" {
			t.Errorf("%s: NoNewPrivs = %s, want 1", id, v)
		}
		cg, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
		if !strings.Contains(string(cg), "/"+id+"\n") {
			t.Errorf("%s not in its cgroup:\n%s", id, cg)
		}
	}
}
