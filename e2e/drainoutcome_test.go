package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNexctlLameduckWaitDrainFailed: a node whose drain ends with an error (its echo
// nexlet frozen: the drain's lists stay partial) tells nexctl so, and
// `node lameduck --wait` exits 1 with the node's reason, naming the nexlet (--json:
// outcome failed and the reason). Before, nexctl could only say the node was not known
// to be drained.
func TestNexctlLameduckWaitDrainFailed(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n, id := echoNode(t, s)
	n.runWorkload(t, "--name", "sleeper", "--", "/bin/sleep", "600")
	echo := n.freezeEcho(t)
	out, errOut, code := n.ctl(t, "--json", "node", "lameduck", id, "--delay", "500ms", "--wait")
	var res struct {
		Drained bool   `json:"drained"`
		Outcome string `json:"outcome"`
		Reason  string `json:"reason"`
	}
	why := "the list is partial; missing those of nexlet echo-a (" + echo.AgentID + ")"
	if code != 1 || json.Unmarshal([]byte(out), &res) != nil || res.Drained || res.Outcome != "failed" || !strings.Contains(res.Reason, why) ||
		!strings.Contains(errOut, "1 node(s) failed their drain") {
		t.Fatalf("lameduck --wait --json with echo-a frozen: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}

// drainToKill drains a node whose workload ignores SIGTERM (60 s stop grace) with
// `node lameduck --wait` and kills nexd with SIGKILL once its drain is under way;
// during the drain, while the LAMEDUCK request passes, meddle (when set) may act on the
// bus. It returns nexctl's output and exit code.
func drainToKill(t *testing.T, meddle func(nc *nats.Conn, nodeID string)) (string, string, int) {
	t.Helper()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--stop-grace", "60s"}})
	id := n.waitReady(t).NodeID
	marker := fmt.Sprintf("nexd-e2e-stubborn-%d", time.Now().UnixNano())
	n.runWorkload(t, "--name", "stubborn", "--", "/bin/sh", "-c", "trap '' TERM; while :; do sleep 1; done", marker)
	waitTrapped(t, "the stubborn workload", func() []int { return markerPIDs(marker) })
	if meddle != nil {
		meddle(testnats.Connect(t, s), id)
	}
	var stdout, stderr testkit.Buffer
	cmd := exec.Command(nexctlBin(t), append(n.natsArgs(), "node", "lameduck", id, "--delay", "500ms", "--wait")...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
	testkit.EventuallyWithin(t, 30*time.Second, "nexd draining", func() bool {
		return strings.Contains(n.out.String(), "lame duck delay ended; draining workloads")
	})
	time.Sleep(500 * time.Millisecond) // the drain's stop is waiting on the workload's grace
	n.signal(t, syscall.SIGKILL)
	select {
	case err := <-exited:
		exited <- err
	case <-time.After(30 * time.Second):
		t.Fatalf("lameduck --wait did not end after nexd was killed\nstdout: %s\nstderr: %s", stdout.String(), stderr.String())
	}
	return stdout.String(), stderr.String(), cmd.ProcessState.ExitCode()
}

// TestNexctlLameduckWaitNodeKilled: a node killed (SIGKILL) in the middle of its drain
// tells nothing: `node lameduck --wait` says it is not known to be drained, exit 1.
// Before, a node gone counted as drained (exit 0) though its workload still ran.
func TestNexctlLameduckWaitNodeKilled(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	out, errOut, code := drainToKill(t, nil)
	if code != 1 || !strings.Contains(out, "not known to be drained: it stopped without telling its drain's outcome") ||
		!strings.Contains(errOut, "not known to be drained: they stopped without telling their drain's outcome") {
		t.Fatalf("lameduck --wait, node killed mid-drain: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}

// TestNexctlLameduckForgedDrainOutcome (attack): a client on the bus that sees the
// LAMEDUCK request (subscribed to its subject) answers on its reply subject with drain
// outcomes the node did not give: "drained" unsigned, signed with a server key of its
// own making, and the node's own signed word for another client's nonce with its state
// changed to "drained". The node is then killed mid-drain. nexctl believes none of
// them: not known to be drained, exit 1, and a warning that it ignored them.
func TestNexctlLameduckForgedDrainOutcome(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	forged := make(chan int, 1)
	out, errOut, code := drainToKill(t, func(nc *nats.Conn, nodeID string) {
		own, err := nkeys.CreateServer()
		if err != nil {
			t.Fatal(err)
		}
		_, err = nc.Subscribe(protocol.LameduckSubject(nodeID), func(m *nats.Msg) {
			nonce := m.Header.Get(protocol.HeaderDrainWait)
			if nonce == "" || nonce == "attacker" || m.Reply == "" {
				return
			}
			time.Sleep(100 * time.Millisecond) // after the node's promise
			send := func(d protocol.DrainOutcome) {
				b, _ := json.Marshal(protocol.LameduckResponse{Message: "lame duck drain done", Success: true, Drain: &d})
				_ = nc.Publish(m.Reply, b)
			}
			sent := 0
			send(protocol.DrainOutcome{State: protocol.DrainDrained, Nonce: nonce})
			sent++
			d := protocol.DrainOutcome{State: protocol.DrainDrained, Nonce: nonce}
			sig, _ := own.Sign(protocol.DrainPayload(nodeID, d))
			d.Sig = base64.StdEncoding.EncodeToString(sig)
			send(d)
			sent++
			// The node's own promise, asked for with a nonce of the attacker's.
			r, err := nc.RequestMsg(&nats.Msg{Subject: m.Subject, Data: m.Data, Header: nats.Header{protocol.HeaderDrainWait: {"attacker"}}}, 5*time.Second)
			var lr protocol.LameduckResponse
			if err == nil && json.Unmarshal(r.Data, &lr) == nil && lr.Drain != nil && protocol.VerifyDrain(nodeID, "attacker", *lr.Drain) == nil {
				real := *lr.Drain
				real.State = protocol.DrainDrained
				send(real)
				sent++
			}
			forged <- sent
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	})
	var sent int
	select {
	case sent = <-forged:
	case <-time.After(10 * time.Second):
		t.Fatal("the attacker never saw the LAMEDUCK request")
	}
	if sent != 3 {
		t.Fatalf("the attacker forged %d claims, want 3 (it could not get the node's own promise)", sent)
	}
	if code != 1 || strings.Contains(out, "drained (") || !strings.Contains(out, "not known to be drained") ||
		!strings.Contains(errOut, "ignored 3 drain outcome(s)") {
		t.Fatalf("lameduck --wait with forged outcomes: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}
