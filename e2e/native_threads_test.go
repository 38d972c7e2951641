package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// procStatus reads one field of /proc/<pid>/status.
func procStatus(pid int, field string) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			return strings.TrimSpace(v)
		}
	}
	return ""
}

// nexletPID finds the native nexlet: a child of nexd running `nexd nexlet native`.
func nexletPID(parent int) int {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || procStatus(pid, "PPid") != strconv.Itoa(parent) {
			continue
		}
		b, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if strings.Contains(string(b), "nexlet\x00native") {
			return pid
		}
	}
	return 0
}

// TestNativeThreadsStayFew: the native nexlet waits for its workloads through pidfds
// and the netpoller, so 60 running workloads do not cost it 60 OS threads.
func TestNativeThreadsStayFew(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	const count, maxThreads = 60, 30
	n := startNode(t, nodeOpts{})
	n.waitReady(t)
	pid := nexletPID(n.cmd.Process.Pid)
	if pid == 0 {
		t.Fatal("native nexlet process not found")
	}
	marker := fmt.Sprintf("nexd-e2e-threads-%d", time.Now().UnixNano())
	n.runWorkloads(t, count, func(i int) []string {
		return []string{"--bids", "1", "--name", fmt.Sprintf("t%d", i), "--", "/bin/sh", "-c", "sleep 600; :", marker}
	})
	testkit.EventuallyWithin(t, 60*time.Second, "all workloads running", func() bool { return countProcs(marker) == count })
	threads, err := strconv.Atoi(procStatus(pid, "Threads"))
	if err != nil {
		t.Fatalf("threads of the nexlet (pid %d): %v", pid, err)
	}
	t.Logf("native nexlet: %d OS threads with %d workloads running", threads, count)
	if threads >= maxThreads {
		t.Errorf("native nexlet has %d OS threads with %d workloads: want fewer than %d", threads, count, maxThreads)
	}
	n.signal(t, syscall.SIGTERM)
	n.wait(t, 90*time.Second)
	if c := countProcs(marker); c != 0 {
		t.Fatalf("%d workload processes survived the stop", c)
	}
}
