package bench

import (
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestMain lets the test binary serve as the hop variant's floor-starter, which
// startFloorHop runs as its own executable (nexbench's Main does the same).
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == floorStarterCmd {
		os.Exit(runFloorStarter(os.Args[2:], os.Stderr))
	}
	os.Exit(m.Run())
}

// A deploy the floor node handles once its stop has begun (its NATS handlers run until
// the connection closes, after stopAll: a request that arrived with the SIGTERM) starts
// nothing: before, its process was started into a map stopAll had already emptied, so
// nothing ended it, and the starter's close waited for it (a day's sleep) until the
// floor node was killed, leaving the workload running.
func TestFloorDeployAfterStopStartsNothing(t *testing.T) {
	ns, err := startNATS(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Shutdown()
	nc, err := dial(ns.URL(), "floor-test")
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	st, err := newFloorStarter(floorVariant{}, os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	f := &floorNode{nc: nc, ns: "system", ws: map[string]*floorProc{}, st: st}
	f.stopAll()
	req, _ := json.Marshal(workloadSpec{Kind: "sh"}.request("system", "late"))
	f.deploy(&nats.Msg{Subject: protocol.DeploySubject("system", floorBidder), Data: req})
	f.mu.Lock()
	left := f.ws
	f.ws = map[string]*floorProc{}
	f.mu.Unlock()
	for id, p := range left {
		t.Errorf("workload %s (pid %d) started after the floor node's stop", id, p.id.PID)
		_, _ = p.group.Kill()
		p.group.Close()
		<-p.reaped
		<-p.read
	}
	st.close()
}

// floorForTest is a floor node's handlers on a NATS server of the test's own, starting
// workloads in this process or, with hop, through a floor-starter (this test binary,
// TestMain); all of it ends with t.
func floorForTest(t *testing.T, hop bool) *floorNode {
	t.Helper()
	ns, err := startNATS(t.TempDir(), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Shutdown)
	nc, err := dial(ns.URL(), "floor-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	f := &floorNode{nc: nc, ns: "system", ws: map[string]*floorProc{}}
	if hop {
		if f.hop, err = startFloorHop(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.hop.close)
	} else {
		if f.st, err = newFloorStarter(floorVariant{}, os.Getpid()); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(f.st.close)
	}
	t.Cleanup(f.stopAll) // first: what the test left running
	return f
}

// floorDeploy deploys /bin/sh -c script to f and returns its workload.
func floorDeploy(t *testing.T, f *floorNode, script string) (p *floorProc, id string) {
	t.Helper()
	rr, _ := json.Marshal(map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", script}})
	req, _ := json.Marshal(protocol.StartWorkloadRequest{Name: "w", Namespace: "system", RunRequest: string(rr),
		WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "native"})
	f.deploy(&nats.Msg{Subject: protocol.DeploySubject("system", floorBidder), Data: req})
	f.mu.Lock()
	defer f.mu.Unlock()
	for k, v := range f.ws {
		return v, k
	}
	t.Fatal("the deploy started nothing")
	return nil, ""
}

// floorVariants runs test once with workloads started by the floor node itself and
// once through its starter (hop).
func floorVariants(t *testing.T, test func(t *testing.T, hop bool)) {
	t.Run("started", func(t *testing.T) { test(t, false) })
	t.Run("hop", func(t *testing.T) { test(t, true) })
}

// TestFloorStopSparesRecycledNumber: a floor node's workload ended by itself and was
// reaped (by the floor node; with hop, by its starter), and its pid, and with it its
// process group's number, went to a stranger's group leader with a child before the
// workload's stop. The stop signalled kill(-pid): SIGTERM to the stranger's group, 2
// of 2 killed. Now its SIGTERM goes to the workload's process by its identity and its
// SIGKILL through the leader's pidfd (procid.Pgrp), the ended group's: none.
func TestFloorStopSparesRecycledNumber(t *testing.T) {
	floorVariants(t, func(t *testing.T, hop bool) {
		if !testkit.InPidNamespace(t) {
			return
		}
		f := floorForTest(t, hop)
		p, id := floorDeploy(t, f, "echo "+readyLine) // ends by itself
		<-p.read                                      // its output ended: it exited
		n := p.id.PID
		if !testkit.WaitFor(5*time.Second, func() bool { _, err := procid.ReadStat(n); return err != nil }) {
			t.Fatalf("the workload's process %d was not reaped", n)
		}
		child := testkit.StrangerGroupAt(t, n)
		f.undeploy(&nats.Msg{Subject: protocol.UndeploySubject("system", id)})
		if killed := testkit.KilledOf(n, child); killed != 0 {
			t.Fatalf("the stop of the ended workload killed %d of 2 processes of a stranger's group given its pid %d", killed, n)
		}
	})
}

// TestFloorStopKillsWhatItLeft: the stop of a running workload whose process left
// another in its process group (holding its output open) ends both: the SIGTERM ends
// the workload's process, and the group's SIGKILL, through the leader's pidfd once it
// exited (with hop, a pidfd of the starter's child tells the floor node), what it left.
func TestFloorStopKillsWhatItLeft(t *testing.T) {
	floorVariants(t, func(t *testing.T, hop bool) {
		f := floorForTest(t, hop)
		pidFile := t.TempDir() + "/member"
		p, id := floorDeploy(t, f, "sleep 3600 & echo $! > "+pidFile+"; echo "+readyLine+"; exec sleep 3600")
		var member int
		testkit.EventuallyWithin(t, 5*time.Second, "the member's pid written", func() bool {
			b, err := os.ReadFile(pidFile)
			if err != nil {
				return false
			}
			member, err = strconv.Atoi(strings.TrimSpace(string(b)))
			return err == nil
		})
		t.Cleanup(func() { _ = syscall.Kill(member, syscall.SIGKILL) })
		start := time.Now()
		f.undeploy(&nats.Msg{Subject: protocol.UndeploySubject("system", id)})
		t.Logf("stop of a workload and its group's member: %v", time.Since(start))
		for _, pid := range []int{p.id.PID, member} {
			testkit.EventuallyWithin(t, 5*time.Second, "process "+strconv.Itoa(pid)+" killed", func() bool { return !testkit.Running(pid) })
		}
	})
}
