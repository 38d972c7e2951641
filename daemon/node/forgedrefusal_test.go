package node

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// TestAttackForgedRefusalOfRegistrationNotDelivered: a forged answer "503 node state
// unreadable" to a nexlet's registration would keep a nexd SDK nexlet asking again (it
// takes the first answer to each request). With the users the node mints (private
// inboxes: the zero-config server's, and any issuer signing key's) none can be
// delivered. Each user but the node's that is on the bus tries, told the victim's exact
// reply subject beforehand (which it could not learn: the subscription to the victim's
// registration subject, where the node reads it, is refused to each as well): another
// nexlet's registration user and its nexlet user, a workload's user and a tenant's. The
// server refuses every publish into the victim's inbox, and the victim's registration,
// sent after the refusals, gets the node's answer as the first and only message there.
// The attack fails as it did before this test: nothing needed fixing.
func TestAttackForgedRefusalOfRegistrationNotDelivered(t *testing.T) {
	rf := newRogueFixture(t)
	n := rf.nodes[0]
	victim := rf.expected("agentV", "victim", "victim")
	inbox := victim.nc.NewRespInbox()
	replies, err := victim.nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := victim.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	regSubject := protocol.RegisterSubject(n.ID(), victim.id)

	type attacker struct {
		name    string
		nc      *nats.Conn
		refused func(op, subject string) bool
	}
	var attackers []attacker
	minted := func(name string, cd protocol.NatsConnectionData, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		nc, refused := rf.dialRefusals(cd)
		attackers = append(attackers, attacker{name, nc, func(op, subject string) bool {
			return refused("Permissions Violation for " + op + ` to "` + subject + `"`)
		}})
	}
	cd, err := rf.m.MintRegister("agentR", n.ID())
	minted("another nexlet's registration user", cd, err)
	cd, err = rf.m.MintAgent("agentR", n.ID(), false)
	minted("another nexlet's user", cd, err)
	cd, err = rf.m.MintWorkload("tenant", "WFORGER")
	minted("a workload's user", cd, err)
	tc := rf.tenant("tenant")
	attackers = append(attackers, attacker{"a tenant's user", tc.nc, func(op, subject string) bool {
		return tc.denied(strings.ToLower(op), subject)
	}})

	for _, a := range attackers {
		if _, err := a.nc.Subscribe(regSubject, func(*nats.Msg) {}); err != nil {
			t.Fatal(err)
		}
		forged := nats.NewMsg(inbox)
		forged.Header.Set(protocol.HeaderErrorCode, "503")
		forged.Header.Set(protocol.HeaderError, protocol.ErrTextStateUnreadable)
		forged.Data = []byte(`{"error":"forged by ` + a.name + `"}`)
		if err := a.nc.PublishMsg(forged); err != nil {
			t.Fatal(err)
		}
		_ = a.nc.Flush()
		if !a.refused("Subscription", regSubject) {
			t.Errorf("%s: its subscription to the victim's registration subject %s was not refused", a.name, regSubject)
		}
		if !a.refused("Publish", inbox) {
			t.Errorf("%s: its forged answer to the victim's inbox %s was not refused", a.name, inbox)
		}
	}

	// The refusals came after the server took each publish; the victim's registration
	// goes after them, so a forged answer let through would be first in its inbox.
	msg := nats.NewMsg(regSubject)
	msg.Reply = inbox
	msg.Data = mustJSON(t, victim.req)
	if err := victim.nc.PublishMsg(msg); err != nil {
		t.Fatal(err)
	}
	got, err := replies.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("the victim's registration was not answered: %v", err)
	}
	if code := got.Header.Get(protocol.HeaderErrorCode); code != "" {
		t.Fatalf("the victim's first answer is %s %s %s: a forged one was delivered", code, got.Header.Get(protocol.HeaderError), got.Data)
	}
	var resp protocol.RegisterAgentResponse
	if err := protocol.Decode(got.Data, &resp); err != nil || !resp.Success || resp.NodeID != n.ID() {
		t.Fatalf("the victim's first answer is not the node's: %s (%v)", got.Data, err)
	}
	if k, _, _ := replies.Pending(); k != 0 {
		t.Errorf("%d more messages in the victim's inbox after the node's answer", k)
	}
	t.Logf("%d attackers: each subscription to %s and each forged 503 into the victim's inbox refused by the server; the victim's first answer the node's", len(attackers), regSubject)
}
