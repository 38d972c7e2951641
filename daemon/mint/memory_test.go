package mint

import (
	"context"
	"slices"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
)

func newKeyMinter(t *testing.T, rev Revoker) *SigningKeyMinter {
	t.Helper()
	acc, _ := nkeys.CreateAccount()
	accPub, _ := acc.PublicKey()
	sk, _ := nkeys.CreateAccount()
	seed, _ := sk.Seed()
	m, err := NewSigningKeyMinter(string(seed), accPub, Options{Revoker: rev})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestUsersHandedOver: the workload users one minter hands over (a re-exec) are
// revoked by the next one when the workload stops, together with those it minted
// itself; they count as older, so a renewal's revocation of superseded users takes
// them too. Without the hand-over the next minter revokes only its own.
func TestUsersHandedOver(t *testing.T) {
	oldRev := &testkit.Revocations{}
	old := newKeyMinter(t, oldRev)
	if _, err := old.MintWorkload("tenant", "W1"); err != nil {
		t.Fatal(err)
	}
	if _, err := old.MintWorkload("tenant", "W2"); err != nil {
		t.Fatal(err)
	}
	handed := old.Users()
	if len(handed.Workloads["W1"]) != 1 || handed.Namespaces["W2"] != "tenant" {
		t.Fatalf("users %+v", handed)
	}
	before := slices.Clone(handed.Workloads["W1"])

	rev := &testkit.Revocations{}
	m := newKeyMinter(t, rev)
	if err := m.Remember(handed); err != nil {
		t.Fatal(err)
	}
	// The replay after the exec mints a newer user; a renewal in another namespace is
	// refused (the namespace came across too).
	if _, err := m.MintWorkload("tenant", "W1"); err != nil {
		t.Fatal(err)
	}
	if _, err := m.RenewWorkload("other", "W2"); err == nil {
		t.Fatal("renewed W2 into another namespace after the hand-over")
	}
	users := m.WorkloadUsers("W1")
	if len(users) != 2 || users[0] != before[0] {
		t.Fatalf("W1 users %v: want the handed-over %v first", users, before)
	}
	if err := m.RevokeWorkload(context.Background(), "W1"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rev.Users(), users) {
		t.Fatalf("revoked %v, want %v", rev.Users(), users)
	}
	if _, err := m.RenewWorkload("tenant", "W2"); err != nil {
		t.Fatal(err)
	}
	rev.Reset()
	if err := m.RevokeSuperseded(context.Background(), "W2"); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(rev.Users(), handed.Workloads["W2"]) {
		t.Fatalf("superseded revoked %v, want the handed-over %v", rev.Users(), handed.Workloads["W2"])
	}
}

// TestUsersRefused: a hand-over with something no minter makes is refused whole, and
// a minter that cannot revoke hands over nothing.
func TestUsersRefused(t *testing.T) {
	m := newKeyMinter(t, &testkit.Revocations{})
	u, _ := nkeys.CreateUser()
	pub, _ := u.PublicKey()
	for name, bad := range map[string]Users{
		"bad key":       {Workloads: map[string][]string{"W1": {pub, "UNOTAKEY"}}},
		"account key":   {Workloads: map[string][]string{"W1": {m.account}}},
		"bad id":        {Workloads: map[string][]string{"W.1": {pub}}},
		"bad namespace": {Namespaces: map[string]string{"W1": "a b"}},
		"too many":      {Workloads: map[string][]string{"W1": slices.Repeat([]string{pub}, maxUsersPerID+1)}},
	} {
		if err := m.Remember(bad); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if got := m.WorkloadUsers("W1"); len(got) != 0 {
		t.Fatalf("a refused hand-over was half used: %v", got)
	}
	noRev := newKeyMinter(t, nil)
	if _, err := noRev.MintWorkload("tenant", "W1"); err != nil {
		t.Fatal(err)
	}
	if u := noRev.Users(); len(u.Workloads) != 0 {
		t.Fatalf("a minter without a revoker handed over %+v", u)
	}
}
