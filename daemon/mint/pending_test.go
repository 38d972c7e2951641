package mint

import (
	"context"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestPendingRegistrationsBounded: the agent ids holding registration users only are
// bounded, the oldest forgotten; an id that got a nexlet user is kept however many
// come after it, and its registration revokes its registration user. Before, every id
// was remembered for good (RREGISTER mints for whoever asks: daemon/node
// TestAttackRemoteRegisterFloodBounded).
func TestPendingRegistrationsBounded(t *testing.T) {
	sig, _ := nkeys.CreateAccount()
	seed, _ := sig.Seed()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	rec := &testkit.Revocations{}
	m, err := NewSigningKeyMinter(string(seed), accPub, Options{Revoker: rec})
	if err != nil {
		t.Fatal(err)
	}
	node := "N" + strings.Repeat("A", 55)
	userOf := func(cd protocol.NatsConnectionData) string {
		kp, err := nkeys.FromSeed([]byte(cd.NatsUserSeed))
		if err != nil {
			t.Fatal(err)
		}
		pub, _ := kp.PublicKey()
		return pub
	}
	waiting := nuid.Next()
	if _, err := m.MintRegister(waiting, node); err != nil {
		t.Fatal(err)
	}
	registered := nuid.Next()
	reg, err := m.MintRegister(registered, node)
	if err != nil {
		t.Fatal(err)
	}
	for range MaxPendingRegistrations + 10 {
		if _, err := m.MintRegister(nuid.Next(), node); err != nil {
			t.Fatal(err)
		}
		if m.AgentsRemembered() > MaxPendingRegistrations+1 {
			t.Fatalf("%d agent ids remembered, want at most %d pending and the registered one", m.AgentsRemembered(), MaxPendingRegistrations)
		}
		if m.AgentsRemembered() == MaxPendingRegistrations && registered != "" {
			// The registered one registers: it holds a nexlet user from now on.
			agent, err := m.MintAgent(registered, node, false)
			if err != nil {
				t.Fatal(err)
			}
			if err := m.RevokeAgentBefore(context.Background(), registered, userOf(agent)); err != nil {
				t.Fatal(err)
			}
			if !rec.Has(userOf(reg)) {
				t.Fatal("the registered nexlet's registration user was not revoked at its registration")
			}
			registered = ""
		}
	}
	if got := m.AgentsRemembered(); got != MaxPendingRegistrations+1 {
		t.Errorf("%d agent ids remembered, want %d pending and the registered one", got, MaxPendingRegistrations)
	}
	m.mu.Lock()
	_, kept := m.agents[waiting]
	m.mu.Unlock()
	if kept {
		t.Error("the oldest id that never registered is still remembered")
	}
}
