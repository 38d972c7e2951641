package e2e

import (
	"encoding/json"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestNexdKilledDuringDrain: nexd is killed (-9) during its lame duck drain, while a
// service that ignores SIGTERM waits out its stop grace (the drain stopped it; the
// native nexlet, which outlives nexd, kills it after the grace). The next nexd (the
// same state: systemd's restart) must not start the drained service again, nor the
// fast one the drain had already stopped.
func TestNexdKilledDuringDrain(t *testing.T) {
	n, dir := startKVNode(t)
	deaf := newCrashLoop(t, "draindeaf")
	fast := newCrashLoop(t, "drainfast")
	for _, c := range []*crashLoop{&deaf, &fast} {
		script := `echo run >> "$1"; trap '' TERM; while :; do sleep 0.05; done`
		if c == &fast {
			script = `echo run >> "$1"; while :; do sleep 0.05; done`
		}
		req, _ := json.Marshal(map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", script, c.marker, c.runsFile}, "stop_grace": "4s"})
		c.id = n.runWorkload(t, "--name", "drain", "--lifecycle", "service", "--start-request", string(req)).ID
	}
	testkit.EventuallyWithin(t, 60*time.Second, "both run", func() bool {
		return deaf.runs() == 1 && fast.runs() == 1 && len(deaf.mains()) == 1 && len(fast.mains()) == 1
	})
	waitTrapped(t, "the deaf service", deaf.mains)
	n.mustCtl(t, "lameduck", "--delay", "0s")
	testkit.EventuallyWithin(t, 30*time.Second, "the drain under way: the fast one stopped", func() bool {
		return len(fast.mains()) == 0
	})
	n.signal(t, syscall.SIGKILL)
	n.wait(t, 30*time.Second)
	testkit.EventuallyWithin(t, 30*time.Second, "the deaf one killed after its grace", func() bool { return len(deaf.mains()) == 0 })

	n2 := startNode(t, nodeOpts{stateDir: dir, cgroup: n.cgroup, extra: []string{"--state", "kv"}})
	n2.waitReady(t)
	time.Sleep(3 * time.Second)
	again := 0
	for _, c := range []crashLoop{deaf, fast} {
		if c.runs() != 1 || len(c.mains()) != 0 {
			again++
			t.Logf("%s: %d runs, processes %v", c.id, c.runs(), c.mains())
		}
	}
	t.Logf("drained services started again by the next nexd: %d of 2", again)
	if again != 0 {
		t.Errorf("%d of 2 drained services ran again after nexd was killed during the drain", again)
	}
}
