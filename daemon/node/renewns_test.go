package node

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// laxRenewals is the signing-key minter with its own namespace check on renewals
// removed: it mints whatever namespace it is asked for, as a minter that keeps no
// memory of namespaces would.
type laxRenewals struct{ *mint.SigningKeyMinter }

func (m laxRenewals) RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	return m.MintWorkload(namespace, workloadID)
}

// TestRenewalOfAnotherNamespaceRefusedByTheNode: a rogue nexlet, as the user its node
// minted for it on an operator-mode server, asks the node to renew the credentials of
// its own workload (placed in tenant) for namespace tenant-b. The node checked that
// the nexlet runs the workload, not the namespace, and left that to the minter: with
// the minter's check removed it handed the rogue a workload user of tenant-b, which
// read tenant-b's workload logs. Now the node refuses (403, naming both namespaces);
// a renewal in the workload's own namespace is still served.
func TestRenewalOfAnotherNamespaceRefusedByTheNode(t *testing.T) {
	var lax laxRenewals
	rf := newRogueFixture(t, func(o *Options) {
		lax = laxRenewals{o.Minter.(*mint.SigningKeyMinter)}
		o.Minter = lax
	})
	rf.m = lax.SigningKeyMinter
	n := rf.nodes[0]
	rogue := rf.minted("rogue0", "rogue", "native", nil)
	wid := rf.deployOne("tenant")

	renew := func(ns string) *nats.Msg {
		t.Helper()
		m, err := rogue.nc.Request(protocol.RenewCredsSubject(n.ID(), rogue.id, wid), mustJSON(t, protocol.RenewCredsRequest{Namespace: ns}), 10*time.Second)
		if err != nil {
			t.Fatalf("renewal in %s: %v", ns, err)
		}
		return m
	}
	m := renew("tenant-b")
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "403" {
		t.Errorf("the rogue's renewal of its workload in tenant-b answered %q %s, want 403", code, m.Data)
		var cd protocol.NatsConnectionData
		if err := protocol.Decode(m.Data, &cd); err == nil && cd.NatsUserJWT != "" {
			stolen := testnats.Connect(t, rf.op.Server, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed), nats.CustomInboxPrefix(cd.InboxPrefix))
			logs, err := stolen.SubscribeSync(protocol.FeedWildcard("tenant-b", "logs"))
			if err != nil {
				t.Fatal(err)
			}
			if err := stolen.Flush(); err != nil {
				t.Fatal(err)
			}
			if err := rf.client.Publish(protocol.LogSubject("tenant-b", "bwid", "stdout"), []byte("tenant-b's line")); err != nil {
				t.Fatal(err)
			}
			if got, err := logs.NextMsg(2 * time.Second); err == nil {
				t.Errorf("with the renewed user the rogue read tenant-b's log: %q", got.Data)
			}
		}
	} else if body := string(m.Data); !strings.Contains(body, `\"tenant\"`) || !strings.Contains(body, `\"tenant-b\"`) {
		t.Errorf("refusal %s does not name both namespaces", body)
	}
	if m := renew("tenant"); m.Header.Get(protocol.HeaderErrorCode) != "" {
		t.Errorf("the renewal in the workload's own namespace answered %s", m.Data)
	}
}
