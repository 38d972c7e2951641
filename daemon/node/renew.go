package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"

	"github.com/nexd-project/nexd/protocol"
)

// renewEndpoint is the nexd extension that lets a nexlet renew a running workload's
// expiring credentials.
func (n *Node) renewEndpoint() endpoint {
	return endpoint{name: "RenewWorkloadCreds", subject: protocol.RenewCredsSubject(n.id, "*", "*"), handle: n.handleRenewCreds}
}

// renewAgentEndpoint is the nexd extension that lets a nexlet renew its own user.
func (n *Node) renewAgentEndpoint() endpoint {
	return endpoint{name: "RenewAgentCreds", subject: protocol.RenewAgentCredsSubject(n.id, "*"), handle: n.handleRenewAgent}
}

// handleRenewAgent serves $NEX.SVC.<node>.agent.RENEWAGENT.<agentId>: a registered
// nexlet asks for a fresh user of its own, for a public key it made. Only its user may
// publish there, and the nexlet must sign this request with the key it signed its
// registration with, so a copy of its user alone cannot renew itself; the reply holds
// no seed, so reading it is of no use either. The nexlet's older users are revoked,
// where the minter can revoke, once it says it switched (or after AgentSwitchWait).
func (n *Node) handleRenewAgent(r micro.Request) {
	agentID := protocol.Token(r.Subject(), 5)
	if !protocol.IsToken(agentID) {
		n.fail(r, 400, "bad renewal subject", fmt.Errorf("renew nexlet credentials: subject %q: want RENEWAGENT.<agent id>", r.Subject()))
		return
	}
	if !n.ownInbox(r, agentID) {
		return
	}
	var req protocol.RenewAgentCredsRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad renewal request", err)
		return
	}
	n.mu.Lock()
	a := n.agents[agentID]
	n.mu.Unlock()
	if a == nil {
		n.fail(r, 403, "renewal refused", fmt.Errorf("renew nexlet credentials: nexlet %s is not registered with node %s", agentID, n.id))
		return
	}
	if a.key == "" {
		// Its user is its only proof, and a copy of that must not renew itself.
		n.fail(r, 403, "renewal refused", fmt.Errorf("renew nexlet credentials of %s: only a nexlet that signed its registration may renew its user", agentID))
		return
	}
	if err := n.verifyRegistration(r, a.key); err != nil {
		n.log.Warn("nexlet credential renewal refused", "agent_id", agentID, "name", a.req.Name, "err", err)
		n.fail(r, 403, "renewal refused", fmt.Errorf("renew nexlet credentials of %s: %w", agentID, err))
		return
	}
	if !req.Switched && !n.agentCallAllowed(a, "nexlet renewals of its own user dropped unanswered: more than it needs",
		&n.agentRenewals.dropped) {
		return
	}
	if req.Switched {
		// The nexlet connects with its new user now: its older users go at once.
		n.log.Debug("renewed nexlet switched to its new user", "agent_id", agentID, "name", a.req.Name)
		n.respondJSON(r, struct{}{})
		n.revokeAgentBefore(agentID, req.PublicKey, 0)
		return
	}
	creds, err := n.o.Minter.RenewAgent(agentID, n.id, req.PublicKey, a.direct)
	if err != nil {
		code := 400
		if errors.Is(err, mint.ErrRenewalUnsupported) {
			code = 409
		}
		n.fail(r, code, "renewal refused", err)
		return
	}
	n.log.Debug("nexlet credentials renewed", "agent_id", agentID, "name", a.req.Name)
	n.respondJSON(r, creds)
	// Requests the nexlet is answering on its old connection would lose their replies
	// if it were cut now: it switches when idle and says so; this bounds the wait.
	n.revokeAgentBefore(agentID, req.PublicKey, n.o.AgentSwitchWait)
}

// revokeAgentBefore revokes the nexlet's users older than userPub after wait.
func (n *Node) revokeAgentBefore(agentID, userPub string, wait time.Duration) {
	n.after(wait, "agent_id", agentID, func(ctx context.Context) error {
		return n.o.Minter.RevokeAgentBefore(ctx, agentID, userPub)
	})
}

// renewedCreds are the newest credentials a renewal minted for a workload, for the
// nexlet instance owner in namespace ns, and until when a renewal gets them again.
type renewedCreds struct {
	owner, ns string
	cd        protocol.NatsConnectionData
	until     time.Time
}

