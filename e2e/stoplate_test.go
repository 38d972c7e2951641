package e2e

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestStopAnsweredByALateHolder: the node holding a workload answers its stop after
// another node's "not found" (a loaded node, as in a fresh-clone CI run): its stop is
// held (NEXD_TEST_HOLD=stop-late) until nexctl said (--verbose) that it took the other
// node's answer and still waits for the holder; then the test releases it. `nexctl
// workload stop` and `nexctl node lameduck --migrate` wait for the holder they know
// from the listing or the clone's answer and report the stop it made. Before, both
// ended --gather-stall (25 ms) after the other node's "not found": `workload stop` said
// the workload was not stopped, and the migrate that `clone … started, but the
// original … was not stopped: workload not found`, exit 1, while the holder had
// stopped it. Before, too, the hold ended a fixed 0.3 s after the stop's arrival, and
// then a second after the test saw the other node's "not found" on the bus: neither
// proved that nexctl had taken that answer by then.
func TestStopAnsweredByALateHolder(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	release := t.TempDir()
	// Both nodes start at once; the workloads go to a by its tag.
	a := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv", "--tags", "late=holder"},
		env: []string{testhold.Env + "=" + testhold.StopLate + "," + testhold.ReleaseIn(release)}})
	b := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv", "--tags", "late=other"}})
	ida, idb := a.waitReady(t).NodeID, b.waitReady(t).NodeID
	names := []string{"one", "svc"}
	runs := a.runWorkloads(t, len(names), func(i int) []string {
		return []string{"--name", names[i], "--tags", "late=holder", "--", "/bin/sleep", "600"}
	})
	one, svc := runs[0], runs[1]
	late := lateStop{holder: a, holderID: ida, other: idb, release: release}

	out, errOut, code := late.run(t, one.ID, "workload", "stop", one.ID)
	if code != 0 || !strings.Contains(out, "Workload "+one.ID+" successfully stopped") {
		t.Fatalf("stop of a workload whose node answers late: exit %d, %q %q", code, out, errOut)
	}

	out, errOut, code = late.run(t, svc.ID, "node", "lameduck", ida, "--migrate", "--delay", "30s")
	if code != 0 || !strings.Contains(out, "Migrated svc ["+svc.ID+"]") || !strings.Contains(out, "old copy stopped: true") {
		t.Fatalf("lameduck --migrate off a node that answers its stop late: exit %d, %q %q", code, out, errOut)
	}
	if ws := a.workloads(t); len(ws) != 0 {
		t.Fatalf("the draining node still runs %+v", ws)
	}
	ws := b.workloads(t)
	if len(ws) != 1 || ws[0].Name != "svc" || ws[0].ID == svc.ID {
		t.Fatalf("node b after the migration: %+v", ws)
	}
}

// lateStop runs nexctl stops whose holder (holderID) holds its stop of the workload
// (stop-late, released in release) while another node (other) answers "not found".
type lateStop struct {
	holder          *node
	holderID, other string
	release         string
}

// run runs nexctl --verbose args, which stop id, and releases the holder's stop once
// nexctl said it took the other node's "not found" and still waits for the holder: a
// nexctl that ended its wait on that answer (the bug) says no such thing and ends. It
// returns nexctl's output and exit code, having checked that the holder's stop was
// held until the test released it.
func (l lateStop) run(t *testing.T, id string, args ...string) (string, string, int) {
	t.Helper()
	// A release a last stop's hold did not take (its bound passed) is not this one's.
	if err := os.Remove(filepath.Join(l.release, testhold.StopLate)); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	from := len(l.holder.out.String())
	dir := t.TempDir()
	// --nats.timeout: the wait for the holder's word, well past the test's hold.
	full := append(append([]string{"--verbose", "--control-socket", l.holder.socket, "--nats.timeout", "60s"}, l.holder.natsArgs()...), args...)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, nexctlBin(t), full...)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + dir}
	cmd.Dir = dir
	var so, se testkit.Buffer
	cmd.Stdout, cmd.Stderr = &so, &se
	started := time.Now()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	code := func(err error) int {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode()
		}
		if err != nil {
			t.Fatalf("nexctl %v: %v", args, err)
		}
		return 0
	}
	// nexctl's own word that it took the other node's answer and waits on.
	waits := regexp.MustCompile(`nexctl: debug: stop of ` + id + `: node ` + l.other + ` answered \(` + regexp.QuoteMeta(protocol.ErrTextWorkloadNotFound) +
		`\); still waiting up to \S+ for node ` + l.holderID + `, which holds it`)
	poll := time.NewTicker(10 * time.Millisecond)
	defer poll.Stop()
	for !waits.MatchString(se.String()) {
		select {
		case err := <-done:
			t.Fatalf("nexctl %v ended before it said it still waits for the holder after another node's \"not found\" (its stop held): exit %d\nstdout: %s\nstderr: %s",
				args, code(err), so.String(), se.String())
		case <-ctx.Done():
			t.Fatalf("nexctl %v: it did not say within 90s that it waits for the holder after another node's \"not found\"\nstderr: %s", args, se.String())
		case <-poll.C:
		}
	}
	said := time.Since(started)
	if err := testhold.Release(l.release, testhold.StopLate); err != nil {
		t.Fatal(err)
	}
	c := code(<-done) // ctx's bound kills it at 90 s
	t.Logf("nexctl %v: said it waits for the holder after %s, ended %s after its start (exit %d)\n%s",
		args, said.Round(time.Millisecond), time.Since(started).Round(time.Millisecond), c, se.String())
	went := regexp.MustCompile(`msg="test hold: the stop of an owned workload goes on"[^\n]*\bworkload_id=` + id + ` hold=` + testhold.StopLate + ` released=(\w+)`)
	if m := went.FindStringSubmatch(l.holder.out.String()[from:]); m == nil || m[1] != "true" {
		t.Fatalf("nexctl %v: the holder's stop was not held until the test released it: %q", args, m)
	}
	return so.String(), se.String(), c
}
