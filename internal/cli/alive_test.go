package cli

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// aliveNode answers ADEPLOY.<bidder> as a nexd node does when the client asks for
// keep-alives: alive replies every interval for alive's duration, then the answer
// after answerAfter (0: never, a node that went away); each signed with kp over the
// client's nonce. It returns kp's node id.
func aliveNode(t *testing.T, nc *nats.Conn, kp nkeys.KeyPair, bidder string, alive, answerAfter time.Duration) string {
	t.Helper()
	id, _ := kp.PublicKey()
	sign := func(m, r *nats.Msg) *nats.Msg {
		if err := protocol.SignAnswer(kp, id, m.Header.Get(protocol.HeaderNonce), m.Subject, r.Header, r.Data); err != nil {
			t.Error(err)
		}
		return r
	}
	sub, err := nc.Subscribe(protocol.DeploySubject("default", bidder), func(m *nats.Msg) {
		every, err := time.ParseDuration(m.Header.Get(protocol.HeaderAlive))
		if err != nil {
			t.Errorf("deploy without a keep-alive request: %q", m.Header.Get(protocol.HeaderAlive))
			return
		}
		go func() {
			start := time.Now()
			for time.Since(start) < alive {
				r := nats.NewMsg(m.Reply)
				r.Header.Set(protocol.HeaderAlive, "1")
				_ = nc.PublishMsg(sign(m, r))
				if answerAfter > 0 && time.Since(start) >= answerAfter {
					r := nats.NewMsg(m.Reply)
					r.Data = []byte(`{"id":"W1","name":"w"}`)
					_ = nc.PublishMsg(sign(m, r))
					return
				}
				time.Sleep(every)
			}
		}()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sub.Unsubscribe() })
	return id
}

// TestDeployNodeSilentMidRequest: a node that acknowledged a deploy and then went
// silent is reported as an unknown outcome after the silence, not after the deploy
// timeout; a slow node that keeps saying it is alive is waited for; a node that never
// says anything (an upstream node) gets the whole deploy timeout.
func TestDeployNodeSilentMidRequest(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	nc := testnats.Connect(t, s)
	f := &fleet{nc: nc, ns: "default", deployTimeout: 3 * time.Second, aliveEvery: 50 * time.Millisecond, silence: 400 * time.Millisecond}
	req := protocol.StartWorkloadRequest{Name: "w", Namespace: "default"}
	ctx := context.Background()

	kp, _ := nkeys.CreateServer()
	nexd, _ := kp.PublicKey()
	aliveNode(t, nc, kp, "gone", 200*time.Millisecond, 0)
	start := time.Now()
	_, err := f.deploy(ctx, "gone", req, nexd)
	took := time.Since(start)
	if !errors.Is(err, errOutcomeUnknown) || !strings.Contains(err.Error(), "acknowledged the request, then said nothing") {
		t.Fatalf("node gone mid-request: %v, want %v", err, errOutcomeUnknown)
	}
	if took > 2*time.Second {
		t.Errorf("node gone mid-request reported after %v, want about 600ms (not the %v deploy timeout)", took, f.deployTimeout)
	}

	aliveNode(t, nc, kp, "slow", 5*time.Second, time.Second)
	if r, err := f.deploy(ctx, "slow", req, nexd); err != nil || r.ID != "W1" {
		t.Fatalf("slow node saying it is alive: %+v %v", r, err)
	}

	// A deploy subject nobody serves (the bidder is gone): the server's no-responders
	// status says the request reached no node, so nothing started and the next bid may
	// be tried. Before (a sync subscription, whose read turned that status into an
	// error) it was reported at once as a node that "never acknowledged the request in
	// 400ms", an unknown outcome.
	_, err = f.deploy(ctx, "nobody", req, "")
	if !errors.Is(err, errNotStarted) || !strings.Contains(err.Error(), "bid nobody expired") {
		t.Fatalf("bidder gone: %v, want %v", err, errNotStarted)
	}
	// For a signed bid's deploy the status is not taken: anyone who sees the request
	// can write it (and with anyone listening, the server does not). Its node is
	// waited for as one that never acknowledged: the outcome is unknown, nothing is
	// tried elsewhere (every node is gone then, the signed bid's with them).
	_, err = f.deploy(ctx, "nobody-nexd", req, nexd)
	if !errors.Is(err, errOutcomeUnknown) || !strings.Contains(err.Error(), "never acknowledged") {
		t.Fatalf("signed bidder gone: %v, want %v", err, errOutcomeUnknown)
	}
	// A signed bidder (nexd) that takes the request and never acknowledges: silent from
	// the start.
	silent, _ := nc.Subscribe(protocol.DeploySubject("default", "silent-nexd"), func(*nats.Msg) {})
	defer silent.Unsubscribe()
	_, err = f.deploy(ctx, "silent-nexd", req, nexd)
	if !errors.Is(err, errOutcomeUnknown) || !strings.Contains(err.Error(), "never acknowledged") {
		t.Fatalf("silent nexd: %v", err)
	}
	// An upstream node does not send keep-alives: only the deploy timeout ends the wait.
	sub, _ := nc.Subscribe(protocol.DeploySubject("default", "upstream"), func(*nats.Msg) {})
	defer sub.Unsubscribe()
	start = time.Now()
	_, err = f.deploy(ctx, "upstream", req, "")
	if !errors.Is(err, errDeployTimeout) || time.Since(start) < f.deployTimeout {
		t.Fatalf("upstream node: %v after %v, want %v after %v", err, time.Since(start), errDeployTimeout, f.deployTimeout)
	}
}
