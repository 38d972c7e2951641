package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestNexctlLogsHistory: a node with log_stream keeps a finished job's output in
// NEX_LOGS; `workload logs --tail` reads it from another host's point of view (no
// control socket, only NATS), and from the node's own buffer on its host. Without a
// stream the error says how to enable one.
func TestNexctlLogsHistory(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--log-stream", "--log-stream-max-age", "1h"}})
	n.waitReady(t)
	job := n.runWorkload(t, "--name", "counter", "--lifecycle", "job", "--", "/bin/sh", "-c", "for i in 1 2 3 4 5; do echo line$i; done; echo oops >&2")

	remote := func(args ...string) (string, string, int) {
		// No control socket: only the stream can answer.
		return run(t, []string{"NEX_CONTROL_SOCKET=/nonexistent/nexd.sock"}, nexctlBin(t),
			append([]string{"--nats.servers", s.ClientURL(), "workload", "logs"}, args...)...)
	}
	var out, errOut string
	var code int
	testkit.EventuallyWithin(t, 30*time.Second, "the job's output in the stream", func() bool {
		out, errOut, code = remote(job.ID, "--tail", "10")
		return code == 0 && strings.Contains(out, "line5") && strings.Contains(errOut, "oops")
	})
	// stdout and stderr are separate pipes: only the order within each is fixed.
	out, errOut, code = remote(job.ID, "--tail", "3")
	lines := strings.Count(out, "\n") + strings.Count(errOut, "oops\n")
	if code != 0 || lines != 3 || !strings.HasSuffix(out, "line4\nline5\n") {
		t.Errorf("--tail 3 from the stream: exit %d, stdout %q, stderr %q", code, out, errOut)
	}
	out, _, code = remote(job.ID, "--since", "1h", "--json")
	if code != 0 || strings.Count(out, `"stream":"stdout"`) != 5 || strings.Count(out, `"stream":"stderr"`) != 1 {
		t.Errorf("--since 1h --json: exit %d\n%s", code, out)
	}
	// On the node's host the node's own log has it too.
	out, _, code = n.ctl(t, "workload", "logs", job.ID, "--tail", "2")
	if code != 0 || !strings.Contains(out, "line5") {
		t.Errorf("--tail 2 on the node's host: exit %d %q", code, out)
	}

	bare := testnats.Start(t, testnats.Options{})
	_, errOut, code = run(t, []string{"NEX_CONTROL_SOCKET=/nonexistent/nexd.sock"}, nexctlBin(t),
		"--nats.servers", bare.ClientURL(), "workload", "logs", "W0000000000000000000", "--tail", "5")
	if code != 1 || !strings.Contains(errOut, "set log_stream = true") {
		t.Errorf("no stream: exit %d %q", code, errOut)
	}
}
