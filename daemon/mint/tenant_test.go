package mint

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/testnats"
)

// TestTenantPermissionsRefuseWideNamespaces: a namespace that is not one plain token,
// is system, or is an inbox would widen the tenant's user (_INBOX.> reads every
// client's replies).
func TestTenantPermissionsRefuseWideNamespaces(t *testing.T) {
	for _, ns := range []string{"", "system", "_INBOX", "_INBOX_x", "a.b", "*", ">", "$NEX"} {
		if _, err := TenantPermissions(ns); err == nil {
			t.Errorf("TenantPermissions(%q) accepted", ns)
		}
	}
	p, err := TenantPermissions("team-a")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Pub.Allow) != 2 || !p.Pub.Allow.Contains("$NEX.SVC.team-a.control.>") ||
		len(p.Sub.Allow) != 3 || !p.Sub.Allow.Contains("_INBOX_tenant-team-a.>") || p.Sub.Allow.Contains("_INBOX.>") ||
		!p.Sub.Allow.Contains("$NEX.FEED.team-a.>") {
		t.Errorf("team-a: %+v", p)
	}
}

// TestWorkloadInInboxNamespace is the attack: whoever may deploy in a namespace named
// _INBOX (or _INBOX_<an agent id>) got a workload user with sub <ns>.>, that is every
// reply on the default inbox (nexctl's lists and deploy answers) or a nexlet's private
// one (its credentials). Such a namespace's workload user is now refused at mint.
func TestWorkloadInInboxNamespace(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	m := newSigning(t, e, Options{})
	if _, err := admin.Subscribe("svc", func(m *nats.Msg) { _ = m.Respond([]byte("secret")) }); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"_INBOX", "_INBOX_AGENTX"} {
		cd, err := m.MintWorkload(ns, nuid.Next())
		if err != nil {
			continue
		}
		w := mustDial(t, e.s.ClientURL(), cd)
		sub, err := w.nc.SubscribeSync(ns + ".>")
		if err != nil || w.nc.Flush() != nil {
			t.Fatal(err)
		}
		// Another client (the node's, say) asks on that inbox.
		tok, seed := e.op.User(t, "asker", nil)
		asker := testnats.Connect(t, e.s, nats.UserJWTAndSeed(tok, seed), nats.CustomInboxPrefix(ns))
		if _, err := asker.Request("svc", nil, waitLong); err != nil {
			t.Fatal(err)
		}
		if m, err := sub.NextMsg(time.Second); err == nil {
			t.Errorf("a workload of namespace %s caught the reply %s %q", ns, m.Subject, m.Data)
		} else {
			t.Errorf("a workload of namespace %s was minted", ns)
		}
	}
}

// TestWorkloadInDollarNamespace is the attack: a workload of a namespace named $KV
// (or $JS, $O, …) got pub+sub $KV.>, so it could write records into the node-state
// bucket, which the node replays as workloads to start. Such a namespace's workload
// user is now refused at mint, as the deploy and TenantPermissions refuse the name.
func TestWorkloadInDollarNamespace(t *testing.T) {
	e := startOperator(t)
	admin := e.admin(t)
	js, err := jetstream.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(t.Context(), jetstream.KeyValueConfig{Bucket: "nex-node"})
	if err != nil {
		t.Fatal(err)
	}
	m := newSigning(t, e, Options{})
	for _, ns := range []string{"$KV", "$JS", "$O"} {
		cd, err := m.MintWorkload(ns, nuid.Next())
		if err != nil {
			continue
		}
		if ns == "$KV" {
			w := mustDial(t, e.s.ClientURL(), cd)
			if _, err := jetstream.New(w.nc); err != nil {
				t.Fatal(err)
			}
			if err := w.nc.Publish("$KV.nex-node.planted", []byte(`{"namespace":"system"}`)); err != nil || w.nc.Flush() != nil {
				t.Fatal(err)
			}
			for i := 0; i < 150; i++ { // stored in moments; the check below says whether
				if _, err := kv.Get(t.Context(), "planted"); err == nil {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
		t.Errorf("a workload of namespace %s was minted", ns)
	}
	if _, err := kv.Get(t.Context(), "planted"); err == nil {
		t.Errorf("a workload of namespace $KV wrote into the node-state bucket")
	}
	if _, err := TenantPermissions("$KV"); err == nil {
		t.Errorf("TenantPermissions($KV) accepted")
	}
}