// reuseUntil is until when a renewal gets cd again rather than a new user: half its
// lifetime, by its JWT's times (the nexlet renews at 80 % of that lifetime by the same
// times, so it always gets a new one). Zero for credentials that do not expire, which
// a renewal has no reason to replace and which the minters without JWTs hand out
// without minting.
func reuseUntil(cd protocol.NatsConnectionData) time.Time {
	iat, life := userLifetime(cd)
	if life == 0 {
		return time.Time{}
	}
	return iat.Add(life / 2)
}

// userLifetime is when cd's user JWT was issued and how long it lives; a zero
// lifetime for credentials without a JWT or one that does not expire.
func userLifetime(cd protocol.NatsConnectionData) (time.Time, time.Duration) {
	if cd.NatsUserJWT == "" {
		return time.Time{}, 0
	}
	uc, err := jwt.DecodeUserClaims(cd.NatsUserJWT)
	if err != nil || uc.Expires <= uc.IssuedAt {
		return time.Time{}, 0
	}
	iat := time.Unix(uc.IssuedAt, 0)
	return iat, time.Unix(uc.Expires, 0).Sub(iat)
}

// renewOwned gives fresh credentials of workloadID to nexlet agentID if this node
// deployed or replayed that workload to that nexlet (the same nexlet instance, its
// stable identity, not merely one of the same type) in namespace ns. The check and the
// mint are one step under the node's lock, which the workload's end takes to forget it:
// an end handled after the mint revokes the user it made (the minter holds it by
// then), and a renewal after the end finds nothing to renew. Before, an end between
// the check and the mint revoked the workload's users and made the minter forget it,
// and the mint then made a user nothing revoked (TestAttackRenewalRacesStop). The
// namespace is checked against the node's own record, not left to the minter, which
// may not know it (TestRenewalOfAnotherNamespaceRefusedByTheNode).
//
// A renewal while the newest credentials a renewal minted for the workload are in the
// first half of their lifetime gets those again (minted false): no new user, and no
// revocation of the old ones. A nexlet renews at 80 % of the lifetime, so an honest
// one always gets new credentials, and one that asks again because it lost the answer
// gets the answer it lost. Before, each renewal minted a user under the node's lock and
// scheduled the revocation of the older ones, each a rewrite of the account JWT, and a
// rogue nexlet renewing its own workload as fast as it could had the node mint 67,000-115,000
// users in a minute and queue their revocations ahead of the revocation of every
// stopped workload's users (TestAttackRenewalFloodCostsTheNodeBounded). Now a renewal
// mints at most twice per lifetime per workload. The credentials kept are those the
// nexlet was handed already; the node forgets them with the workload.
func (n *Node) renewOwned(agentID, workloadID, ns string) (creds protocol.NatsConnectionData, minted bool, code int, err error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a := n.agents[agentID]
	if a == nil {
		return creds, false, 403, fmt.Errorf("renew credentials of workload %s: nexlet %s is not registered with node %s", workloadID, agentID, n.id)
	}
	o, ok := n.owned[workloadID]
	if !ok || o.owner != a.owner {
		return creds, false, 404, fmt.Errorf("renew credentials: node %s did not give workload %s to nexlet %s", n.id, workloadID, agentID)
	}
	if o.ns != ns {
		return creds, false, 403, fmt.Errorf("renew credentials of workload %s: it runs in namespace %q, not %q", workloadID, o.ns, ns)
	}
	if c, ok := n.renewed[workloadID]; ok && c.owner == o.owner && c.ns == ns && time.Now().Before(c.until) {
		return c.cd, false, 0, nil
	}
	creds, err = n.o.Minter.RenewWorkload(ns, workloadID)
	if err != nil {
		return creds, false, 403, fmt.Errorf("renew credentials of workload %s in namespace %s: %w", workloadID, ns, err)
	}
	if until := reuseUntil(creds); !until.IsZero() {
		n.renewed[workloadID] = renewedCreds{owner: o.owner, ns: ns, cd: creds, until: until}
	} else {
		delete(n.renewed, workloadID)
	}
	return creds, true, 0, nil
}

