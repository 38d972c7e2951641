package cli

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackRogueFloodsStalledLogFollow: an operator follows a workload's output
// (`nexctl workload logs -f`) into a pager she paused, so nexctl's writes block; a
// rogue node (a node's grant to publish the feeds) sends that workload's log subject
// 3 million empty lines. nexctl's stream bounded what waits unread by bytes only, and
// an empty line counts no bytes there: every one of them waited (live heap 297 MiB
// here, growing for as long as the flood goes on). Now the stream also bounds their
// count, and past it drops them (and says so once the pager reads on): 48 MiB.
func TestAttackRogueFloodsStalledLogFollow(t *testing.T) {
	t.Parallel()
	const flood = 3_000_000
	op := testnats.StartOperator(t, nil)
	def := "default"
	node := newFakeNode(t, op.Connect(t, "node"), "NODE", nil)
	node.workloads = []protocol.WorkloadSummary{{ID: "W1", Name: "web", Namespace: &def, WorkloadType: "native"}}
	node.start()
	tok, seed := op.UserWith(t, "rogue node", nil, jwt.Permissions{Pub: jwt.Permission{Allow: jwt.StringList{"$NEX.FEED.>"}}})
	rogue := testnats.Connect(t, op.Server, nats.UserJWTAndSeed(tok, seed))

	// The paused pager: a pipe nobody reads.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	utok, useed := op.User(t, "operator", nil)
	cmd := exec.Command(bins.PathNoRace(t, "github.com/nexd-project/nexd/cmd/nexctl"), "-s", op.Server.ClientURL(), "--nats.jwt", utok, "--nats.seed", useed,
		"--namespace", def, "workload", "logs", "-f", "W1")
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir(), "GODEBUG=gctrace=1"}
	var errb bytes.Buffer // read once nexctl is gone
	cmd.Stdout, cmd.Stderr = pw, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	defer func() {
		_ = cmd.Process.Kill()
		<-exited
	}()
	subject := "$NEX.FEED." + def + ".logs.W1.stdout"
	nexctl := waitSubscriber(t, op.Server, subject, exited)

	// Lines enough to fill the pipe, so nexctl's write blocks; then the flood.
	line := bytes.Repeat([]byte("y"), 64<<10)
	for range 8 {
		if err := rogue.Publish(subject, line); err != nil {
			t.Fatal(err)
		}
	}
	for i := range flood {
		if err := rogue.Publish(subject, nil); err != nil {
			t.Fatalf("rogue after %d lines: %v", i, err)
		}
	}
	if err := rogue.Flush(); err != nil {
		t.Fatal(err)
	}
	// Every line on its way to nexctl: the server sent them all.
	deadline := time.Now().Add(2 * time.Minute)
	for out := int64(0); out < flood; {
		if time.Now().After(deadline) {
			t.Fatalf("the server sent nexctl %d of the %d lines within 2 minutes", out, flood)
		}
		select {
		case <-exited:
			t.Fatalf("nexctl exited under the flood: %v\n%s", cmd.ProcessState, lastLines(errb.String(), 20))
		case <-time.After(200 * time.Millisecond):
		}
		out = connOutMsgs(t, op.Server, nexctl)
	}
	// nexctl took them in (its collector runs as its heap grows); then the pager goes.
	time.Sleep(2 * time.Second)
	_ = cmd.Process.Kill()
	<-exited
	live, gcs := maxLiveHeap(errb.String())
	t.Logf("%d empty lines sent to a stalled nexctl logs -f: live heap at most %d MiB in %d collections", flood, live>>20, gcs)
	if gcs == 0 || live > 100<<20 {
		t.Errorf("nexctl's live heap reached %d MiB (%d collections traced) under %d empty log lines while its output was stalled: it held them all",
			live>>20, gcs, flood)
	}
}

