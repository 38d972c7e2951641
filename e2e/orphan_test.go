package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAdoptedNexletCrashKeepsExitCodes: with live_restore the native nexlet outlives
// nexd, so the next nexd adopts a nexlet that is not its child. When that nexlet is then
// killed (-9), its workloads are reparented to init, not to nexd; a job that ends right
// after still has its exit code reported (not "lost"), because nexd learns it from the
// kernel's process events; the service keeps its process.
func TestAdoptedNexletCrashKeepsExitCodes(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("process events need root")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	opts := nodeOpts{external: s.ClientURL(), stateDir: state, extra: []string{"--live-restore", "--state", "kv"}}
	n := startNode(t, opts)
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	stopped, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)

	svc, marker, before, job, release := runSvcAndJob(t, n, "orphan", 5)
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}

	// A new nexd adopts the nexlet the first one left running: not its child.
	n2 := n.restart(t, opts)
	testkit.EventuallyWithin(t, 60*time.Second, "both workloads listed running after the adoption", func() bool {
		running := 0
		for _, w := range n2.workloads(t) {
			if w.State == string(protocol.WorkloadRunning) && (w.ID == svc || w.ID == job) {
				running++
			}
		}
		return running == 2
	})
	if st := procStatus(nexlet, "PPid"); st == fmt.Sprint(n2.cmd.Process.Pid) {
		t.Fatalf("the adopted nexlet %d is the new nexd's child: the test needs one that is not", nexlet)
	}

	// Kill it and end the job at once: the job's parent is gone, it ends reparented to
	// init before (or while) the next nexlet adopts it.
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ev := awaitStopped(t, stopped, job, 60*time.Second)
	if ev.Metadata["exit_code"] != "5" {
		t.Errorf("the job that ended while its adopted nexlet was dead was reported with %+v, want exit code 5", ev)
	}
	if !strings.Contains(n2.out.String(), "recorded the exit of a workload reparented to init") {
		t.Errorf("nexd did not record the orphan's exit:\n%s", n2.out.String())
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the service listed running, the same process", func() bool {
		return slices.ContainsFunc(n2.workloads(t), func(w control.Workload) bool {
			return w.ID == svc && w.State == string(protocol.WorkloadRunning)
		}) && slices.Equal(markerPIDs(marker), before)
	})
}

