package node

import (
	"encoding/base64"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/protocol"
)

// maxDrainWaiters bounds the clients told a drain's outcome (HeaderDrainWait); one past
// it gets no promise (no nexd_drain), as from a node that does not tell.
const maxDrainWaiters = 64

// drainWaiter is a client waiting for this node's drain outcome: its LAMEDUCK request's
// reply subject (an inbox: the node's endpoints take no other) and nonce.
type drainWaiter struct{ reply, nonce string }

// signDrain is the node's signed word on its drain for the client that sent nonce.
func (n *Node) signDrain(nonce, state, reason string) *protocol.DrainOutcome {
	if len(reason) > protocol.MaxDrainReason {
		reason = reason[:protocol.MaxDrainReason-3] + "..."
	}
	d := &protocol.DrainOutcome{State: state, Reason: reason, Nonce: nonce}
	if sig, err := n.o.NodeKey.Sign(protocol.DrainPayload(n.id, *d)); err == nil {
		d.Sig = base64.StdEncoding.EncodeToString(sig)
	}
	return d
}

// waitDrain registers a client for the drain's outcome: the draining promise its
// LAMEDUCK answer carries, or the outcome when the drain already ended; nil when too
// many wait.
func (n *Node) waitDrain(reply, nonce string) *protocol.DrainOutcome {
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.drainState != "":
		return n.signDrain(nonce, n.drainState, n.drainReason)
	case len(n.drainWaiters) >= maxDrainWaiters:
		return nil
	}
	n.drainWaiters = append(n.drainWaiters, drainWaiter{reply: reply, nonce: nonce})
	return n.signDrain(nonce, protocol.DrainDraining, "")
}

// tellDrain records the drain's outcome and sends it to every client waiting for it,
// flushed: the node stops right after. Only the first outcome counts.
func (n *Node) tellDrain(state, reason string) {
	n.mu.Lock()
	if n.drainState != "" {
		n.mu.Unlock()
		return
	}
	n.drainState, n.drainReason = state, reason
	waiters := n.drainWaiters
	n.drainWaiters = nil
	n.mu.Unlock()
	if len(waiters) == 0 {
		return
	}
	msg := "lame duck drain done"
	if state != protocol.DrainDrained {
		msg = "lame duck drain failed: " + reason
	}
	for _, w := range waiters {
		b, err := protocol.Marshal(protocol.LameduckResponse{Message: msg, Success: state == protocol.DrainDrained,
			Drain: n.signDrain(w.nonce, state, reason)})
		if err == nil {
			err = n.o.NC.PublishMsg(&nats.Msg{Subject: w.reply, Data: b})
		}
		if err != nil {
			n.log.Warn("telling a client the drain's outcome", "reply", w.reply, "err", err)
		}
	}
	if err := n.o.NC.FlushTimeout(2 * time.Second); err != nil {
		n.log.Warn("telling clients the drain's outcome: flush", "clients", len(waiters), "err", err)
	}
}
