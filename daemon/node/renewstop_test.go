package node

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// renewAfterRevoke is a signing-key minter whose workload renewals wait (3 s at most)
// until that workload's users were revoked: a test's hook into a renewal between the
// node's checks and its mint, while the workload's stop is handled. The revocations are
// the daemon's (its observer's WorkloadEnded revokes the ended workload's users).
type renewAfterRevoke struct {
	*mint.SigningKeyMinter
	mu      sync.Mutex
	revoked map[string]chan struct{}
}

func (m *renewAfterRevoke) signal(id string) chan struct{} {
	m.mu.Lock()
	defer m.mu.Unlock()
	c, ok := m.revoked[id]
	if !ok {
		c = make(chan struct{})
		m.revoked[id] = c
	}
	return c
}

func (m *renewAfterRevoke) RenewWorkload(ns, id string) (protocol.NatsConnectionData, error) {
	select {
	case <-m.signal(id):
	case <-time.After(3 * time.Second):
	}
	return m.SigningKeyMinter.RenewWorkload(ns, id)
}

func (m *renewAfterRevoke) PrivateInboxes() bool { return false } // the fixture's nexlets use the default inbox

// revokingObserver revokes an ended workload's users, as the daemon's observer does.
type revokingObserver struct {
	m  *renewAfterRevoke
	wg sync.WaitGroup
}

func (o *revokingObserver) Auction(time.Duration)      {}
func (o *revokingObserver) Deploy(time.Duration, bool) {}
func (o *revokingObserver) Stop(string)                {}
func (o *revokingObserver) WorkloadEnded(id string) {
	o.wg.Go(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = o.m.SigningKeyMinter.RevokeWorkload(ctx, id)
		close(o.m.signal(id))
	})
}

// TestAttackRenewalRacesStop: a nexlet renews a workload's credentials while the
// workload's end is handled (a rogue nexlet chooses that moment: it reports the end
// itself). The node's bus is the test fixture's; the credentials are checked on a real
// operator-mode server whose account the minter issues for and revokes in.
//
// Before, the renewal passed the node's ownership check, the end removed the workload
// and revoked its users, and then the renewal minted: a user of a workload that no
// longer ran, which nothing revoked (valid until workload_creds_ttl). Before db0b833 the
// minter, having forgotten the workload's namespace with its users, also minted it for
// the namespace the renewal named, another tenant's (the second case; the node's own
// namespace check refuses it now). Now the check and the mint are one step under the
// node's lock, so an end handled after it revokes what it minted.
func TestAttackRenewalRacesStop(t *testing.T) {
	op, rev := revokingOperator(t, 48*time.Hour)
	sm := newSigningMinter(t, op, mint.Options{Revoker: rev})
	m := &renewAfterRevoke{SigningKeyMinter: sm, revoked: map[string]chan struct{}{}}
	obs := &revokingObserver{m: m}
	t.Cleanup(obs.wg.Wait)
	f := newFixture(t, 1, func(_ int, o *Options) { o.Minter = m; o.Observer = obs; o.RevokeGrace = time.Hour })
	n := f.nodes[0]
	a := f.healthyAgent(n, "agent0", "go_exec", "native", nil)
	connects := func(cd protocol.NatsConnectionData) error {
		nc, err := nats.Connect(op.Server.ClientURL(), nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed), nats.NoReconnect())
		if err != nil {
			return err
		}
		nc.Close()
		return nil
	}

	for _, tc := range []struct{ name, ns string }{
		{"its own namespace", "tenant"},
		{"another tenant's namespace", "victim"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wid := f.deployOne("tenant")
			users := sm.WorkloadUsers(wid)
			if len(users) == 0 {
				t.Fatal("no user minted for the deployed workload")
			}
			type answer struct {
				cd   protocol.NatsConnectionData
				code string
			}
			got := make(chan answer, 1)
			go func() {
				mm := request(t, f.client, protocol.RenewCredsSubject(n.ID(), "agent0", wid), protocol.RenewCredsRequest{Namespace: tc.ns})
				var cd protocol.NatsConnectionData
				code := mm.Header.Get(protocol.HeaderErrorCode)
				if code == "" {
					_ = protocol.Decode(mm.Data, &cd)
				}
				got <- answer{cd, code}
			}()
			time.Sleep(200 * time.Millisecond) // the renewal is in the node (or answered)
			a.emitStopped(wid, "tenant")
			r := <-got
			select { // the end's revocation of the workload's users
			case <-m.signal(wid):
			case <-time.After(10 * time.Second):
				t.Fatal("the ended workload's users were not revoked")
			}
			if r.code != "" {
				t.Logf("renewal answered %s", r.code)
				if tc.ns == "tenant" {
					t.Errorf("renewal in the workload's own namespace before its end was refused (%s); want it served", r.code)
				}
				return
			}
			uc, err := jwt.DecodeUserClaims(r.cd.NatsUserJWT)
			if err != nil {
				t.Fatal(err)
			}
			if !uc.Tags.Contains("nex-namespace:tenant") {
				t.Errorf("renewal of a workload of namespace tenant minted a user tagged %v: another tenant's", uc.Tags)
			}
			// Whatever the renewal got must stop working once the workload ended.
			if !testkit.WaitFor(5*time.Second, func() bool { return connects(r.cd) != nil }) {
				t.Errorf("the user the renewal minted (tags %v) still connects after the workload ended: never revoked", uc.Tags)
			}
		})
	}
}
