package node

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// agentRenewalCounter counts the nexlet users the node mints by a nexlet's renewal of
// its own user, by agent id.
type agentRenewalCounter struct {
	*mint.SigningKeyMinter
	rogue   string
	renewed atomic.Int64
}

func (m *agentRenewalCounter) RenewAgent(agentID, nodeID, userPub string, direct bool) (protocol.NatsConnectionData, error) {
	if agentID == m.rogue {
		m.renewed.Add(1)
	}
	return m.SigningKeyMinter.RenewAgent(agentID, nodeID, userPub, direct)
}

// floodSigned publishes count messages on subject from a's connection, with bodies
// body(i), each signed with a's key at a time of its own (now, a nanosecond apart),
// their replies to an inbox of a's, and returns the count of replies, which grows as
// they come.
func floodSigned(t *testing.T, a *fakeAgent, subject string, count int, body func(i int) []byte) *atomic.Int64 {
	t.Helper()
	answered := &atomic.Int64{}
	inbox := a.nc.NewRespInbox()
	sub, err := a.nc.Subscribe(inbox, func(*nats.Msg) { answered.Add(1) })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	for i := range count {
		msg := nats.NewMsg(subject)
		msg.Reply = inbox
		msg.Data = body(i)
		signAt(t, msg, a.key, time.Now().Add(time.Duration(i)))
		if err := a.nc.PublishMsg(msg); err != nil {
			t.Fatal(err)
		}
	}
	if err := a.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	return answered
}

// AttackNexletRenewalFlood is TestAttackNexletRenewalFloodBounded (in
// dropmetrics_test.go, which then scrapes the metric of its drops), returning its node:
// a rogue nexlet that signs (its start's key) renews its own user again and again, each
// time for a fresh key, signed, from the user its node minted for it on an
// operator-mode server. Each renewal the node takes mints a nexlet user and, once the
// nexlet says it switched or AgentSwitchWait passed, revokes the older ones: a rewrite
// of the account JWT each, whose revocations are kept for the longest TTL and an hour,
// so the flood grows the JWT every revocation of every tenant's stopped workload
// rewrites, until it no longer fits a NATS message. Before, every renewal was served:
// 300 asks, 300 users minted. Now a nexlet's renewals of its own user are served at
// most agentRenewBurst at once and agentRenewsPerLife over the lifetime of the user the
// node minted it (its renewal at 80 % of that lifetime, or half, with retries, needs
// far fewer); the rest are dropped unanswered, and an honest nexlet's renewal is still
// served.
func AttackNexletRenewalFlood(t *testing.T) *Node {
	var cm *agentRenewalCounter
	rf := newRogueFixtureMinting(t, mint.Options{AgentTTL: time.Hour}, func(o *Options) {
		cm = &agentRenewalCounter{SigningKeyMinter: o.Minter.(*mint.SigningKeyMinter), rogue: "rogue0"}
		o.Minter = cm
		o.AgentSwitchWait = 100 * time.Millisecond
	})
	n := rf.nodes[0]
	signed := signedStart(n, true)
	victim := rf.minted("agent0", "native-nexlet", "native", signed)
	rogue := rf.minted("rogue0", "rogue", "rogue", signed)

	const asks = 300
	start := time.Now()
	answered := floodSigned(t, rogue, protocol.RenewAgentCredsSubject(n.ID(), rogue.id), asks, func(int) []byte {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		return mustJSON(t, protocol.RenewAgentCredsRequest{PublicKey: pub})
	})
	// Every ask handled: answered, or dropped and counted.
	if !testkit.WaitFor(2*time.Minute, func() bool { return answered.Load()+int64(n.AgentRenewalsDropped()) >= asks }) {
		t.Fatalf("of %d renewals, %d answered and %d dropped within 2 minutes", asks, answered.Load(), n.AgentRenewalsDropped())
	}
	elapsed := time.Since(start)
	t.Logf("%d renewals of the rogue's own user in %v: %d answered, %d dropped, %d users minted", asks, elapsed.Round(time.Millisecond), answered.Load(), n.AgentRenewalsDropped(), cm.renewed.Load())
	if got, most := cm.renewed.Load(), int64(agentRenewBurst+agentRenewsPerLife); got > most {
		t.Errorf("the node minted %d nexlet users for the rogue's %d renewals of its own in %v; want at most %d", got, asks, elapsed.Round(time.Millisecond), most)
	}
	// The honest nexlet renews its own user.
	rf.renewed(victim).Close()
	return n
}
