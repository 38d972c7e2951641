package mint

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"
)

// startRevokingOperator starts an operator-mode server with a full (directory)
// resolver, as a production operator setup has, and a revoker through its system
// account.
func startRevokingOperator(t *testing.T) (*opEnv, *server.DirAccResolver, *AccountRevoker) {
	t.Helper()
	res, err := server.NewDirAccResolver(t.TempDir(), 0, time.Hour, server.NoDelete)
	if err != nil {
		t.Fatal(err)
	}
	e := startOperatorWith(t, res)
	return e, res, NewSystemAccountRevoker(e.userOf(t, e.sysKP), e.opKP, e.accPub, 48*time.Hour)
}

// holdingRevoker holds its first revocation of user until released, saying when it
// holds it; every other revocation goes to Revoker at once.
type holdingRevoker struct {
	Revoker
	user     string
	held     chan struct{}
	release  chan struct{}
	holdOnce sync.Once
}

func (r *holdingRevoker) RevokeUser(ctx context.Context, pub string, at time.Time) error {
	hold := false
	if pub == r.user {
		r.holdOnce.Do(func() { hold = true })
	}
	if hold {
		close(r.held)
		<-r.release
	}
	return r.Revoker.RevokeUser(ctx, pub, at)
}

// TestStoppedWhileSupersededRevokedIsRevoked: a workload whose renewal's revocation of
// its older user is under way when the workload ends; the end's revocation must not
// be done before that user is revoked. Before, RevokeSuperseded took the older users
// off the workload's list before revoking them, so RevokeWorkload revoked the renewed
// user only and returned while the first one still connected (as in daemon/node
// TestAttackRenewalFloodCostsTheNodeBounded, "1 users still connect", now and then
// under load); had that revocation then failed, it was not kept, the workload being
// forgotten, and the user stayed valid to its expiry.
func TestStoppedWhileSupersededRevokedIsRevoked(t *testing.T) {
	e, _, sysRev := startRevokingOperator(t)
	rev := &holdingRevoker{Revoker: sysRev, held: make(chan struct{}), release: make(chan struct{})}
	m := newSigning(t, e, Options{Revoker: rev})
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()

	wid := nuid.Next()
	first, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	kp, _ := nkeys.FromSeed([]byte(first.NatsUserSeed))
	rev.user, _ = kp.PublicKey()
	renewed, err := m.RenewWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	superseded := make(chan error, 1)
	go func() { superseded <- m.RevokeSuperseded(ctx, wid) }()
	select {
	case <-rev.held:
	case <-time.After(waitLong):
		t.Fatal("the renewal's revocation of the first user never began")
	}
	released := false
	defer func() {
		if !released {
			close(rev.release)
			<-superseded
		}
	}()

	// The workload ends while the first user's revocation is held.
	if err := m.RevokeWorkload(ctx, wid); err != nil {
		t.Fatal(err)
	}
	for what, cd := range map[string]struct{ jwt, seed string }{
		"the first user (its revocation by the renewal under way)": {first.NatsUserJWT, first.NatsUserSeed},
		"the renewed user": {renewed.NatsUserJWT, renewed.NatsUserSeed},
	} {
		if nc, err := nats.Connect(e.s.ClientURL(), nats.UserJWTAndSeed(cd.jwt, cd.seed), nats.NoReconnect()); err == nil {
			nc.Close()
			t.Errorf("the ended workload's revocation returned, yet %s still connects", what)
		}
	}

	close(rev.release)
	released = true
	if err := <-superseded; err != nil {
		t.Errorf("the renewal's revocation: %v", err)
	}
	if got := m.WorkloadUsers(wid); len(got) != 0 {
		t.Errorf("users of the ended workload still remembered: %v", got)
	}
}
