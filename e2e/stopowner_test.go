package e2e

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestStopWhileNativeNexletRestarts: a service is stopped (nexctl workload stop
// --no-wait) while its native nexlet is between two lives: killed (-9) for the sixth
// time in a row, so the supervisor waits out a restart backoff of about 3 s before the
// next one. The node owns the service and keeps it in its state; the next nexlet gets
// it back by its replay and adopts it. The stop must reach that nexlet: the service
// ends and leaves node state. Before, the node asked the nexlets registered then (none
// of them had it), took "not found" as the stop's outcome, and the next nexlet ran the
// service on, listed: a stop not honoured (its client was told `stopping`, unrecorded).
func TestStopWhileNativeNexletRestarts(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv", "--agent-restart-limit", "20"}})
	n.waitReady(t)
	marker := fmt.Sprintf("nexd-e2e-stopowner-%d", time.Now().UnixNano())
	w := n.runWorkload(t, "--name", "svc", "--", "/bin/sh", "-c", "sleep 600; :", marker)
	testkit.EventuallyWithin(t, 30*time.Second, "the service runs", func() bool { return len(markerPIDs(marker)) > 0 })
	exits := func() int { return strings.Count(n.out.String(), `msg="nexlet exited, restarting"`) }
	killed := 0
	for k := 1; k <= 6; k++ {
		var pid int
		testkit.EventuallyWithin(t, 60*time.Second, "a native nexlet runs", func() bool {
			pid = nexletPID(n.cmd.Process.Pid)
			return pid != 0 && pid != killed
		})
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		killed = pid
		testkit.EventuallyWithin(t, 30*time.Second, "nexd sees the nexlet's end", func() bool { return exits() >= k })
	}
	out, errOut, code := n.ctl(t, "workload", "stop", "--no-wait", w.ID)
	t.Logf("the stop while the nexlet waits out its backoff: exit %d %q %q", code, strings.TrimSpace(out), strings.TrimSpace(errOut))
	testkit.EventuallyWithin(t, 30*time.Second, "the service gone once the next nexlet is back", func() bool {
		return len(markerPIDs(marker)) == 0
	})
	for _, x := range n.workloads(t) {
		if x.ID == w.ID {
			t.Fatalf("the stopped service is still listed: %+v", x)
		}
	}
}
