package native

import (
	"os"
	"path/filepath"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// pidfdsOf counts this process's pidfds that name pid (/proc/self/fdinfo's Pid line).
func pidfdsOf(pid int) int {
	ents, _ := os.ReadDir("/proc/self/fdinfo")
	want := "Pid:\t" + strconv.Itoa(pid) + "\n"
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc/self/fdinfo", e.Name()))
		if err == nil && strings.Contains(string(b), want) {
			n++
		}
	}
	return n
}

// TestReplayOfHeldWorkloadHoldsNoPidfd: a replay of a workload the nexlet holds and
// runs (each registration's, after nexd's restart) sets its limits again through a
// sandbox made for it (limitAgain). Without cgroups that sandbox is a process group
// found from the pid record, which holds its leader's pidfd (procid.NewPgrp), and it
// was dropped without Close: one descriptor more per replay and held workload until
// a garbage collection, never with go_gc_percent < 0 (GOGC=off). Now it is let go.
func TestReplayOfHeldWorkloadHoldsNoPidfd(t *testing.T) {
	n := benchNexlet(t, 0)
	if n.iso.mode() != "none" {
		t.Skipf("isolation %s: the process group's sandbox is the none mode's", n.iso.mode())
	}
	run := map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "exec sleep 600"}}
	startServices(t, n, "replayfd", 1, run)
	id := "replayfd0"
	var pid int
	testkit.Eventually(t, "the workload runs", func() bool {
		n.mu.Lock()
		defer n.mu.Unlock()
		if w := n.workloads[id]; w != nil && w.pid > 0 && w.state == protocol.WorkloadRunning {
			pid = w.pid
		}
		return pid > 0
	})
	// No collection meanwhile: a dropped *os.File's finalizer would close it.
	defer debug.SetGCPercent(debug.SetGCPercent(-1))
	before := pidfdsOf(pid)
	const replays = 10
	req := startReq(protocol.LifecycleService, id, run, protocol.NatsConnectionData{NatsServers: []string{"nats://127.0.0.1:4222"}})
	for range replays {
		if _, err := n.StartWorkload(id, &req, true); err != nil {
			t.Fatal(err)
		}
	}
	if after := pidfdsOf(pid); after != before {
		t.Errorf("%d replays of a held running workload: the nexlet holds %d pidfds of its process, %d before", replays, after, before)
	}
}
