package mint

import (
	"context"
	"errors"
	"strings"
	"testing"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/nexd-project/nexd/internal/testnats"
)

func TestNkeyMinterSharedIdentity(t *testing.T) {
	ukp, upub := mustKP(t, nkeys.CreateUser)
	seed, _ := ukp.Seed()
	s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
		o.Nkeys = []*server.NkeyUser{{Nkey: upub}}
	}})
	m, err := NewNkeyMinter(upub, string(seed), Options{Servers: []string{s.ClientURL()}})
	if err != nil {
		t.Fatal(err)
	}
	if !m.CanMint() || !strings.Contains(m.Warning(), upub) || !strings.Contains(m.Describe(), "shared") {
		t.Fatalf("can mint %v, warning %q, describe %q", m.CanMint(), m.Warning(), m.Describe())
	}
	agent, err := m.MintAgent("a1", "node1", false)
	if err != nil {
		t.Fatal(err)
	}
	work, err := m.MintWorkload("ns1", "w1")
	if err != nil {
		t.Fatal(err)
	}
	if work.NatsUserNkey != upub || work.NatsUserSeed != string(seed) || work.NatsUserJWT != "" || work.ConnName != "workload:ns1:w1" {
		t.Fatalf("workload data: %+v", work)
	}
	a := mustDial(t, s.ClientURL(), agent)
	w := mustDial(t, s.ClientURL(), work)
	// Same identity, no scoping: the workload reaches the agent plane.
	canSubscribe(t, a.nc, w, "$NEX.SVC.>", "$NEX.SVC.node1.agent.PING")
	if err := m.RevokeWorkload(context.Background(), "w1"); !errors.Is(err, ErrRevocationUnsupported) {
		t.Fatalf("revoke: %v", err)
	}
	// Without the seed's matching key the server refuses: the data is what authenticates.
	other, _ := mustKP(t, nkeys.CreateUser)
	otherSeed, _ := other.Seed()
	bad := work
	bad.NatsUserSeed = string(otherSeed)
	if _, err := dial(t, s.ClientURL(), bad); err == nil {
		t.Fatal("connected with a foreign seed")
	}
}

func TestNoAuthMinter(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	m := NewNoAuthMinter(Options{Servers: []string{s.ClientURL()}})
	if m.CanMint() || m.Warning() == "" || !strings.Contains(m.Describe(), "development only") {
		t.Fatalf("can mint %v, warning %q", m.CanMint(), m.Warning())
	}
	cd, err := m.MintRegister("a1", "node1")
	if err != nil {
		t.Fatal(err)
	}
	if cd.NatsUserJWT != "" || cd.NatsUserSeed != "" || cd.NatsUserNkey != "" || cd.ConnName != "nexlet:a1:register" {
		t.Fatalf("no-auth data: %+v", cd)
	}
	mustDial(t, s.ClientURL(), cd)
}

func TestConstructorsRefuseBadKeys(t *testing.T) {
	acc, accPub := mustKP(t, nkeys.CreateAccount)
	accSeed, _ := acc.Seed()
	usr, usrPub := mustKP(t, nkeys.CreateUser)
	usrSeed, _ := usr.Seed()
	_, usr2Pub := mustKP(t, nkeys.CreateUser)
	tests := []struct {
		name string
		err  func() error
		want string
	}{
		{"signing seed garbage", func() error { _, err := NewSigningKeyMinter("SAnope", accPub, Options{}); return err }, "not a valid nkey seed"},
		{"signing seed is a user", func() error { _, err := NewSigningKeyMinter(string(usrSeed), accPub, Options{}); return err }, "want an account signing key"},
		{"root account is a user", func() error { _, err := NewSigningKeyMinter(string(accSeed), usrPub, Options{}); return err }, "not an account public key"},
		{"nkey not a user", func() error { _, err := NewNkeyMinter(accPub, string(usrSeed), Options{}); return err }, "not a user public key"},
		{"nkey seed mismatch", func() error { _, err := NewNkeyMinter(usr2Pub, string(usrSeed), Options{}); return err }, "belongs to"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.err()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
		})
	}
}

func TestSigningMintRefusesBadInput(t *testing.T) {
	sig, sigPub := mustKP(t, nkeys.CreateAccount)
	seed, _ := sig.Seed()
	_, accPub := mustKP(t, nkeys.CreateAccount)
	wide, err := NewSigningKeyMinter(string(seed), accPub, Options{WorkloadSubjects: func(ns string) []string { return []string{">"} }})
	if err != nil {
		t.Fatal(err)
	}
	nexSubj, _ := NewSigningKeyMinter(string(seed), accPub, Options{WorkloadSubjects: func(ns string) []string { return []string{"$NEX.FEED.>"} }})
	m, _ := NewSigningKeyMinter(string(seed), accPub, Options{})
	tests := []struct {
		name string
		err  func() error
		want string
	}{
		{"namespace with dot", func() error { _, err := m.MintWorkload("a.b", "w"); return err }, "not a single NATS subject token"},
		{"namespace wildcard", func() error { _, err := m.MintWorkload(">", "w"); return err }, "not a single NATS subject token"},
		{"empty workload id", func() error { _, err := m.MintWorkload("ns", ""); return err }, "workload id is empty"},
		{"agent id wildcard", func() error { _, err := m.MintAgent("*", "n", false); return err }, "agent id"},
		{"node id with dot", func() error { _, err := m.MintRegister("a", "n.x"); return err }, "node id"},
		{"workload subjects >", func() error { _, err := wide.MintWorkload("ns", "w"); return err }, "starts with a wildcard"},
		{"workload subjects $NEX", func() error { _, err := nexSubj.MintWorkload("ns", "w"); return err }, "reserved"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.err()
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
		})
	}

	// Claims: issued for the root account by the signing key, named and tagged.
	cd, err := m.MintWorkload("ns1", "w1")
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if uc.Issuer != sigPub || uc.IssuerAccount != accPub || uc.Name != "w1" || !uc.Tags.Contains("nex-namespace:ns1") {
		t.Fatalf("claims: issuer %s account %s name %s tags %v", uc.Issuer, uc.IssuerAccount, uc.Name, uc.Tags)
	}
	// Signing with the account identity key itself: no issuer_account.
	self, _ := NewSigningKeyMinter(string(seed), sigPub, Options{})
	cd, _ = self.MintAgent("a1", "n1", false)
	uc, _ = jwt.DecodeUserClaims(cd.NatsUserJWT)
	if uc.IssuerAccount != "" {
		t.Fatalf("issuer account %q set for the account's own key", uc.IssuerAccount)
	}
}

// The node's own user:password in --nats.servers never reaches a nexlet or workload.
func TestServersHandedToChildrenCarryNoUserinfo(t *testing.T) {
	m := NewNoAuthMinter(Options{Servers: []string{"nats://admin:s3cret@127.0.0.1:4222", "tls://tok3n@h:4443"}})
	for _, mintOne := range []func() (string, error){
		func() (string, error) {
			cd, err := m.MintRegister("a1", "node1")
			return strings.Join(cd.NatsServers, ","), err
		},
		func() (string, error) {
			cd, err := m.MintAgent("a1", "node1", false)
			return strings.Join(cd.NatsServers, ","), err
		},
		func() (string, error) {
			cd, err := m.MintWorkload("ns", "w1")
			return strings.Join(cd.NatsServers, ","), err
		},
	} {
		got, err := mintOne()
		if err != nil {
			t.Fatal(err)
		}
		if got != "nats://127.0.0.1:4222,tls://h:4443" {
			t.Errorf("servers handed out: %q", got)
		}
	}
}