// TestRestartedNexletOutlivesNexd: a native nexlet that nexd restarted after a crash
// (kill -9) is left running by a live_restore stop like the first one, and the next
// nexd adopts it (same pid) with its workloads. The adopted nexlet writes its
// workloads' limits again when the new nexd replays them (a nexd on cgroup v2 drops
// them when it stops: here the test lifts the memory limit by hand).
func TestRestartedNexletOutlivesNexd(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	opts := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), extra: []string{"--live-restore", "--state", "kv"}}
	n := startNode(t, opts)
	n.waitReady(t)
	marker := fmt.Sprintf("nexd-e2e-restarted-%d", time.Now().UnixNano())
	svc := n.runWorkload(t, "--name", "svc", "--start-request", `{"limits":{"memory_max":"64M"}}`, "--", "/bin/sh", "-c", "sleep 600; :", marker).ID
	limitFile := ""
	if n.cgroup != "" {
		limitFile = filepath.Join(n.cgroup, "workloads", svc, "memory.limit_in_bytes")
	}
	var before []int
	testkit.EventuallyWithin(t, 60*time.Second, "the service runs with its sleep", func() bool {
		before = shellsWithChild(marker)
		return len(before) == 1
	})
	first := nexletPID(n.cmd.Process.Pid)
	if first == 0 {
		t.Fatal("native nexlet not found")
	}
	syscall.Kill(first, syscall.SIGKILL)
	var second int
	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet runs and has the service again", func() bool {
		second = nexletPID(n.cmd.Process.Pid)
		return second != 0 && second != first && slices.ContainsFunc(n.workloads(t), func(w control.Workload) bool {
			return w.ID == svc && w.State == string(protocol.WorkloadRunning)
		})
	})
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if st := procStatus(second, "State"); st == "" || strings.HasPrefix(st, "Z") {
		t.Fatalf("the restarted native nexlet %d did not outlive nexd (state %q)", second, st)
	}
	const limit = "67108864"
	if limitFile != "" {
		if got := readTrim(limitFile); got != limit {
			t.Fatalf("the service's memory limit is %q, want %s", got, limit)
		}
		if err := os.WriteFile(limitFile, []byte("-1"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	testkit.EventuallyWithin(t, 60*time.Second, "the service listed running, the same process", func() bool {
		return slices.ContainsFunc(n2.workloads(t), func(w control.Workload) bool {
			return w.ID == svc && w.State == string(protocol.WorkloadRunning)
		}) && slices.Equal(markerPIDs(marker), before)
	})
	if p := nexletPID(n2.cmd.Process.Pid); p != 0 {
		t.Fatalf("the new nexd started a native nexlet (%d) instead of adopting %d", p, second)
	}
	if limitFile != "" {
		testkit.EventuallyWithin(t, 30*time.Second, "the service's memory limit written again by the adopted nexlet", func() bool {
			return readTrim(limitFile) == limit
		})
	}
	if st := procStatus(second, "State"); st == "" || strings.HasPrefix(st, "Z") {
		t.Fatalf("the restarted native nexlet %d is gone after the adoption", second)
	}
}

// installNexd copies the nexd binary to path through a temporary file and a rename, as
// a package manager installs it: a new file (inode) at the same path.
func installNexd(t *testing.T, path string) {
	t.Helper()
	// cp writes the copy, not this process: a child another parallel test forks
	// would inherit a write descriptor held here until its exec, and the node's exec
	// of the copy would fail with "text file busy" (seen in CI).
	tmp := path + ".new"
	if out, err := exec.Command("cp", nexdBin(t), tmp).CombinedOutput(); err != nil {
		t.Fatalf("copy nexd: %v: %s", err, out)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestUpgradeHandsOverAdoptedNexlet: after a live_restore restart the native nexlet is
// not nexd's child; an upgrade (the binary replaced, then nexctl node reexec) still
// replaces it with a nexlet of the new binary, which takes its workloads over: the
// service keeps its process and a job that ends after the hand-over has its exit code
// reported (its end went to init; nexd learnt it from the process events).
func TestUpgradeHandsOverAdoptedNexlet(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("process events need root")
	}
	t.Parallel()
	bin := filepath.Join(t.TempDir(), "nexd")
	installNexd(t, bin)
	s := testnats.Start(t, testnats.Options{})
	opts := nodeOpts{external: s.ClientURL(), stateDir: t.TempDir(), bin: bin, extra: []string{"--live-restore", "--state", "kv"}}
	n := startNode(t, opts)
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	stopped, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)
	svc, marker, before, job, release := runSvcAndJob(t, n, "upgrade", 6)
	old := nexletPID(n.cmd.Process.Pid)
	if old == 0 {
		t.Fatal("native nexlet not found")
	}
	n2 := n.restart(t, opts)
	if nexletPID(n2.cmd.Process.Pid) != 0 || procStatus(old, "State") == "" {
		t.Fatalf("the nexlet %d was not adopted", old)
	}

	installNexd(t, bin) // the upgrade
	n2.mustCtl(t, "node", "reexec")
	testkit.EventuallyWithin(t, 60*time.Second, "the re-executed nexd ready again", func() bool {
		return strings.Count(n2.out.String(), "nex node ready") >= 2
	})
	n2.waitReady(t)
	var fresh int
	testkit.EventuallyWithin(t, 60*time.Second, "a nexlet of the new binary, the old one gone, the service listed running with the same process", func() bool {
		fresh = nexletPID(n2.cmd.Process.Pid)
		st := procStatus(old, "State")
		return fresh != 0 && (st == "" || strings.HasPrefix(st, "Z")) &&
			slices.ContainsFunc(n2.workloads(t), func(w control.Workload) bool {
				return w.ID == svc && w.State == string(protocol.WorkloadRunning)
			}) && slices.Equal(markerPIDs(marker), before)
	})
	if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", fresh)); strings.HasSuffix(exe, "(deleted)") {
		t.Fatalf("the new nexlet runs %s", exe)
	}
	if !strings.Contains(n2.out.String(), "handing its workloads to a new one") {
		t.Fatalf("no hand-over in the log:\n%s", n2.out.String())
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ev := awaitStopped(t, stopped, job, 60*time.Second)
	if ev.Metadata["exit_code"] != "6" {
		t.Errorf("the job was reported with %+v, want exit code 6", ev)
	}
}

// TestEmbeddedJobEndsWhileDown: the packaged set-up (embedded NATS, live_restore): a job
// that ends while nexd is stopped (its nexlet cannot reach any NATS server meanwhile) is
// reported once the next nexd adopts the nexlet: it leaves the node's state, and it ran
// once.
func TestEmbeddedJobEndsWhileDown(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	opts := nodeOpts{stateDir: t.TempDir(), extra: []string{"--live-restore", "--state", "kv"}}
	n := startNode(t, opts)
	st := n.waitReady(t)
	release := filepath.Join(testkit.PublicDir(t), "release")
	job := n.runWorkload(t, "--name", "j7", "--lifecycle", "job", "--",
		"/bin/sh", "-c", `while [ ! -e "$0" ]; do sleep 0.05; done; exit 7`, release).ID
	testkit.EventuallyWithin(t, 60*time.Second, "the job runs", func() bool { return len(markerPIDs(release)) == 1 })
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the job ended while nexd was stopped", func() bool { return len(markerPIDs(release)) == 0 })
	opts.cgroup = n.cgroup
	n2 := startNode(t, opts)
	n2.waitReady(t)
	testkit.EventuallyWithin(t, 60*time.Second, "the job that ended while nexd was stopped left the node's state", func() bool {
		return !strings.Contains(n2.mustCtl(t, "node", "state", st.NodeID), job)
	})
}

// runSvcAndJob runs a service (found by its marker argument) and a job that exits with
// code once the file release exists, and waits until both run. It returns the service's
// id, marker and pids, then the job's id and release file.
// awaitStopped returns the WORKLOADSTOPPED event of workload id on sub (a subscription
// to the events feed), skipping others', waiting up to within.
func awaitStopped(t *testing.T, sub *nats.Subscription, id string, within time.Duration) protocol.WorkloadStoppedEvent {
	t.Helper()
	var ev protocol.WorkloadStoppedEvent
	testkit.EventuallyWithin(t, within, "the WORKLOADSTOPPED of "+id, func() bool {
		m, err := sub.NextMsg(time.Second)
		if err != nil {
			return false
		}
		ev = protocol.WorkloadStoppedEvent{}
		json.Unmarshal(m.Data, &ev)
		return ev.ID == id
	})
	return ev
}

func runSvcAndJob(t *testing.T, n *node, kind string, code int) (svc, marker string, before []int, job, release string) {
	t.Helper()
	marker = fmt.Sprintf("nexd-e2e-%s-%d", kind, time.Now().UnixNano())
	svc = n.runWorkload(t, "--name", "svc", "--", "/bin/sh", "-c", "sleep 600; :", marker).ID
	release = filepath.Join(testkit.PublicDir(t), "release")
	job = n.runWorkload(t, "--name", "job", "--lifecycle", "job", "--",
		"/bin/sh", "-c", fmt.Sprintf(`while [ ! -e "$0" ]; do sleep 0.05; done; exit %d`, code), release).ID
	testkit.EventuallyWithin(t, 60*time.Second, "the service (with its sleep) and the job run", func() bool {
		before = shellsWithChild(marker)
		return len(before) == 1 && len(markerPIDs(release)) == 1
	})
	return svc, marker, before, job, release
}
