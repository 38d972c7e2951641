package node

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/privfile"
	"github.com/nexd-project/nexd/protocol"
)

// maxDrainWaiters bounds the clients told a drain's outcome (HeaderDrainWait); one past
// it gets no promise (no nexd_drain), as from a node that does not tell.
const maxDrainWaiters = 64

// drainWaiter is a client waiting for this node's drain outcome: its LAMEDUCK request's
// reply subject (an inbox: the node's endpoints take no other) and nonce; acks: it
// acknowledges the outcome (HeaderDrainAck).
type drainWaiter struct {
	reply, nonce string
	acks         bool
}

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
func (n *Node) waitDrain(reply, nonce string, acks bool) *protocol.DrainOutcome {
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case n.drainState != "":
		return n.signDrain(nonce, n.drainState, n.drainReason)
	case len(n.drainWaiters) >= maxDrainWaiters:
		return nil
	}
	n.drainWaiters = append(n.drainWaiters, drainWaiter{reply: reply, nonce: nonce, acks: acks})
	return n.signDrain(nonce, protocol.DrainDraining, "")
}

// tellDrain records the drain's outcome and sends it to every client waiting for it,
// flushed: the node stops right after. Only the first outcome counts. A client that
// acknowledges (HeaderDrainAck) is sent it again every DrainResend while the node is
// connected, until it acknowledged or DrainTellFor passed: an outcome sent while the
// node's link (or a leaf link, or the client's) was down would otherwise be lost with
// the node (TestLameduckWaitOutcomeAcrossOutage).
func (n *Node) tellDrain(state, reason string) {
	n.mu.Lock()
	if n.drainState != "" {
		n.mu.Unlock()
		return
	}
	n.drainState, n.drainReason = state, reason
	waiters := n.drainWaiters
	n.drainWaiters = nil
	var last *protocol.LastDrain
	if !n.lameduck.IsZero() { // not a stop without a lame duck: there was no drain
		last = &protocol.LastDrain{State: state, Reason: reason, At: time.Now().UTC()}
		n.lastDrain = last
	}
	n.mu.Unlock()
	if last != nil {
		n.keepDrainOutcome(last) // before the clients are told: the node stops right after
	}
	if len(waiters) == 0 {
		return
	}
	msg := "lame duck drain done"
	if state != protocol.DrainDrained {
		msg = "lame duck drain failed: " + reason
	}
	bodies := make([][]byte, len(waiters))
	for i, w := range waiters {
		b, err := protocol.Marshal(protocol.LameduckResponse{Message: msg, Success: state == protocol.DrainDrained,
			Drain: n.signDrain(w.nonce, state, reason)})
		if err != nil {
			n.log.Warn("telling a client the drain's outcome", "reply", w.reply, "err", err)
		}
		bodies[i] = b
	}
	acks := n.drainAcks(waiters)
	defer acks.close()
	send := func(again bool) {
		for i, w := range waiters {
			if bodies[i] == nil || (again && !acks.pending(i)) {
				continue
			}
			m := &nats.Msg{Subject: w.reply, Data: bodies[i]}
			if w.acks && acks.sub != nil {
				m.Reply = acks.inbox + "." + strconv.Itoa(i)
			}
			if err := n.o.NC.PublishMsg(m); err != nil {
				n.log.Warn("telling a client the drain's outcome", "reply", w.reply, "err", err)
			}
		}
	}
	send(false)
	if err := n.o.NC.FlushTimeout(2 * time.Second); err != nil {
		n.log.Warn("telling clients the drain's outcome: flush", "clients", len(waiters), "err", err)
	}
	if acks.sub == nil || acks.all() {
		return
	}
	deadline := time.NewTimer(protocol.DrainTellFor)
	defer deadline.Stop()
	resend := time.NewTicker(protocol.DrainResend)
	defer resend.Stop()
	for !acks.all() {
		select {
		case <-acks.ch:
		case <-resend.C:
			if n.o.NC.IsConnected() {
				send(true)
			}
		case <-deadline.C:
			n.log.Warn("drain outcome not acknowledged by every client waiting for it", "clients", acks.waiting(),
				"within", protocol.DrainTellFor)
			return
		}
	}
}

// drainAckSet collects the acknowledgements of a drain's outcome: waiter i acks with a
// reply to inbox.<i>. A forged ack only ends the re-sending to that client, whose
// --wait then reports the outcome not known: no worse than before.
type drainAckSet struct {
	inbox string
	sub   *nats.Subscription
	ch    chan struct{} // a new ack came in
	mu    sync.Mutex
	want  map[int]bool // waiters that acknowledge, not yet heard
}

