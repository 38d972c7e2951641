package e2e

import (
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestWorkloadGetsDefaultSIGPIPE: a workload starts with SIGPIPE at its default, as
// under a shell or systemd, so `producer | head` ends the producer quietly. The native
// nexlet must not let a write to its FIFO kill it, but an ignored signal survives
// execve: with the nexlet ignoring SIGPIPE, every workload did too, and a producer
// whose reader went away got EPIPE ("Broken pipe", exit 1) instead of the signal.
func TestWorkloadGetsDefaultSIGPIPE(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	nc := testnats.Connect(t, s)

	script := filepath.Join(testkit.PublicDir(t), "sigign.sh") // workloads run as dynamic uids
	testkit.WriteExecutable(t, script, "#!/bin/sh\nexec grep SigIgn /proc/self/status\n")
	logs, _ := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	flush(t, nc)
	n.runWorkload(t, "--name", "sigign", "--", script)
	msg, err := logs.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatal("no log line from the workload:", err)
	}
	line := string(msg.Data)
	// The line as written, or JSON-escaped ("SigIgn:\\t0000000000001000").
	m := regexp.MustCompile(`SigIgn:(?:\\t|\s)*([0-9a-f]+)`).FindStringSubmatch(line)
	if m == nil {
		t.Fatalf("workload output %q: no SigIgn line", line)
	}
	mask, err := strconv.ParseUint(m[1], 16, 64)
	if err != nil {
		t.Fatalf("workload output %q: %v", line, err)
	}
	const sigpipe = 13
	if mask&(1<<(sigpipe-1)) != 0 {
		t.Fatalf("the workload starts with SIGPIPE ignored (SigIgn %s)", m[1])
	}
}
