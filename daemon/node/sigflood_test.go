package node

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

// TestAttackRogueNexletFillsSeenSignatures: a rogue nexlet that signs (its supervised
// start's key, as every nexd-SDK nexlet holds one) sends, from the user its node
// minted for it, as many signed messages of its own as the node remembers against
// replays (switch reports of its own renewal: the cheapest), each signed at another
// time. Before, the node kept one table for every key and refused every signed message
// once it was full, for the window: the victim nexlet's renewal of its own user (and
// any nexlet's registration over NATS) was refused, 403 "refused: 10000 signed
// messages", for as long as the rogue kept it full, and the victim lost its user at
// its expiry. Now each key is bounded alone: the rogue's own messages past its bound
// are refused, and the victim renews.
func TestAttackRogueNexletFillsSeenSignatures(t *testing.T) {
	rf, victim, rogue := newSignedRogueFixture(t)
	n := rf.nodes[0]

	own, _ := nkeys.CreateUser()
	ownPub, _ := own.PublicKey()
	var refused, answered atomic.Int64
	inbox := rogue.nc.NewRespInbox()
	sub, err := rogue.nc.Subscribe(inbox, func(m *nats.Msg) {
		if m.Header.Get(protocol.HeaderErrorCode) != "" {
			refused.Add(1)
		}
		answered.Add(1)
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	// Signed a few minutes ahead (within the window): they are remembered longest.
	// In batches, until the node refuses the rogue's own or it sent as many as the
	// node's one table held before (10,000).
	at := time.Now().Add(protocol.RegistrationWindow - time.Minute)
	const batch, most = 500, 10_000
	sent := int64(0)
	for sent < most && refused.Load() == 0 {
		for range batch {
			msg := nats.NewMsg(protocol.RenewAgentCredsSubject(n.ID(), rogue.id))
			msg.Reply = inbox
			msg.Data = mustJSON(t, protocol.RenewAgentCredsRequest{PublicKey: ownPub, Switched: true})
			signAt(t, msg, rogue.key, at.Add(time.Duration(sent)))
			if err := rogue.nc.PublishMsg(msg); err != nil {
				t.Fatal(err)
			}
			sent++
		}
		if err := rogue.nc.Flush(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(time.Minute)
		for answered.Load() < sent && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := answered.Load(); got < sent {
			t.Fatalf("the node answered %d of the rogue's %d signed messages, the last batch within a minute", got, sent)
		}
	}
	t.Logf("the rogue's %d signed messages: %d taken, %d refused", sent, sent-refused.Load(), refused.Load())

	// The victim renews its own user, signed with its own key, as nexd's SDK does.
	kp, _ := nkeys.CreateUser()
	pub, _ := kp.PublicKey()
	msg := nats.NewMsg(protocol.RenewAgentCredsSubject(n.ID(), victim.id))
	msg.Data = mustJSON(t, protocol.RenewAgentCredsRequest{PublicKey: pub})
	signAt(t, msg, victim.key, time.Now())
	m, err := victim.nc.RequestMsg(msg, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "" {
		t.Fatalf("the victim's renewal of its own user after the rogue's flood: refused %s %s (%s)", code, m.Header.Get(protocol.HeaderError), m.Data)
	}
	var cd protocol.NatsConnectionData
	if err := protocol.Decode(m.Data, &cd); err != nil || cd.NatsUserJWT == "" {
		t.Fatalf("the victim's renewal: %q, %v; want its new user's JWT", m.Data, err)
	}
	// And the rogue's own bound holds: its next message is refused, saying why.
	msg = nats.NewMsg(protocol.RenewAgentCredsSubject(n.ID(), rogue.id))
	msg.Data = mustJSON(t, protocol.RenewAgentCredsRequest{PublicKey: ownPub, Switched: true})
	signAt(t, msg, rogue.key, time.Now())
	if m, err = rogue.nc.RequestMsg(msg, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if code, text := m.Header.Get(protocol.HeaderErrorCode), m.Header.Get(protocol.HeaderError)+string(m.Data); code != "403" || !strings.Contains(text, "refused") {
		t.Errorf("the rogue's next signed message: %q %s, want 403 refused", code, text)
	}
}