// drainAcks subscribes for the acks of the waiters that send them (none: no
// subscription).
func (n *Node) drainAcks(waiters []drainWaiter) *drainAckSet {
	a := &drainAckSet{ch: make(chan struct{}, 1), want: map[int]bool{}}
	for i, w := range waiters {
		if w.acks {
			a.want[i] = true
		}
	}
	if len(a.want) == 0 {
		return a
	}
	a.inbox = newInbox(n.o.NC)
	sub, err := n.o.NC.Subscribe(a.inbox+".*", func(m *nats.Msg) {
		i, err := strconv.Atoi(protocol.LastToken(m.Subject))
		if err != nil || m.Header.Get("Status") != "" {
			// The server's "no responders" (503) to an outcome sent while the client's
			// inbox had no subscriber (its connection not back yet) is no ack.
			return
		}
		a.mu.Lock()
		delete(a.want, i)
		a.mu.Unlock()
		select {
		case a.ch <- struct{}{}:
		default:
		}
	})
	if err != nil {
		n.log.Warn("drain outcome: cannot hear acknowledgements; telling once", "err", err)
		return a
	}
	a.sub = sub
	return a
}

// pending says waiter i acknowledges and has not yet.
func (a *drainAckSet) pending(i int) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.want[i]
}

func (a *drainAckSet) all() bool { return a.waiting() == 0 }

func (a *drainAckSet) waiting() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.want)
}

func (a *drainAckSet) close() {
	if a.sub != nil {
		_ = a.sub.Unsubscribe()
	}
}

// The last drain's outcome outlives the node, which stops right after its drain: the
// clients waiting for it are told for DrainTellFor at most, and a client that lost it
// (its link down longer, a script that asks later) finds it in the node's INFO
// (nexd_last_drain) and STATUS once the node runs again. One file, replaced by the next
// drain's outcome and removed when the next lame duck begins, so it never grows.
// Before, the outcome lived only in the draining process.

// lastDrainLocked is a copy of the last drain's outcome (nil: none kept).
func (n *Node) lastDrainLocked() *protocol.LastDrain {
	if n.lastDrain == nil {
		return nil
	}
	c := *n.lastDrain
	return &c
}

// LastDrain is the outcome of the node's last lame duck drain (nil: none kept).
func (n *Node) LastDrain() *protocol.LastDrain {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.lastDrainLocked()
}

// readDrainOutcome reads the outcome an earlier run kept (nil: none, or unreadable).
func (n *Node) readDrainOutcome() *protocol.LastDrain {
	if n.o.DrainOutcomeFile == "" {
		return nil
	}
	f, err := os.Open(n.o.DrainOutcomeFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	var d *protocol.LastDrain
	if err == nil {
		d, err = parseDrainOutcome(io.LimitReader(f, maxDrainOutcomeFile+1))
		f.Close()
	}
	if err != nil {
		n.log.Warn("the last lame duck drain's outcome is unreadable; ignored", "file", n.o.DrainOutcomeFile, "err", err)
		return nil
	}
	return d
}

// maxDrainOutcomeFile bounds what is read of the drain outcome file: a state, a time
// and a reason the read cuts to protocol.MaxDrainReason.
const maxDrainOutcomeFile = 64 << 10

// parseDrainOutcome reads a kept drain outcome as INFO and STATUS show it: one of the
// two ends of a drain (drained, failed), the time it ended, and a reason of at most
// protocol.MaxDrainReason bytes (a longer one is cut, as a told outcome's is). Before,
// any JSON with a state was taken: a state such as "draining" or one with control
// characters reached INFO and STATUS, a file without a time showed a drain ended in
// the year 1, and a file of any size was read whole (FuzzDrainOutcome).
func parseDrainOutcome(r io.Reader) (*protocol.LastDrain, error) {
	b, err := io.ReadAll(r)
	if err != nil {
		return nil, err
	}
	if len(b) > maxDrainOutcomeFile {
		return nil, fmt.Errorf("more than %d bytes", maxDrainOutcomeFile)
	}
	var d protocol.LastDrain
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, err
	}
	switch {
	case d.State != protocol.DrainDrained && d.State != protocol.DrainFailed:
		return nil, fmt.Errorf("state %+q is neither %s nor %s", d.State, protocol.DrainDrained, protocol.DrainFailed)
	case d.At.IsZero():
		return nil, errors.New(`no time ("at")`)
	}
	if len(d.Reason) > protocol.MaxDrainReason {
		d.Reason = strings.ToValidUTF8(d.Reason[:protocol.MaxDrainReason], "") + "…"
	}
	return &d, nil
}

// keepDrainOutcome writes d to the outcome file (a new file renamed over the old one,
// synced: the node stops right after).
func (n *Node) keepDrainOutcome(d *protocol.LastDrain) {
	path := n.o.DrainOutcomeFile
	if path == "" {
		return
	}
	b, err := json.Marshal(d)
	if err == nil {
		err = privfile.Write(path, b)
	}
	if err != nil {
		n.log.Warn("cannot keep the lame duck drain's outcome for after the node's stop", "file", path, "err", err)
	}
}

// forgetDrainOutcome removes the kept outcome: a new lame duck began.
func (n *Node) forgetDrainOutcome() {
	if n.o.DrainOutcomeFile == "" {
		return
	}
	if err := os.Remove(n.o.DrainOutcomeFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
		n.log.Warn("cannot remove the last lame duck drain's outcome", "file", n.o.DrainOutcomeFile, "err", err)
	}
}
