package node

import (
	"context"
	"encoding/json"
	"errors"
	"sync"

	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/protocol"
)

// Bounds of the registrations over NATS served at once. Each may wait on the state
// store (JetStream's API waits up to 5 s while JetStream is off), so served one at a
// time, N nexlets registering in such an outage waited N×5 s for their refusals; now
// regServing run at once (TestRegistrationsServedAtOnceWhileStateUnreadable). Those
// taken and waiting for their turn are bounded too (regTaken): past it the endpoint
// waits, which pushes back on the senders as the one-at-a-time endpoint did.
const (
	regServing = 4
	regTaken   = 32
)

// regOrder serves the registrations of one agent id, and those of one workload type,
// one at a time and in the order they were taken: a registration reads the records of
// its type and hands back those of its nexlet instance (or none recorded, an older
// nexd's), checks its bucket of registrations again, and binds its name, each between
// reads and writes that two registrations of one nexlet, or of two nexlets of one type,
// must not interleave (the same ownerless record replayed to two nexlets, the older
// registration's answer taking the newer's place). Registrations of other ids and types
// run alongside; what they share (names, agent ids) is checked again under the node's
// lock where it is taken (register). A registration on a nexlet's local channel is not
// ordered here (one at a time on its channel): the nexlet gives up waiting on it and
// registers over NATS, which must not wait for the abandoned one
// (TestDroppedLocalRegistrationKeepsTheLiveUser).
type regOrder struct {
	mu   sync.Mutex
	last map[string]chan struct{} // key → the done of the last registration taken under it
}

// regTurn is one registration's place in regOrder.
type regTurn struct {
	o     *regOrder
	keys  []string
	after []chan struct{} // the dones of the registrations before it under its keys
	done  chan struct{}
}

// regKeys are the keys the registration of agentID with body data is ordered under:
// its agent id and the type it registers as (none for a body that does not decode,
// which register refuses).
func regKeys(agentID string, data []byte) []string {
	var typed struct {
		RegisterType string `json:"register_type"`
	}
	_ = json.Unmarshal(data, &typed)
	return []string{"id " + agentID, "type " + typed.RegisterType}
}

// take places a registration under keys, after every one taken before under any of
// them. Every turn taken must be left (leave), waited for or not.
func (o *regOrder) take(keys []string) *regTurn {
	t := &regTurn{o: o, keys: keys, done: make(chan struct{})}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.last == nil {
		o.last = map[string]chan struct{}{}
	}
	for _, k := range keys {
		if prev, ok := o.last[k]; ok {
			t.after = append(t.after, prev)
		}
		o.last[k] = t.done
	}
	return t
}

// wait waits until the registrations before t left, or ctx ends.
func (t *regTurn) wait(ctx context.Context) error {
	for _, prev := range t.after {
		select {
		case <-prev:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// leave lets the registrations after t go.
func (t *regTurn) leave() {
	t.o.mu.Lock()
	for _, k := range t.keys {
		if t.o.last[k] == t.done {
			delete(t.o.last, k)
		}
	}
	t.o.mu.Unlock()
	close(t.done)
}

// handleRegister serves $NEX.SVC.<node>.agent.REGISTER.<agentId>: it takes the
// registration's turn (regOrder) here, in the order the endpoint hands them over, and
// serves it on a goroutine of its own once its turn came and one of regServing is free.
func (n *Node) handleRegister(r micro.Request) {
	select {
	case n.regTaken <- struct{}{}:
	case <-n.ctx.Done():
		n.fail(r, 503, "node stopping", errors.New("the node is stopping"))
		return
	}
	agentID := protocol.Token(r.Subject(), 5)
	turn := n.regOrder.take(regKeys(agentID, r.Data()))
	// micro's request must not be touched once this returns (see async).
	d := &detachedRequest{nc: n.o.NC, subject: r.Subject(), reply: r.Reply(), data: r.Data(), headers: r.Headers()}
	serve := func() {
		defer func() { <-n.regTaken }()
		defer turn.leave()
		err := turn.wait(n.ctx)
		if err == nil {
			select {
			case n.regServing <- struct{}{}:
				defer func() { <-n.regServing }()
			case <-n.ctx.Done():
				err = n.ctx.Err()
			}
		}
		if err != nil {
			n.fail(d, 503, "node stopping", errors.New("the node is stopping"))
			return
		}
		n.register(d, nil)
	}
	if !n.own("registration of nexlet "+agentID, serve) {
		turn.leave()
		<-n.regTaken
		n.fail(r, 503, "node stopping", errors.New("the node is stopping"))
	}
}
