package node

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/randid"
	"github.com/nexd-project/nexd/protocol"
)

// gather publishes one request on subject and hands each reply to fn until max replies
// came, fn returns false, timeout passes or ctx ends (scatter-gather; nats.go has no
// RequestMany). "No responders" ends it early without an error: nobody holds the
// subject, which for a fan-out to nexlets just means none answered.
func gather(ctx context.Context, nc *nats.Conn, subject string, data []byte, max int, timeout time.Duration, fn func(*nats.Msg) bool) error {
	if max <= 0 {
		return nil
	}
	inbox := newInbox(nc)
	ch := make(chan *nats.Msg, max+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return fmt.Errorf("subscribe reply inbox for %s: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, data); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for got := 0; got < max; {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case m := <-ch:
			if isNoResponders(m) {
				return nil
			}
			got++
			if !fn(m) {
				return nil
			}
		}
	}
	return nil
}

// newInbox names a reply inbox of the node: nats.go's, which a nuid names (one
// generator per process, one prefix, a fixed increment, so the inboxes nexlets see
// tell the next ones), ended by a random token, so that no one who may publish to
// _INBOX.> (a workload) knows where the node waits for an answer
// (TestAttackWorkloadForgesStartAnswer) should the connection name its inboxes there
// (nexd's is under protocol.NodeInboxRoot, out of their reach, since nats.go's own
// inboxes have no such token: TestAttackNexletForgesIntoNodeWatcher).
func newInbox(nc *nats.Conn) string { return nc.NewInbox() + "." + randid.New() }

// isStopRecorded says m is a nexlet's word that it recorded a stop, not its answer.
func isStopRecorded(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header.Get(protocol.HeaderStopRecorded) != ""
}

func isNoResponders(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header != nil && m.Header.Get("Status") == "503"
}

// asked is who one askNexlets fan-out went to: the nexlets asked on their own subjects
// (direct, by agent id) and those asked together on the shared subject (pool).
type asked struct {
	direct, pool map[string]*registration
}

// askNexlets sends one request to every registered nexlet and hands each reply to fn
// with the nexlet it is known to come from. A nexlet that answers on its own subjects
// (AnswersDirect) is asked on direct(its agent id) with a reply subject of its own: a
// random token under one inbox, which only it receives and so only it may publish to
// (the response permission of its minted user; a workload user, which may publish to
// _INBOX.>, cannot guess the token). The others (upstream's SDK) are asked once on
// shared, with a reply inbox of its own and HeaderAskedDirect, which tells the others
// to leave it: a reply there comes with from nil, as any nexlet may answer there, and
// at most as many count as nexlets were asked there. A reply there that names
// (HeaderAgentID) a nexlet asked directly is dropped: that nexlet answering the shared
// subject too (one that missed the header), or a forgery. A nexlet's second reply
// is dropped. It ends when every nexlet asked answered (a no-responders status counts
// as silence), fn returns false, timeout passes or ctx ends.
func (n *Node) askNexlets(ctx context.Context, shared string, direct func(agentID string) string, data []byte,
	timeout time.Duration, fn func(m *nats.Msg, from *registration) bool) (asked, error) {
	return n.askNexletsWith(ctx, shared, direct, data, timeout, askOpts{}, fn)
}

// askOpts are what a fan-out may add to askNexlets; the zero value adds nothing.
type askOpts struct {
	// ack, when set, gets each body-less reply carrying HeaderStopRecorded from a
	// nexlet asked directly (on the subscription's goroutine), with the nexlet whose
	// reply subject it came on; such a reply is not taken for that nexlet's answer.
	// Only such a reply is attributable: one on the shared subject is dropped.
	ack func(from *registration)
	// listParts: the request is a list of namespace listNS, which the node takes in
	// parts (HeaderListParts goes with the requests to the nexlets asked directly). A
	// nexlet's parts are joined into the one answer fn gets (listParts), and the
	// answers of the nexlets asked directly are charged to the node's list budget as
	// they come, until the fan-out ends.
	listParts bool
	listNS    string
}

