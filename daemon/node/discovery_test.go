package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/protocol"
)

// discoverySubjects are where `nats micro` discovery asks: every service's verbs, and
// those of the node's service by name.
var discoverySubjects = []string{
	"$SRV.PING", "$SRV.INFO", "$SRV.STATS",
	"$SRV.PING." + protocol.ServiceName, "$SRV.INFO." + protocol.ServiceName, "$SRV.STATS." + protocol.ServiceName,
}

// errorsOf collects nc's asynchronous errors (the server's permission violations).
func errorsOf(nc *nats.Conn) <-chan error {
	errs := make(chan error, 64)
	nc.SetErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
		select {
		case errs <- err:
		default:
		}
	})
	return errs
}

// waitRefused waits for the server's refusal of each subscription in subjects.
func waitRefused(t *testing.T, errs <-chan error, subjects []string) {
	t.Helper()
	left := map[string]bool{}
	for _, s := range subjects {
		left[strings.ToLower(`permissions violation for subscription to "`+s+`"`)] = true
	}
	deadline := time.After(30 * time.Second)
	for len(left) > 0 {
		select {
		case err := <-errs:
			delete(left, strings.ToLower(err.Error()))
			for want := range left {
				if strings.Contains(strings.ToLower(err.Error()), want) {
					delete(left, want)
				}
			}
		case <-deadline:
			t.Fatalf("the server did not refuse the subscriptions %v", left)
		}
	}
}

// TestAttackRogueNexletAnswersDiscoveryAsNode (attack, operator-mode server): a
// nexlet's minted user subscribes to the node's micro discovery subjects and answers
// an admin's `nats micro ping` as "nexnode". Before, its user held $SRV.> (for the
// micro service of the SDKs' nexlets, which no node ever asks there): the admin's
// ping got the forged nexnode beside the real one. Now the server refuses each
// subscription, and the ping gets the node's answer alone: the rogue never received it
// (a marker the admin sent after the ping reached the rogue with no ping before it).
func TestAttackRogueNexletAnswersDiscoveryAsNode(t *testing.T) {
	rf := newRogueFixture(t)
	rogue := rf.minted("rogue0", "rogue", "rogue", nil)
	errs := errorsOf(rogue.nc)
	forged := js(micro.Ping{ServiceIdentity: micro.ServiceIdentity{Name: protocol.ServiceName, ID: "FORGED", Version: "9.9.9"},
		Type: micro.PingResponseType})
	// One channel for every subscription: the connection's reader hands it the
	// messages in the order the server sent them.
	in := make(chan *nats.Msg, 64)
	marker := protocol.AgentEventsSubject(rogue.id) // the rogue's own, which it may read
	for _, s := range append([]string{marker}, discoverySubjects...) {
		if _, err := rogue.nc.ChanSubscribe(s, in); err != nil {
			t.Fatal(err)
		}
	}
	if err := rogue.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	inbox := nats.NewInbox()
	answers, err := rf.client.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := rf.client.PublishRequest("$SRV.PING", inbox, nil); err != nil {
		t.Fatal(err)
	}
	// The server hands the rogue's connection the ping before the marker, which the
	// admin sent after it: a rogue that could read the ping has it by then.
	if err := rf.client.Publish(marker, []byte("after the ping")); err != nil {
		t.Fatal(err)
	}
	for done := false; !done; {
		select {
		case m := <-in:
			if m.Subject == marker {
				done = true
				break
			}
			_ = m.Respond(forged)
			t.Errorf("the rogue nexlet received %s, a discovery request for the node's micro service, and answered it as %s", m.Subject, protocol.ServiceName)
		case <-time.After(30 * time.Second):
			t.Fatal("the marker did not reach the rogue")
		}
	}
	if t.Failed() {
		return
	}
	waitRefused(t, errs, discoverySubjects)
	// The node's own answer comes; no forged one.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	m, err := answers.NextMsgWithContext(ctx)
	if err != nil {
		t.Fatalf("the node's ping answer: %v", err)
	}
	var p micro.Ping
	if err := protocol.Decode(m.Data, &p); err != nil || p.Name != protocol.ServiceName || p.ID == "FORGED" {
		t.Fatalf("ping answer %q (%v)", m.Data, err)
	}
}

// TestUpstreamSDKNexletServesWithoutDiscovery (compatibility, operator-mode server): a
// nexlet on upstream's SDK runs a micro service on its minted user, as that SDK does
// (its endpoints in queue group = agent id). The server refuses the service's nine
// $SRV subscriptions; the service is not stopped by them (nats.go hands a
// subscription's permission violation to the error handler without the subscription,
// which micro does not take for its own) and its endpoints answer.
func TestUpstreamSDKNexletServesWithoutDiscovery(t *testing.T) {
	rf := newRogueFixture(t)
	node, id := rf.nodes[0].ID(), "UPSDK0"
	cd, err := rf.m.MintAgent(id, node, false)
	if err != nil {
		t.Fatal(err)
	}
	nc := rf.dial(cd)
	errs := errorsOf(nc) // set before the service, which wraps it
	svc, err := micro.AddService(nc, micro.Config{Name: "up", Version: "0.0.1"})
	if err != nil {
		t.Fatal(err)
	}
	subject := protocol.PingAgentSubject(node, id)
	if err := svc.AddEndpoint("PingAgent", micro.HandlerFunc(func(r micro.Request) { _ = r.Respond([]byte("pong")) }),
		micro.WithEndpointSubject(subject), micro.WithEndpointQueueGroup(id)); err != nil {
		t.Fatal(err)
	}
	// The endpoint's SUB is only buffered until nc's flusher writes it; the refusals
	// below are of the nine SUBs before it, which say nothing of it. Without this the
	// request below found no responder (0.13 s into the test, under -race at load 16).
	if err := nc.Flush(); err != nil {
		t.Fatalf("the nexlet's endpoint subscription reaching the server: %v", err)
	}
	var refused []string
	for _, verb := range []string{"PING", "INFO", "STATS"} {
		refused = append(refused, "$SRV."+verb, "$SRV."+verb+".up", "$SRV."+verb+".up."+svc.Info().ID)
	}
	waitRefused(t, errs, refused)
	if svc.Stopped() {
		t.Fatal("the refused $SRV subscriptions stopped the nexlet's micro service")
	}
	m, err := rf.client.Request(subject, nil, 30*time.Second)
	if err != nil || string(m.Data) != "pong" {
		t.Fatalf("the nexlet's endpoint after the refusals: %v", err)
	}
}
