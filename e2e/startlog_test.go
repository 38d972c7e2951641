package e2e

import (
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestStartupLogSaysEachThingOnce starts the README's first node (embedded NATS, the
// native nexlet) and reads its log from exec to stop: no message appears twice, and no
// fact is told by two messages. Before, a start logged "nexlet registered" twice (nexd's
// and the native nexlet's own, which nexd's log carries), the cgroup mode twice ("cgroup
// mode" from detection, then "cgroups") and the embedded NATS server's reason twice
// ("no NATS configured: using an embedded NATS server" beside the configuration's
// warning "no NATS configured (...)").
func TestStartupLogSaysEachThingOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{})
	n.waitReady(t)
	n.waitNative(t)
	// The native nexlet logs its registration after nexd saw it healthy at the latest.
	time.Sleep(500 * time.Millisecond)
	n.signal(t, syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(60 * time.Second):
		t.Fatal("nexd did not stop within 60 s of SIGTERM")
	}
	out := n.out.String()
	msgRE := regexp.MustCompile(`msg=("(?:[^"\\]|\\.)*"|\S+)`)
	seen := map[string]int{}
	var msgs []string
	for _, line := range strings.Split(out, "\n") {
		m := msgRE.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		msg := strings.Trim(m[1], `"`)
		seen[msg]++
		msgs = append(msgs, msg)
	}
	if seen["nexlet registered"] == 0 || seen["nex node ready"] == 0 {
		t.Fatalf("the log lacks the start's lines:\n%s", out)
	}
	for msg, k := range seen {
		if k > 1 {
			t.Errorf("%q logged %d times", msg, k)
		}
	}
	count := func(prefix string) int {
		k := 0
		for _, m := range msgs {
			if strings.HasPrefix(m, prefix) {
				k++
			}
		}
		return k
	}
	if k := count("cgroup"); k != 1 {
		t.Errorf("the cgroup mode is told by %d messages, want 1", k)
	}
	if k := count("no NATS configured"); k != 1 {
		t.Errorf("the missing NATS configuration is told by %d messages, want 1", k)
	}
	if t.Failed() {
		t.Logf("messages: %q", msgs)
	}
}
