package e2e

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestFullRuntimeDirKeepsOrphansExitCode: nexd's runtime directory (the native nexlet's
// records, nexd's exit records of reaped orphans) is a small tmpfs, filled up while a
// service and a job run. The native nexlet is killed (-9) and the job then exits with
// code 5: nexd, the child subreaper, reaps it and must keep its exit status for the
// next nexlet, which reports it. Before, nexd's exit record needed a new file's space,
// which a full directory did not have: the next nexlet reported the job lost (exit
// code -1). The service runs on with the same process.
func TestFullRuntimeDirKeepsOrphansExitCode(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("mounts a tmpfs: needs root")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	run := filepath.Join(state, "run")
	if err := os.Mkdir(run, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mount("tmpfs", run, "tmpfs", 0, "size=16m,mode=0755"); err != nil {
		t.Skipf("tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = syscall.Unmount(run, syscall.MNT_DETACH) })
	opts := nodeOpts{external: s.ClientURL(), stateDir: state, extra: []string{"--state", "kv"}}
	n := startNode(t, opts)
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	stopped, _ := nc.SubscribeSync("$NEX.FEED.*.events.WORKLOADSTOPPED")
	flush(t, nc)

	svc, marker, before, job, release := runSvcAndJob(t, n, "fullrun", 5)
	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	fill := testkit.FillFS(t, run)
	defer os.Remove(fill)

	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the killed nexlet gone", func() bool {
		st := procStatus(nexlet, "State")
		return st == "" || strings.HasPrefix(st, "Z")
	})
	if err := os.WriteFile(release, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ev := awaitStopped(t, stopped, job, 90*time.Second)
	t.Logf("the job that ended while its nexlet was dead and the runtime directory full: %+v", ev.Metadata)
	if ev.Metadata["exit_code"] != "5" {
		t.Errorf("the job was reported with %+v, want exit code 5\n%s", ev, n.out.String())
	}
	testkit.EventuallyWithin(t, 60*time.Second, "the service listed running, the same process", func() bool {
		return slices.ContainsFunc(n.workloads(t), func(w control.Workload) bool {
			return w.ID == svc && w.State == string(protocol.WorkloadRunning)
		}) && slices.Equal(shellsWithChild(marker), before)
	})
	out := n.out.String()
	if c := strings.Count(out, "cannot record the exit of an orphaned workload"); c > 0 {
		t.Errorf("nexd could not record %d orphans' exits", c)
	}
	// What else the full directory refused, for the record.
	for line := range strings.SplitSeq(out, "\n") {
		if strings.Contains(line, "level=WARN") || strings.Contains(line, "level=ERROR") {
			t.Log(line)
		}
	}
}