// A nexlet's workload renewals are served at RenewRate a second, with bursts of
// RenewBurst; the rest are dropped unanswered before any other work, as an auction
// flood's are: an honest nexlet renews each workload once in 80 % of its lifetime
// (bursts of RenewBurst cover the workloads a deploy burst or a replay minted together;
// one whose renewal is dropped asks again within 30 s and has the last fifth of the
// lifetime to do so). Before, every request was answered, and a nexlet flooding
// renewals had the node answer it as fast as the node could
// (TestAttackRenewalFloodCostsTheNodeBounded).
const (
	RenewRate  = 100
	RenewBurst = 1000
)

// renewLimitsMax bounds the buckets kept: beyond it they start again full. Only an
// open bus lets a client renew under ids of its choosing.
const renewLimitsMax = 4096

// renewWarnEvery bounds how often dropped renewals are warned of.
const renewWarnEvery = time.Minute

// renewLimits is a token bucket per nexlet for its workload renewals.
type renewLimits struct {
	mu      sync.Mutex
	buckets map[string]*renewBucket
	dropped atomic.Uint64
	log     rateLog
}

type renewBucket struct {
	tokens float64
	last   time.Time
}

// allow takes a token of agentID's bucket, which holds burst tokens and gains rate a
// second.
func (l *renewLimits) allow(agentID string, now time.Time, rate, burst float64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.buckets[agentID]
	if b == nil {
		if l.buckets == nil || len(l.buckets) >= renewLimitsMax {
			l.buckets = map[string]*renewBucket{}
		}
		b = &renewBucket{tokens: burst, last: now}
		l.buckets[agentID] = b
	}
	b.tokens = min(burst, b.tokens+now.Sub(b.last).Seconds()*rate)
	b.last = now
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// refund gives back a token allow took of agentID's bucket (up to burst): the call
// was refused for the node's own reason, not served.
func (l *renewLimits) refund(agentID string, burst float64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.buckets[agentID]; b != nil {
		b.tokens = min(burst, b.tokens+1)
	}
}

// RenewalsDropped counts the workload renewals dropped past a nexlet's rate.
func (n *Node) RenewalsDropped() uint64 { return n.renewals.dropped.Load() }

// A nexlet's renewals of its own user (RENEWAGENT, its switch reports aside) are
// served agentRenewBurst at once and agentRenewsPerLife over the lifetime of the user
// its registration got; the rest are dropped unanswered once the signature checked
// (so that only the nexlet's own key spends its tokens). An honest nexlet renews once
// at 80 % of that lifetime (half of it when that leaves less than 10 s) and asks again
// on a failure, with a backoff from 1 s to 30 s.
// Before, every renewal was served: each minted a nexlet user and, once superseded,
// revoked the older ones, each a rewrite of the account JWT whose revocations are
// kept for the longest TTL and an hour, so a rogue nexlet's flood grew the JWT that
// every revocation of every tenant's stopped workload rewrites
// (TestAttackNexletRenewalFloodBounded).
const (
	agentRenewBurst    = 10
	agentRenewsPerLife = 8
)

// agentCallAllowed takes a token of a's bucket of renewals of its own user (and
// registrations again), or counts the call dropped in dropped (its kind's count) and
// warns of it (what) at most once a minute. A nexlet whose user does not expire is not
// bounded: it renews nothing.
func (n *Node) agentCallAllowed(a *registration, what string, dropped *atomic.Uint64) bool {
	now := time.Now()
	if a.life <= 0 || n.agentRenewals.allow(a.id, now, agentRenewsPerLife/a.life.Seconds(), agentRenewBurst) {
		return true
	}
	total := dropped.Add(1)
	if ok, held := n.agentRenewals.log.allow(now, renewWarnEvery); ok {
		n.log.Warn(what, "agent_id", a.id, "name", a.req.Name, "burst", agentRenewBurst, "per_lifetime", agentRenewsPerLife,
			"lifetime", a.life.String(), "dropped", held+1, "dropped_total", total, "next_warning_in", renewWarnEvery.String())
	}
	return false
}

// AgentRenewalsDropped counts the nexlets' renewals of their own user dropped past
// their bound.
func (n *Node) AgentRenewalsDropped() uint64 { return n.agentRenewals.dropped.Load() }

// ReregistrationsDropped counts the nexlets' registrations again (chargeReregistration)
// dropped past the bound they share with their renewals of their own user.
func (n *Node) ReregistrationsDropped() uint64 { return n.reregsDropped.Load() }

// handleRenewCreds serves $NEX.SVC.<node>.agent.RENEWCREDS.<agentId>.<workloadId>: fresh
// credentials for a workload this node gave that nexlet, in the workload's namespace,
// which the nexlet names (renewOwned).
func (n *Node) handleRenewCreds(r micro.Request) {
	agentID, workloadID := protocol.Token(r.Subject(), 5), protocol.Token(r.Subject(), 6)
	if !protocol.IsToken(agentID) || !protocol.IsToken(workloadID) {
		n.fail(r, 400, "bad renewal subject", fmt.Errorf("renew credentials: subject %q: want RENEWCREDS.<agent id>.<workload id>", r.Subject()))
		return
	}
	if now := time.Now(); !n.renewals.allow(agentID, now, RenewRate, RenewBurst) {
		total := n.renewals.dropped.Add(1)
		if ok, held := n.renewals.log.allow(now, renewWarnEvery); ok {
			n.log.Warn("workload renewals dropped unanswered: more than the nexlet's rate",
				"agent_id", agentID, "rate", RenewRate, "burst", RenewBurst, "dropped", held+1, "dropped_total", total,
				"next_warning_in", renewWarnEvery.String())
		}
		return
	}
	if !n.ownInbox(r, agentID) {
		return
	}
	var req protocol.RenewCredsRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad renewal request", err)
		return
	}
	if req.Namespace == "" {
		n.fail(r, 400, "bad renewal request", fmt.Errorf("renew credentials of workload %s: namespace is required", workloadID))
		return
	}
	creds, minted, code, err := n.renewOwned(agentID, workloadID, req.Namespace)
	if err != nil {
		what := "renewal refused"
		if code == 404 {
			what = "workload not found"
		}
		n.fail(r, code, what, err)
		return
	}
	if !minted {
		n.log.Debug("workload credentials renewed early: the newest given again", "workload_id", workloadID, "namespace", req.Namespace, "agent_id", agentID)
		n.respondJSON(r, creds)
		return
	}
	n.log.Debug("workload credentials renewed", "workload_id", workloadID, "namespace", req.Namespace, "agent_id", agentID)
	n.respondJSON(r, creds)
	n.revokeSuperseded(workloadID)
}