// askNexletsWith is askNexlets with what o adds: stop-recorded acks, a list's parts.
func (n *Node) askNexletsWith(ctx context.Context, shared string, direct func(agentID string) string, data []byte,
	timeout time.Duration, o askOpts, fn func(m *nats.Msg, from *registration) bool) (asked, error) {
	a := asked{direct: map[string]*registration{}, pool: map[string]*registration{}}
	n.mu.Lock()
	for id, r := range n.agents {
		if r.req.AnswersDirect {
			a.direct[id] = r
		} else {
			a.pool[id] = r
		}
	}
	n.mu.Unlock()
	var directCh, poolCh chan *nats.Msg                      // nil: none asked that way
	byToken := make(map[string]*registration, len(a.direct)) // read-only once subscribed
	if len(a.direct) > 0 {
		inbox := newInbox(n.o.NC)
		tokens := make(map[string]string, len(a.direct)) // agent id -> its token
		for id, r := range a.direct {
			tok, err := replyToken()
			if err != nil {
				return a, err
			}
			byToken[tok], tokens[id] = r, tok
		}
		// Only each token's first reply goes on, so the channel never fills: a nexlet
		// may send many to its own reply subject (its response permission allows it),
		// and a full channel would drop the others' answers (slow consumer):
		// TestRogueNexletFloodsItsReplies.
		directCh = make(chan *nats.Msg, len(a.direct))
		var seenMu sync.Mutex
		seen := make(map[string]bool, len(a.direct))
		var parts *listParts // nil: an answer is its token's first reply
		var hdr nats.Header
		if o.listParts {
			hdr = nats.Header{protocol.HeaderListParts: {"1"}}
			from := make(map[string]string, len(tokens))
			for id, tok := range tokens {
				from[tok] = id
			}
			parts = newListParts(n.lists, o.listNS, from)
			// After the unsubscription (deferred below, so run before this): a
			// callback still running then is refused by add, and nothing it takes
			// stays charged.
			defer func() {
				seenMu.Lock()
				parts.release()
				seenMu.Unlock()
			}()
		}
		sub, err := n.o.NC.Subscribe(inbox+".*", func(m *nats.Msg) {
			tok := protocol.LastToken(m.Subject)
			if isStopRecorded(m) {
				if r := byToken[tok]; r != nil && o.ack != nil {
					o.ack(r)
				}
				return
			}
			seenMu.Lock()
			first := byToken[tok] != nil && !seen[tok]
			if first && parts != nil {
				m, first = parts.add(tok, m)
			}
			if first {
				seen[tok] = true
			}
			seenMu.Unlock()
			if first {
				directCh <- m
			}
		})
		if err != nil {
			return a, fmt.Errorf("subscribe reply inbox for %s: %w", shared, err)
		}
		defer func() { _ = sub.Unsubscribe() }()
		for id, tok := range tokens {
			if err := n.o.NC.PublishMsg(&nats.Msg{Subject: direct(id), Reply: inbox + "." + tok, Data: data, Header: hdr}); err != nil {
				return a, fmt.Errorf("publish %s: %w", direct(id), err)
			}
		}
	}
	if len(a.pool) > 0 {
		// An inbox of its own: whatever any nexlet sends here cannot crowd out the
		// direct replies.
		inbox := newInbox(n.o.NC)
		poolCh = make(chan *nats.Msg, 2*len(a.pool)+len(a.direct)+1)
		sub, err := n.o.NC.ChanSubscribe(inbox, poolCh)
		if err != nil {
			return a, fmt.Errorf("subscribe reply inbox for %s: %w", shared, err)
		}
		defer func() { _ = sub.Unsubscribe() }()
		m := &nats.Msg{Subject: shared, Reply: inbox, Data: data}
		if len(a.direct) > 0 {
			m.Header = nats.Header{protocol.HeaderAskedDirect: {"1"}}
		}
		if err := n.o.NC.PublishMsg(m); err != nil {
			return a, fmt.Errorf("publish %s: %w", shared, err)
		}
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	pending, poolLeft := len(a.direct), len(a.pool)
	for pending > 0 || poolLeft > 0 {
		select {
		case <-ctx.Done():
			return a, ctx.Err()
		case <-t.C:
			return a, nil
		case m := <-directCh:
			r := byToken[protocol.LastToken(m.Subject)] // its token's first reply: the subscription drops the rest
			pending--
			if isNoResponders(m) {
				continue
			}
			if !fn(m, r) {
				return a, nil
			}
		case m := <-poolCh:
			if poolLeft == 0 {
				continue
			}
			if isNoResponders(m) {
				poolLeft = 0 // none of them holds the subject
				continue
			}
			if isStopRecorded(m) {
				continue // not an answer, and not anyone's in particular
			}
			if _, ok := a.direct[m.Header.Get(protocol.HeaderAgentID)]; ok {
				continue
			}
			poolLeft--
			if !fn(m, nil) {
				return a, nil
			}
		}
	}
	return a, nil
}

// replyToken is a reply subject token no one can guess: 128 random bits.
func replyToken() (string, error) {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("reply token: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}
