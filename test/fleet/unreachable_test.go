package fleet

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// bigExecutable writes /bin/sleep followed by a hole up to size bytes (the kernel
// ignores what follows the ELF's segments) into a directory every uid can enter, so a
// native nexlet spends a while hashing it before the start: the window in which the
// test cuts the link. Hashing reads the host's own disk, so nothing in the window
// needs the network.
func bigExecutable(t *testing.T, size int64) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix+strconv.Itoa(os.Getpid())+"exe")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe, err := os.ReadFile("/bin/sleep")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "bigsleep")
	if err := os.WriteFile(path, exe, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	return path
}

// workloadProcs are the processes in workload id's cgroup on h that run exe (the
// native nexlet's fork thread sits in a fresh workload's cgroup until it forks).
func workloadProcs(h *Host, id, exe string) []int {
	var out []int
	for _, pid := range h.WorkloadPIDs(id) {
		if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.HasPrefix(string(cmd), exe+"\x00") {
			out = append(out, pid)
		}
	}
	return out
}

// TestFleetDeployUnreachable: a client on host 1 deploys to host 3 (its tag); after
// the auction, while host 3's nexlet hashes the workload's executable (4 GiB, mostly a
// hole), host 3's link is pulled at the switch. The client must get a definitive
// "unknown: the node did not answer" naming host 3, with exit code 3, well before the
// deploy timeout, and must not try another node; the workload starts on host 3 anyway
// (its start was under way), and once the link is back `nexctl workload list` from
// host 1 shows it, running exactly once. Figures: time from the cut to the answer,
// time until the list shows the workload.
func TestFleetDeployUnreachable(t *testing.T) {
	f := startCluster(t, 3)
	fg := NewFigures(t, "deploy to a node that becomes unreachable mid-request")
	h1, h3 := f.Hosts[0], f.Hosts[2]
	if h3.Cgroup == "" {
		t.Skip("no cgroup v1 memory hierarchy: the test watches host 3's workload cgroups to cut the link mid-deploy")
	}
	exe := bigExecutable(t, 4<<30)
	wdir := filepath.Join(h3.Cgroup, "workloads")
	known := map[string]bool{}
	entries, _ := os.ReadDir(wdir)
	for _, e := range entries {
		known[e.Name()] = true
	}

	type result struct {
		stdout, stderr string
		code           int
		at             time.Time
	}
	done := make(chan result, 1)
	started := time.Now()
	go func() {
		out, errOut, code := h1.Ctl(h1.ClusterURLs(), "--json", "--nats.timeout", "5s", "workload", "run", "--name", "mid",
			"--tags", "host=h3", "--start-request", `{"uri":"file://`+exe+`","argv":["3600"]}`)
		done <- result{out, errOut, code, time.Now()}
	}()
	// The workload's cgroup appears when host 3's nexlet begins the start (before the
	// artifact download): the auction is over and the deploy request is on host 3.
	var wid string
	var cutAt time.Time
	for wid == "" {
		select {
		case r := <-done:
			t.Fatalf("the deploy ended before the cut: exit %d: %s %s", r.code, r.stdout, r.stderr)
		default:
		}
		if time.Since(started) > 60*time.Second {
			t.Fatal("host 3 never began the start")
		}
		entries, _ := os.ReadDir(wdir)
		for _, e := range entries {
			// Skip the native nexlet's fork pool groups (.forkpool-N, waiting threads).
			if e.IsDir() && !known[e.Name()] && !strings.HasPrefix(e.Name(), ".") {
				wid = e.Name()
			}
		}
		if wid == "" {
			time.Sleep(2 * time.Millisecond)
		}
	}
	h3.LinkDown()
	cutAt = time.Now()
	fg.Add("deploy request to the cut", cutAt.Sub(started).Round(time.Millisecond))
	fg.Add("workload processes on h3 at the cut", len(workloadProcs(h3, wid, exe)))

	var r result
	select {
	case r = <-done:
	case <-time.After(3 * time.Minute):
		t.Fatal("nexctl still waits 3 minutes after the cut")
	}
	fg.Add("nexctl's answer after the cut", r.at.Sub(cutAt).Round(100*time.Millisecond))
	fg.Add("nexctl exit code", r.code)
	var je struct {
		Error struct {
			Message  string `json:"message"`
			Kind     string `json:"kind"`
			ExitCode int    `json:"exit_code"`
		} `json:"error"`
	}
	_ = json.Unmarshal([]byte(strings.TrimSpace(r.stderr)), &je)
	fg.Add("nexctl's error", je.Error.Message)
	if r.code != 3 || je.Error.Kind != "unknown" || !strings.Contains(je.Error.Message, "unknown: the node did not answer") ||
		!strings.Contains(je.Error.Message, "h3") {
		t.Fatalf("deploy cut mid-request: exit %d, stdout %q, stderr %q; want exit 3 and 'unknown: the node did not answer' naming h3", r.code, r.stdout, r.stderr)
	}
	if strings.Contains(r.stderr, "trying the next bid") {
		t.Fatalf("nexctl tried another node: %s", r.stderr)
	}

	// The start was under way: host 3 finishes it on its own side of the partition.
	startedOnH3 := testkit.WaitFor(90*time.Second, func() bool { return len(workloadProcs(h3, wid, exe)) > 0 })
	fg.Add("workload started on h3 during the partition", startedOnH3)
	h3.LinkUp()
	healAt := time.Now()
	var listed time.Duration
	// Copies are counted in the list that shows the workload: nexctl's scatter-gather
	// ends 25 ms (--gather-stall) after the last answer, so a second list right after the
	// heal could miss host 3's answer (it did once: 0 copies, the workload running on
	// h3); a duplicate on another host is also seen in the kernel (below).
	var out string
	listedOK := testkit.WaitFor(120*time.Second, func() bool {
		o, _, code := h1.Ctl(h1.ClusterURLs(), "--json", "--nats.timeout", "3s", "workload", "list")
		if code == 0 && strings.Contains(o, wid) {
			listed, out = time.Since(healAt), o
			return true
		}
		return false
	})
	if listedOK {
		fg.Add("time until workload list from h1 shows it", listed.Round(100*time.Millisecond))
	} else {
		fg.Add("time until workload list from h1 shows it", "not within 120s")
	}
	copies := 0
	var ws []struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	_ = json.Unmarshal([]byte(out), &ws)
	for _, w := range ws {
		if w.Name == "mid" {
			copies++
		}
	}
	var kernel []string
	for _, h := range f.Hosts {
		if len(workloadProcs(h, wid, exe)) > 0 {
			kernel = append(kernel, h.Name)
		}
	}
	fg.Add("workloads named mid in the list / hosts running it (kernel)", fmt.Sprintf("%d / %v", copies, kernel))
	if !startedOnH3 || !listedOK || copies != 1 || len(kernel) != 1 {
		t.Fatalf("after healing: started on h3 %v, listed %v, %d copies in the list, kernel %v", startedOnH3, listedOK, copies, kernel)
	}
}