// waitSubscriber waits until a client subscribes to subject on s and returns its
// connection id; exited fails the wait.
func waitSubscriber(t *testing.T, s *server.Server, subject string, exited <-chan struct{}) uint64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		cz, err := s.Connz(&server.ConnzOptions{Subscriptions: true})
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range cz.Conns {
			for _, sub := range c.Subs {
				if server.SubjectsCollide(sub, subject) {
					return c.Cid
				}
			}
		}
		select {
		case <-exited:
			t.Fatalf("nexctl exited before it subscribed to %s", subject)
		case <-time.After(50 * time.Millisecond):
		}
	}
	t.Fatalf("nobody subscribed to %s within 30 s", subject)
	return 0
}

// connOutMsgs is how many messages s sent connection cid.
func connOutMsgs(t *testing.T, s *server.Server, cid uint64) int64 {
	t.Helper()
	cz, err := s.Connz(&server.ConnzOptions{CID: cid})
	if err != nil || len(cz.Conns) != 1 {
		t.Fatalf("connection %d: %v (%d found)", cid, err, len(cz.Conns))
	}
	return cz.Conns[0].OutMsgs
}

// lastLines is the last n lines of s.
func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestAttackRogueNodeFloodsWarnings: a rogue node answers `node list` beside an honest
// node with 25 error answers of 300 KB each (a node's error text is its own to write),
// and `node info` of an upstream node with one. nexctl names 20 unusable answers, each
// quoting what it said: 6 MB on the operator's terminal before, the honest row scrolled
// far away, and the error it ended `node info` with was 300 KB; now each warning line
// (4 KiB), and the error nexctl ends with (16 KiB), is cut, saying how much was left off.
func TestAttackRogueNodeFloodsWarnings(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	honest := newFakeNode(t, op.Connect(t, "node"), "HONEST", nil)
	honest.controlDelay = time.Second // its INFO answer comes after the rogue's
	honest.start()
	long := strings.Repeat("x", 300_000)
	errorAnswer := func() *nats.Msg {
		return &nats.Msg{Data: []byte(`{"error":"` + long + `"}`),
			Header: nats.Header{protocol.HeaderErrorCode: {"500"}, protocol.HeaderError: {"rogue"}}}
	}
	rogueAnswersAll(t, op, protocol.PingSubject(), func(m *nats.Msg) []*nats.Msg {
		var out []*nats.Msg
		for range 25 {
			out = append(out, errorAnswer())
		}
		return out
	})
	// And the error nexctl ends with: the honest node does not sign, so the rogue's
	// unsigned answer in its name, the first, is taken (Known limitations).
	rogueAnswers(t, op, protocol.InfoSubject("HONEST"), func(*nats.Msg) *nats.Msg { return errorAnswer() })
	for _, args := range [][]string{{"node", "info", "HONEST"}, {"--json", "node", "info", "HONEST"}} {
		_, errOut, code := runCLI(t, nil, opArgs(t, op, args...)...)
		t.Logf("%v: exit %d, %d bytes of stderr: %.300s", args, code, len(errOut), errOut)
		if code == ExitOK || len(errOut) > 32<<10 || !strings.Contains(errOut, "bytes left off") {
			t.Errorf("%v: exit %d, %d KiB on stderr; want the rogue's error answer cut, saying so:\n%.2000s", args, code, len(errOut)>>10, errOut)
		}
	}
	for _, args := range [][]string{{"node", "list"}, {"--json", "node", "list"}} {
		out, errOut, code := runCLI(t, nil, opArgs(t, op, args...)...)
		t.Logf("%v: exit %d, %d bytes of stderr: %.300s", args, code, len(errOut), errOut)
		if !strings.Contains(out, "HONEST") {
			t.Errorf("%v: the honest node is not listed:\n%.2000s", args, out)
		}
		if len(errOut) > 128<<10 {
			t.Errorf("%v: %d KiB of warnings for 25 answers: each quotes the rogue's text whole", args, len(errOut)>>10)
		}
		if !strings.Contains(errOut, "bytes left off") {
			t.Errorf("%v: no warning says it was cut:\n%.2000s", args, errOut)
		}
	}
}
