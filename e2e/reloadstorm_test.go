package e2e

import (
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestReloadDuringDeploysAndStops: SIGHUP (systemctl reload) every 20 ms while 8
// services are deployed and then stopped, four at a time: every deploy is answered
// with its id, each service runs once, every stop is answered, nothing is left
// running or listed, and nexd is the same process, reloaded and running.
func TestReloadDuringDeploysAndStops(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{})
	n.waitReady(t)
	n.waitNative(t)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	hups := 0
	wg.Go(func() {
		tk := time.NewTicker(20 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-stop:
				return
			case <-tk.C:
				if n.cmd.Process.Signal(syscall.SIGHUP) == nil {
					hups++
				}
			}
		}
	})
	const count = 8
	loops := make([]crashLoop, count)
	for i := range loops {
		loops[i] = newCrashLoop(t, "reload"+strconv.Itoa(i))
	}
	res := n.runWorkloads(t, count, func(i int) []string {
		c := loops[i]
		return []string{"--name", "reload" + strconv.Itoa(i), "--lifecycle", "service", "--",
			"/bin/sh", "-c", `echo run >> "$1"; while :; do sleep 0.05; done`, c.marker, c.runsFile}
	})
	testkit.EventuallyWithin(t, 60*time.Second, "every service runs", func() bool {
		for _, c := range loops {
			if c.runs() != 1 || len(c.mains()) != 1 {
				return false
			}
		}
		return true
	})
	if ws := n.workloads(t); len(ws) != count {
		t.Errorf("listed %d workloads, want %d", len(ws), count)
	}
	var swg sync.WaitGroup
	sem := make(chan struct{}, 4)
	for _, r := range res {
		swg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			if out, errOut, code := n.ctl(t, "workload", "stop", r.ID); code != 0 {
				t.Errorf("stop %s: exit %d: %s%s", r.ID, code, out, errOut)
			}
		})
	}
	swg.Wait()
	close(stop)
	wg.Wait()
	for i, c := range loops {
		if r, m := c.runs(), c.mains(); r != 1 || len(m) != 0 {
			t.Errorf("service %d: %d runs, processes %v after its stop; want 1 run, none", i, r, m)
		}
	}
	if ws := n.workloads(t); len(ws) != 0 {
		t.Errorf("listed %d workloads after the stops, want 0", len(ws))
	}
	select {
	case <-n.done:
		t.Fatalf("nexd exited during the reloads: %v", n.err)
	default:
	}
	reloads := strings.Count(n.out.String(), "configuration reloaded")
	t.Logf("%d SIGHUPs sent, %d reloads logged", hups, reloads)
	if reloads == 0 {
		t.Error("no reload logged")
	}
	n.waitReady(t)
}
