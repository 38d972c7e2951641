package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// probeResult is what e2e/testdata/sockprobe says it got.
type probeResult struct {
	DialErr     string `json:"dial_err"`
	RegisterErr string `json:"register_err"`
	Registered  bool   `json:"registered"`
	Requests    int    `json:"requests"`
	Closed      bool   `json:"closed"`
}

// TestAttackAdoptedNexletSocket: nexd serves a socket on which the native nexlet it
// adopted (after a restart with live_restore) takes its channel (registration, feeds,
// start requests). Processes that pose as that nexlet there get nothing: the test
// process's own child (root, nexd's uid, another pid) and a process of another uid
// connect, say they serve starts, send a feed batch with a forged line in the victim
// workload's log and register under the nexlet's agent id. nexd closes each connection
// at once, logs the refusal with the peer's pid and uid and counts it
// (nexd_nexlet_socket_refused_total); no forged line reaches the workload's log feed,
// the real nexlet keeps its channel, and a deploy after the attempts runs on it. The
// other uid cannot even reach the socket in its 0700 directory; it is let through the
// directory for the second attempt, as a misconfigured runtime directory would, to show
// the peer check's refusal of its uid.
func TestAttackAdoptedNexletSocket(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	probe := bins.Path(t, "./testdata/sockprobe") // in a directory every uid may read
	srv, acct, sigSeed, creds := operatorNATS(t)
	url := srv.ClientURL()
	state := t.TempDir()
	opts := nodeOpts{external: url, stateDir: state, extra: signingFlags(creds, sigSeed, acct, "--state", "kv", "--live-restore")}
	n := startNode(t, opts)
	n.waitReady(t)
	victim := n.runWorkload(t, "--nats.creds-file", creds, "--bids", "1", "--name", "victim", "--", "/bin/sleep", "600")
	n = n.restart(t, opts)
	if !testkit.WaitFor(30*time.Second, func() bool {
		return strings.Contains(n.out.String(), "adopted nexlet connected on its socket")
	}) {
		t.Fatalf("the adopted nexlet did not connect on nexd's socket\n%s", n.out.String())
	}
	native := n.native(t)
	c := control.NewClient(n.socket)
	defer c.Close()
	st, err := statusWithin(t.Context(), c)
	if err != nil {
		t.Fatal(err)
	}
	ns := ""
	for _, w := range n.workloads(t) {
		if w.ID == victim.ID {
			ns = w.Namespace
		}
	}
	if ns == "" {
		t.Fatalf("workload %s not listed after the restart", victim.ID)
	}

	nc, err := nats.Connect(url, nats.UserCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	var forged atomic.Int32
	if _, err := nc.Subscribe("$NEX.FEED.*.logs."+victim.ID+".>", func(m *nats.Msg) {
		if strings.Contains(string(m.Data), "forged") {
			forged.Add(1)
		}
	}); err != nil {
		t.Fatal(err)
	}
	flush(t, nc)

	sock := filepath.Join(state, "run", "supervise", "nexlets.sock")
	args := []string{sock, protocol.LogSubject(ns, victim.ID, "stdout"), protocol.RegisterSubject(st.NodeID, native.AgentID), "3s"}
	pose := func(cmd *exec.Cmd) probeResult {
		t.Helper()
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("sockprobe: %v: %s", err, out)
		}
		var res probeResult
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("sockprobe said %q: %v", out, err)
		}
		return res
	}
	refused := func(who string, res probeResult) {
		t.Helper()
		t.Logf("%s: %+v", who, res)
		if res.DialErr != "" || !res.Closed || res.Registered || res.Requests > 0 {
			t.Errorf("%s was not refused at once: %+v", who, res)
		}
	}

	// The same uid as nexd (root here), another process.
	same := exec.Command(probe, args...)
	refused("a process of nexd's uid", pose(same))
	if !strings.Contains(n.out.String(), fmt.Sprintf("pid=%d", same.Process.Pid)) {
		t.Errorf("the refusal of pid %d is not logged\n%s", same.Process.Pid, n.out.String())
	}

	// Another uid: the directory keeps it out.
	u := testkit.NewUser(t)
	res := pose(u.Command(probe, args...))
	if !strings.Contains(res.DialErr, "permission denied") {
		t.Errorf("another uid reached the socket: %+v", res)
	}
	// Let through the directories (the state directory and the test's temporary
	// ones are 0700 too), the peer check refuses its uid.
	for dir := filepath.Dir(sock); dir != os.TempDir() && dir != "/"; dir = filepath.Dir(dir) {
		fi, err := os.Stat(dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(dir, fi.Mode().Perm()|0o011); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = os.Chmod(dir, fi.Mode().Perm()) })
	}
	if err := os.Chmod(sock, 0o666); err != nil {
		t.Fatal(err)
	}
	refused("a process of another uid", pose(u.Command(probe, args...)))
	if !strings.Contains(n.out.String(), fmt.Sprintf("uid=%d", u.UID)) {
		t.Errorf("the refusal of uid %d is not logged\n%s", u.UID, n.out.String())
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	metrics, err := c.Metrics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(metrics), "nexd_nexlet_socket_refused_total 2") {
		t.Errorf("want 2 refusals counted; metrics:\n%s", grepLines(string(metrics), "socket"))
	}

	// The real nexlet keeps its channel: a deploy runs on it, over the socket.
	w := n.runWorkload(t, "--nats.creds-file", creds, "--bids", "1", "--name", "after", "--", "/bin/sleep", "600")
	running := false
	for _, x := range n.workloads(t) {
		running = running || x.ID == w.ID && x.State == "running"
	}
	if !running {
		t.Errorf("the deploy after the attempts does not run: %+v", n.workloads(t))
	}
	time.Sleep(500 * time.Millisecond) // a forged line would have come by now
	if k := forged.Load(); k > 0 {
		t.Errorf("%d forged lines reached the victim's log feed", k)
	}
}
