package mint

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
)

// switchRevoker revokes through cur, and says when a revocation failed.
type switchRevoker struct {
	cur    atomic.Pointer[AccountRevoker]
	failed chan error
}

func (r *switchRevoker) RevokeUser(ctx context.Context, pub string, at time.Time) error {
	err := r.cur.Load().RevokeUser(ctx, pub, at)
	if err != nil {
		select {
		case r.failed <- err:
		default:
		}
	}
	return err
}

func connects(url, jwt, seed string) bool {
	nc, err := nats.Connect(url, nats.UserJWTAndSeed(jwt, seed), nats.NoReconnect())
	if err == nil {
		nc.Close()
	}
	return err == nil
}

// TestFailedRevocationRetried: a stopped workload's revocation fails for real (the
// revoker's system-account connection closed); once it is back, the retry revokes the
// user. Before, the one failed attempt was all: the user connected until its expiry.
func TestFailedRevocationRetried(t *testing.T) {
	e, _, good := startRevokingOperator(t)
	down := e.userOf(t, e.sysKP)
	down.Close()
	rev := &switchRevoker{failed: make(chan error, 1)}
	rev.cur.Store(NewSystemAccountRevoker(down, e.opKP, e.accPub, 48*time.Hour))
	m := newSigning(t, e, Options{Revoker: rev})
	ctx, cancel := context.WithTimeout(context.Background(), 4*waitLong)
	defer cancel()

	wid := nuid.Next()
	cd, err := m.MintWorkload("ns1", wid)
	if err != nil {
		t.Fatal(err)
	}
	url := e.s.ClientURL()
	if !connects(url, cd.NatsUserJWT, cd.NatsUserSeed) {
		t.Fatal("the workload's user does not connect before its stop")
	}
	done := make(chan error, 1)
	go func() {
		done <- RetryRevocation(ctx, waitLong, time.Now().Add(time.Hour), func(ctx context.Context) error {
			return m.RevokeWorkload(ctx, wid)
		})
	}()
	select {
	case err := <-rev.failed:
		if !errors.Is(err, nats.ErrConnectionClosed) {
			t.Errorf("the revocation failed with %v, want %v", err, nats.ErrConnectionClosed)
		}
	case <-time.After(waitLong):
		t.Fatal("the revocation through the closed connection never failed")
	}
	if !connects(url, cd.NatsUserJWT, cd.NatsUserSeed) {
		t.Fatal("the user is refused after the failed revocation: the fault was not one")
	}
	rev.cur.Store(good) // the system account's connection is back
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("the retried revocation: %v", err)
		}
	case <-ctx.Done():
		t.Fatal("the revocation was not retried")
	}
	if connects(url, cd.NatsUserJWT, cd.NatsUserSeed) {
		t.Error("the stopped workload's user still connects after the retry")
	}
	if got := m.WorkloadUsers(wid); len(got) != 0 {
		t.Errorf("users of the stopped workload still remembered: %v", got)
	}
}

// TestRevocationRetryGivesUpAtExpiry: nothing is retried once the users have expired.
func TestRevocationRetryGivesUpAtExpiry(t *testing.T) {
	calls := 0
	fail := errors.New("refused")
	err := RetryRevocation(context.Background(), time.Second, time.Now().Add(RetryFirstWait/2), func(context.Context) error {
		calls++
		return fail
	})
	if !errors.Is(err, fail) || calls != 1 {
		t.Errorf("got %v after %d calls, want %v after 1", err, calls, fail)
	}
}
