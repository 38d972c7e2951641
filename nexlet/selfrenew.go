package nexlet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/wallclock"
	"github.com/nexd-project/nexd/protocol"
)

// liveCreds is the nexlet's current NATS user: the connection reads it at every
// (re)connect, so a renewal takes over the same *nats.Conn.
type liveCreds struct {
	mu       sync.Mutex
	token    string
	kp       nkeys.KeyPair
	iat, exp time.Time // exp zero: the user does not expire
}

// newLiveCreds holds a JWT user from connection data; nil when cd has none (a shared
// nkey, user/password or no credentials: nothing to renew).
func newLiveCreds(cd protocol.NatsConnectionData) (*liveCreds, error) {
	if cd.NatsUserJWT == "" || cd.NatsUserSeed == "" {
		return nil, nil
	}
	kp, err := nkeys.FromSeed([]byte(cd.NatsUserSeed))
	if err != nil {
		return nil, fmt.Errorf("connection data: nats_user_seed: %w", err)
	}
	l := &liveCreds{}
	if err := l.set(cd.NatsUserJWT, kp); err != nil {
		return nil, err
	}
	return l, nil
}

// set replaces the user; the JWT must be issued to kp.
func (l *liveCreds) set(token string, kp nkeys.KeyPair) error {
	uc, err := jwt.DecodeUserClaims(token)
	if err != nil {
		return fmt.Errorf("nexlet user JWT: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return err
	}
	if uc.Subject != pub {
		return fmt.Errorf("nexlet user JWT is issued to %s, not to this nexlet's key %s", uc.Subject, pub)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.token, l.kp = token, kp
	l.iat, l.exp = time.Unix(uc.IssuedAt, 0), time.Time{}
	if uc.Expires > 0 {
		l.exp = time.Unix(uc.Expires, 0)
	}
	return nil
}

func (l *liveCreds) jwt() (string, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.token, nil
}

func (l *liveCreds) sign(nonce []byte) ([]byte, error) {
	l.mu.Lock()
	kp := l.kp
	l.mu.Unlock()
	return kp.Sign(nonce)
}

// renewAt is when the user should be renewed, zero when it does not expire: at 80 %
// of its lifetime, or at half of it when that leaves less than renewMargin, so that
// the old connection has time to answer what it took before the old user expires.
func (l *liveCreds) renewAt() (at, exp time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.exp.IsZero() {
		return time.Time{}, time.Time{}
	}
	life := l.exp.Sub(l.iat)
	return l.exp.Add(-max(life/5, min(life/2, renewMargin))), l.exp
}

// renewMargin is what a renewal leaves before the old user expires, where the
// lifetime allows.
const renewMargin = 10 * time.Second

// Bounds of the retries of a failed self-renewal.
const (
	selfRenewRetryMin = time.Second
	selfRenewRetryMax = 30 * time.Second
	selfRenewWait     = 10 * time.Second // one request
)

// renewLoop renews the nexlet's own user at 80 % of its lifetime, for as long as ctx
// lives (a nexd extension; an upstream node serves no such subject and the loop stops
// after a few requests without responders).
func (r *Runner) renewLoop(ctx context.Context, live *liveCreds) {
	wait, noResponders := selfRenewRetryMin, 0
	for {
		at, exp := live.renewAt()
		if at.IsZero() {
			return
		}
		// By the wall clock, by which the server expires the user (a paused host).
		if !wallclock.Until(ctx, at, wallclock.Slice(exp.Sub(at)), time.Now) {
			return
		}
		err := r.renewSelf(ctx, live)
		if err == nil {
			wait, noResponders = selfRenewRetryMin, 0
			continue
		}
		if ctx.Err() != nil {
			return
		}
		if errors.Is(err, nats.ErrNoResponders) {
			if noResponders++; noResponders >= 5 {
				r.log.Warn("the node does not renew nexlet credentials; they expire", "expires", exp, "err", err)
				return
			}
		}
		r.log.Warn("renewing the nexlet's credentials failed; retrying", "expires", exp, "retry_in", wait, "err", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		wait = min(wait*2, selfRenewRetryMax)
	}
}

// renewSelf asks the node to sign a user for a fresh key of the nexlet's own and moves
// the nexlet to it make-before-break: a second connection with the new user serves the
// endpoints (same queue group) before the old one stops taking requests; the old one
// is closed once every request it took is answered (a reply must leave on the
// connection that received the request), and then the node is told, which revokes the
// old users. No request is lost and none is answered twice.
func (r *Runner) renewSelf(ctx context.Context, live *liveCreds) error {
	r.mu.Lock()
	nc, agentID, cd, reg := r.nc, r.agentID, r.cd, r.reg
	r.mu.Unlock()
	if nc == nil || agentID == "" || reg == nil {
		return ErrNotRegistered
	}
	kp, err := nkeys.CreateUser()
	if err != nil {
		return fmt.Errorf("create user nkey: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return err
	}
	var renewed protocol.NatsConnectionData
	if err := r.askRenewal(ctx, nc, agentID, protocol.RenewAgentCredsRequest{PublicKey: pub}, &renewed); err != nil {
		return err
	}
	_, oldExp := live.renewAt()
	if err := live.set(renewed.NatsUserJWT, kp); err != nil {
		return fmt.Errorf("renew nexlet credentials: %w", err)
	}
	_, exp := live.renewAt()
	r.log.Info("nexlet credentials renewed", "agent_id", agentID, "expires", exp)

	nc2, err := connect(cd, "nexlet-"+reg.Name, live)
	if err != nil {
		return fmt.Errorf("connect with the renewed credentials: %w", err)
	}
	busy2 := new(atomic.Int64)
	svc2, err := r.serve(nc2, agentID, busy2)
	if err != nil {
		nc2.Close()
		return fmt.Errorf("serve on the renewed connection: %w", err)
	}
	r.mu.Lock()
	if ctx.Err() != nil { // shutting down: Shutdown takes the current connection
		r.mu.Unlock()
		_ = svc2.Stop()
		nc2.Close()
		return ctx.Err()
	}
	oldNC, oldSvc, oldBusy := r.nc, r.svc, r.busy
	r.nc, r.svc, r.busy = nc2, svc2, busy2
	r.mu.Unlock()
	if oldSvc != nil {
		if err := oldSvc.Stop(); err != nil {
			r.log.Warn("stopping the endpoints on the old connection", "err", err)
		}
	}
	// The old connection's retirement (up to the old user's expiry) and the switch
	// report (up to selfRenewWait) run beside the loop, which schedules the next
	// renewal from the new user at once: waited for here, they ate into its margin,
	// and a starved nexlet with a 20 s user renewed after its expiry and was cut off.
	// A late report is harmless: the node revokes only users older than the key it
	// names. renewLoop, which calls this, holds r.renewing, so the count is above 0.
	r.renewing.Go(func() {
		r.retire(ctx, oldNC, oldBusy, oldExp)
		if err := r.askRenewal(ctx, nc2, agentID, protocol.RenewAgentCredsRequest{PublicKey: pub, Switched: true}, nil); err != nil {
			// The node revokes the old users after a bound anyway.
			r.log.Warn("could not tell the node the nexlet switched to its renewed user", "agent_id", agentID, "err", err)
		}
	})
	return nil
}

// retire closes a connection the nexlet moved away from once the requests it took are
// answered: busy must stay at zero for a moment (the drained subscriptions hand over
// what they still held), at most switchIdleWait and never past the old user's expiry
// (the server cuts it then anyway). When the runner ends (ctx) it waits for those
// requests alone, at most the shutdown wait more: Shutdown waits for them, and their
// replies must leave on this connection. Before, it closed the connection at once, and
// a start taken there and answered after it lost its reply.
func (r *Runner) retire(ctx context.Context, nc *nats.Conn, busy *atomic.Int64, oldExp time.Time) {
	deadline := time.Now().Add(switchIdleWait)
	if !oldExp.IsZero() && oldExp.Before(deadline) {
		deadline = oldExp
	}
	idle := func() bool { return busy == nil || busy.Load() == 0 }
	ending, ended := ctx.Done(), false
	quiet := 0
	for quiet < 3 && time.Now().Before(deadline) {
		select {
		case <-ending:
			ending, ended = nil, true // once
			if d := time.Now().Add(r.sdWait); d.Before(deadline) {
				deadline = d
			}
			if idle() {
				quiet = 3
			}
			continue
		case <-time.After(100 * time.Millisecond):
		}
		switch {
		case idle() && ended:
			quiet = 3 // no request comes any more: the endpoints stopped
		case idle():
			quiet++
		default:
			quiet = 0
		}
	}
	if busy != nil && busy.Load() > 0 {
		r.log.Warn("closing the old connection with requests still unanswered", "requests", busy.Load())
	}
	if err := nc.Drain(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
		nc.Close()
	}
}

// askRenewal sends one signed RENEWAGENT request and decodes the reply into out.
func (r *Runner) askRenewal(ctx context.Context, nc *nats.Conn, agentID string, req protocol.RenewAgentCredsRequest, out any) error {
	body, err := protocol.Marshal(req)
	if err != nil {
		return err
	}
	subj := protocol.RenewAgentCredsSubject(r.nodeID, agentID)
	m := nats.NewMsg(subj)
	m.Data = body
	if r.regKey != nil {
		if err := signRegistration(m, r.regKey); err != nil {
			return err
		}
	}
	rctx, cancel := context.WithTimeout(ctx, selfRenewWait)
	defer cancel()
	msg, err := nc.RequestMsgWithContext(rctx, m)
	if err != nil {
		return fmt.Errorf("renew nexlet credentials on %s: %w", subj, err)
	}
	if code := msg.Header.Get(protocol.HeaderErrorCode); code != "" {
		return fmt.Errorf("renew nexlet credentials on %s refused: %s %s: %s", subj, code, msg.Header.Get(protocol.HeaderError), bytes.TrimSpace(msg.Data))
	}
	if out == nil {
		return nil
	}
	if err := protocol.Decode(msg.Data, out); err != nil {
		return fmt.Errorf("renew nexlet credentials on %s: %w", subj, err)
	}
	return nil
}

// switchIdleWait bounds how long an old connection stays open for the requests it
// took (starts, stops, lame duck) to be answered.
const switchIdleWait = 30 * time.Second