// revokeSuperseded revokes a renewed workload's older users once its nexlet had time to
// hand on the new ones (RevokeGrace): the workload's connection is then cut and it
// reconnects with its renewed creds file, and a copy of the old credentials is
// worthless from then on.
func (n *Node) revokeSuperseded(workloadID string) {
	n.afterGrace("workload_id", workloadID, func(ctx context.Context) error {
		return n.o.Minter.RevokeSuperseded(ctx, workloadID)
	})
}

// revokeAgentSuperseded revokes, once a nexlet registered again (after RevokeGrace, so
// the registration reply is out), the users minted for it before creds, the user that
// registration handed it: its registration users and its previous starts' users. Not
// "all but the newest": a registration on the local channel that the nexlet gave up
// and that is dropped may mint after the one over NATS the nexlet went on with, and its
// unused user must not make the nexlet's own look superseded
// (TestDroppedLocalRegistrationKeepsTheLiveUser). Creds without a user of their own
// (no seed) have nothing to revoke.
func (n *Node) revokeAgentSuperseded(agentID string, creds protocol.NatsConnectionData) {
	if creds.NatsUserSeed == "" {
		return
	}
	var user string
	kp, err := nkeys.FromSeed([]byte(creds.NatsUserSeed))
	if err == nil {
		user, err = kp.PublicKey()
	}
	if err != nil {
		n.log.Warn("not revoking a nexlet's superseded users: its minted seed is unreadable", "agent_id", agentID, "err", err)
		return
	}
	n.afterGrace("agent_id", agentID, func(ctx context.Context) error {
		return n.o.Minter.RevokeAgentBefore(ctx, agentID, user)
	})
}

// afterGrace runs a revocation after RevokeGrace on a goroutine the node waits for.
func (n *Node) afterGrace(key, id string, revoke func(context.Context) error) {
	n.after(n.o.RevokeGrace, key, id, revoke)
}

// after runs a revocation after wait on a goroutine the node waits for.
func (n *Node) after(wait time.Duration, key, id string, revoke func(context.Context) error) {
	n.mu.Lock()
	ctx := n.ctx
	n.mu.Unlock()
	if ctx == nil {
		return
	}
	n.own("revocation after renewal of "+id, func() {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := revoke(rctx); err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) {
			n.log.Warn("could not revoke superseded credentials; they expire with their TTL", key, id, "err", err)
		}
	})
}
