package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestUpstreamNexletJobNotRerunAfterCrash (fault, real processes): a supervised nexlet
// on upstream's wire (testdata/upnexlet: unsigned_registration, its end said only as
// WORKLOADSTOPPED on $NEX.FEED, which the embedded server refuses without
// allow_nexlet_direct_feeds) runs a job that ends; the nexlet is then killed and nexd
// starts it again. Before, the node never heard the end and handed the job back to
// the new process, which ran it a second time; now the node hears the end by listing
// the nexlet, and the job runs once.
func TestUpstreamNexletJobNotRerunAfterCrash(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	bin := bins.Path(t, "./testdata/upnexlet")                 // in a directory every uid may read
	log := filepath.Join(testkit.PublicDir(t), "upnexlet.log") // nexd may run the nexlet as a dynamic uid
	testkit.WriteFile(t, log, "")
	if err := os.Chmod(log, 0o666); err != nil {
		t.Fatal(err)
	}
	agents, _ := json.Marshal([]map[string]any{{"uri": "file://" + bin, "argv": []string{log}, "unsigned_registration": true}})
	n := startNode(t, nodeOpts{env: []string{"NEX_AGENTS=" + string(agents)}})
	n.waitReady(t)
	lines := func(prefix string) []string {
		b, _ := os.ReadFile(log)
		var out []string
		for l := range strings.SplitSeq(string(b), "\n") {
			if rest, ok := strings.CutPrefix(l, prefix); ok {
				out = append(out, rest)
			}
		}
		return out
	}
	job := n.runWorkload(t, "--type", "up", "--name", "job", "--lifecycle", "job", "--", "/bin/true")
	// Bounded, not failing here: the count below is the test (before, no such line came).
	testkit.WaitFor(30*time.Second, func() bool {
		return strings.Contains(n.out.String(), "no longer lists it") && strings.Contains(n.out.String(), "workload_id="+job.ID)
	})
	pids := lines("pid ")
	if len(pids) != 1 {
		t.Fatalf("upnexlet started %d times before the kill, want 1", len(pids))
	}
	pid, _ := strconv.Atoi(pids[0])
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "upnexlet started again and registered", func() bool {
		regs := 0
		for l := range strings.SplitSeq(n.out.String(), "\n") {
			if strings.Contains(l, `msg="nexlet registered"`) && strings.Contains(l, " name=up ") {
				regs++
			}
		}
		return len(lines("pid ")) == 2 && regs == 2
	})
	time.Sleep(time.Second) // a replayed job would have started by now
	runs := 0
	for _, id := range lines("start ") {
		if id == job.ID {
			runs++
		}
	}
	if runs != 1 {
		t.Fatalf("the job started %d times, want 1 (its end unheard, the restarted nexlet got it back)\n%s", runs, n.out.String())
	}
}
