package node

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/nexlet/localchan"
	"github.com/nexd-project/nexd/protocol"
)

// A nexlet that signs (nexd's SDK) may not publish on $NEX.FEED: its user may publish
// feeds only under its own agent id on FeedRelaySubject, and the node passes a message
// on to $NEX.FEED only when it is about a workload the node placed on that nexlet
// instance, in that workload's namespace. Before, every nexlet's user could publish in
// every namespace's feeds: a rogue forged another's workloads' logs and events.

// feedGraceAge is how long after a workload's end its nexlet's relayed lines still
// pass (its last lines may trail the end report), and feedGraceMax bounds the entries.
const (
	feedGraceAge = time.Minute
	feedGraceMax = 4096
)

// feedOwner is an ended workload's nexlet instance and namespace.
type feedOwner struct {
	owner, ns string
	at        time.Time
}

// feedGrace remembers the workloads that ended lately, and those whose WORKLOADSTOPPED
// event the node published lately; guarded by Node.mu.
type feedGrace struct {
	byID  map[string]feedOwner
	stops map[string]time.Time
}

// firstStop reports whether the node has not yet published id's WORKLOADSTOPPED
// (within feedGraceAge), and records that it now does: the event comes both relayed
// and with the nexlet's ended report, and subscribers get it once.
func (g *feedGrace) firstStop(id string, now time.Time) bool {
	if at, ok := g.stops[id]; ok && now.Sub(at) <= feedGraceAge {
		return false
	}
	if len(g.stops) >= feedGraceMax {
		for k, at := range g.stops {
			if now.Sub(at) > feedGraceAge || len(g.stops) >= feedGraceMax {
				delete(g.stops, k)
			}
		}
	}
	g.stops[id] = now
	return true
}

// unmark forgets that id's WORKLOADSTOPPED was published at at (firstStop's now): the
// publish may never have reached the server, and the event must pass when it comes
// again (a re-sent batch, the ended report).
func (g *feedGrace) unmark(id string, at time.Time) {
	if g.stops[id].Equal(at) {
		delete(g.stops, id)
	}
}

func (g *feedGrace) ended(id, owner, ns string, now time.Time) {
	if len(g.byID) >= feedGraceMax {
		for k, v := range g.byID {
			if now.Sub(v.at) > feedGraceAge || len(g.byID) >= feedGraceMax {
				delete(g.byID, k)
			}
		}
	}
	g.byID[id] = feedOwner{owner: owner, ns: ns, at: now}
}

func (g *feedGrace) of(id string, now time.Time) (feedOwner, bool) {
	o, ok := g.byID[id]
	if ok && now.Sub(o.at) > feedGraceAge {
		delete(g.byID, id)
		return feedOwner{}, false
	}
	return o, ok
}

// onFeedRelay handles <agent prefix>.FEED.<agent id>.<ns>.<logs|metrics|events>.…: the
// nexlet's feed message, passed on to $NEX.FEED.<ns>.… with its headers when the
// workload it is about is that nexlet's, in ns. Others are dropped (logged at debug:
// a rogue could flood the log otherwise).
func (n *Node) onFeedRelay(m *nats.Msg) {
	rest, ok := strings.CutPrefix(m.Subject, protocol.AgentPrefix(n.id)+".FEED.")
	if !ok {
		return
	}
	agentID, feed, _ := strings.Cut(rest, ".")
	out, _, ok := n.feedOf(agentID, feed, m, nil)
	if !ok {
		return
	}
	if err := n.o.NC.PublishMsg(out); err != nil {
		n.log.Debug("relaying a feed message failed", "subject", out.Subject, "err", err)
	}
}

// localFeeds takes the feed batches of the local nexlet agentID on its channel c (the
// native nexlet's, see localchan.Client.OnFeed): each message passes the relay's check,
// with the registration that holds c as the only sender. The batch is acknowledged once
// the NATS server has what passed (flush), so the nexlet may forget it: a kill -9 of
// nexd loses none of it. A WORKLOADSTOPPED it passed counts as published (the
// nexlet's ended report and a re-sent batch then leave it out) only once a flush that
// began after it succeeded: a failed batch or flush forgets it, so that the event
// sent again passes (it may then come twice, never not at all).
func (n *Node) localFeeds(agentID string, c *localchan.Client) (take func([]*nats.Msg) error, flush func(context.Context) error) {
	var (
		mu      sync.Mutex
		pending []stopMark // stops passed since the last successful flush
		// taken holds, per batch taken and not yet flushed (flushes pair with
		// successful takes, in order), the connection's reconnect count at its take.
		taken []uint64
	)
	forget := func(marks []stopMark) {
		n.mu.Lock()
		for _, sm := range marks {
			n.feeds.unmark(sm.id, sm.at)
		}
		n.mu.Unlock()
	}
	take = func(batch []*nats.Msg) (err error) {
		var marks []stopMark
		defer func() {
			if err != nil {
				forget(marks)
				return
			}
			mu.Lock()
			pending = append(pending, marks...)
			taken = append(taken, n.o.NC.Stats().Reconnects)
			mu.Unlock()
		}()
		if !n.o.NC.IsConnected() {
			// Kept by the nexlet and sent again: what nats.go buffers while it
			// reconnects would come twice.
			return errors.New("node: not connected to NATS")
		}
		for _, m := range batch {
			feed, ok := strings.CutPrefix(m.Subject, "$NEX.FEED.")
			if !ok {
				n.log.Debug("dropping a local feed message: not a feed subject", "agent_id", agentID, "subject", m.Subject)
				continue
			}
			out, mark, ok := n.feedOf(agentID, feed, m, c)
			if !ok {
				continue
			}
			if mark.id != "" {
				marks = append(marks, mark)
			}
			if err := n.o.NC.PublishMsg(out); err != nil {
				if errors.Is(err, nats.ErrMaxPayload) || errors.Is(err, nats.ErrBadSubject) {
					// Never publishable: refused, the batch would come again with
					// it, and every later one of this nexlet's feeds behind it.
					n.log.Warn("dropping a local feed message the NATS server cannot take", "agent_id", agentID,
						"subject", out.Subject, "bytes", len(out.Data), "err", err)
					continue
				}
				return fmt.Errorf("node: publish a local feed message: %w", err)
			}
		}
		return nil
	}
	flush = func(ctx context.Context) error {
		mu.Lock()
		covered := len(pending)
		since, ok := uint64(0), len(taken) > 0
		if ok {
			since, taken = taken[0], taken[1:]
		}
		mu.Unlock()
		fctx, cancel := context.WithTimeout(ctx, localFeedFlushWait)
		err := n.o.NC.FlushWithContext(fctx)
		cancel()
		if err == nil && ok && n.o.NC.Stats().Reconnects != since {
			// A connection that died after the batch's publish lost it, and the
			// flush's PING went on the next one: its PONG says nothing of the batch.
			err = errors.New("node: the NATS connection was replaced after the batch was published")
		}
		mu.Lock()
		var lost []stopMark
		if err != nil {
			lost, pending = pending, nil
		} else {
			pending = slices.Delete(pending, 0, covered)
		}
		mu.Unlock()
		if err != nil {
			forget(lost)
			return fmt.Errorf("node: flush local feed messages: %w", err)
		}
		return nil
	}
	return take, flush
}

// localFeedFlushWait bounds the wait for the NATS server to have a local feed batch.
const localFeedFlushWait = 5 * time.Second

// stopMark is a WORKLOADSTOPPED the relay passed, as feedGrace.firstStop recorded it.
type stopMark struct {
	id string
	at time.Time
}

// feedOf checks a nexlet's feed message (feed: its subject after "$NEX.FEED.") and
// returns what to publish: only when the workload it is about is that nexlet's, in its
// namespace, and (local set) the nexlet's registration holds that channel. Others are
// dropped, logged at debug (a rogue could flood the log otherwise). mark names the
// WORKLOADSTOPPED it passed as the first, if it did.
func (n *Node) feedOf(agentID, feed string, m *nats.Msg, local *localchan.Client) (out *nats.Msg, mark stopMark, ok bool) {
	tok := strings.Split(feed, ".")
	var wid string
	switch {
	case len(tok) == 4 && tok[1] == "logs" && (tok[3] == "stdout" || tok[3] == "stderr"):
		wid = tok[2]
	case len(tok) == 3 && tok[1] == "metrics":
		wid = tok[2]
	case len(tok) == 3 && tok[1] == "events" && protocol.IsToken(tok[2]):
		// The type a token: the server takes a published subject with wildcard
		// tokens, and the node republished events.> and events.* under its own user.
		wid = eventWorkloadID(m.Data)
	}
	if !protocol.IsToken(agentID) || !protocol.IsToken(wid) || !protocol.IsToken(tok[0]) {
		n.log.Debug("dropping a relayed feed message: not a workload's feed", "agent_id", agentID, "feed", feed)
		return nil, stopMark{}, false
	}
	ns := tok[0]
	now := time.Now()
	n.mu.Lock()
	a := n.agents[agentID]
	owner, wns := "", ""
	if o, ok := n.owned[wid]; ok {
		owner, wns = o.owner, o.ns
	} else if st, ok := n.starting[wid]; ok {
		owner, wns = st.owner, st.ns
	} else if e, ok := n.feeds.of(wid, now); ok {
		owner, wns = e.owner, e.ns
	}
	pass := a != nil && owner != "" && a.owner == owner && wns == ns && (local == nil || a.local == local)
	dup := false
	if pass && len(tok) == 3 && tok[1] == "events" && tok[2] == protocol.EventWorkloadStopped {
		if dup = !n.feeds.firstStop(wid, now); !dup {
			mark = stopMark{id: wid, at: now}
		}
	}
	n.mu.Unlock()
	if !pass {
		n.log.Debug("dropping a relayed feed message: the workload is not that nexlet's in that namespace", "agent_id", agentID, "workload_id", wid, "namespace", ns)
		return nil, stopMark{}, false
	}
	if dup {
		n.log.Debug("dropping a relayed WORKLOADSTOPPED: the node published it from the ended report", "agent_id", agentID, "workload_id", wid)
		return nil, stopMark{}, false
	}
	return &nats.Msg{Subject: "$NEX.FEED." + feed, Data: m.Data, Header: feedHeader(m.Header, tok[1], ns)}, mark, true
}

// feedHeader is what the node publishes as the headers of a nexlet's checked feed
// message of kind (logs, metrics, events) in namespace ns: on logs and metrics
// upstream's namespace header, set from the checked subject, and its group header (the
// nexlet's when it is a name, else empty); on any, the nexlet's dropped count when it
// is a number. Nothing else the nexlet set passes: before, its headers were published
// as they came, so a rogue put another namespace in the namespace header of its own
// line (or JetStream's control headers on the log stream's messages).
func feedHeader(in nats.Header, kind, ns string) nats.Header {
	var h nats.Header
	if kind == "logs" || kind == "metrics" {
		group := in.Get(protocol.FeedHeaderGroup)
		if group != "" && protocol.CheckName("group", group) != nil {
			group = ""
		}
		h = nats.Header{protocol.FeedHeaderNamespace: {ns}, protocol.FeedHeaderGroup: {group}}
	}
	if d := in.Get(protocol.HeaderFeedDropped); d != "" {
		if v, err := strconv.ParseUint(d, 10, 31); err == nil && v > 0 {
			if h == nil {
				h = nats.Header{}
			}
			h[protocol.HeaderFeedDropped] = []string{strconv.FormatUint(v, 10)}
		}
	}
	return h
}

// eventWorkloadID is the "id" of an event's body, the workload it is about, or "" when
// the body is not one object, and nothing after it, with exactly one key that case-folds to "id", spelled
// "id", holding a string. Go's decoder folds case and keeps a duplicate key's last
// value, where a case-sensitive reader of the feed (jq, most languages) takes "id"
// alone: {"id":<another's>,"ID":<its own>} passed the check as its own and reached
// such a reader as the other's.
func eventWorkloadID(data []byte) string {
	dec := json.NewDecoder(bytes.NewReader(data))
	if t, err := dec.Token(); err != nil || t != json.Delim('{') {
		return ""
	}
	id, ids := "", 0
	for dec.More() {
		t, err := dec.Token()
		if err != nil {
			return ""
		}
		key, _ := t.(string)
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return ""
		}
		if !strings.EqualFold(key, "id") {
			continue
		}
		ids++
		if key != "id" || json.Unmarshal(v, &id) != nil {
			return ""
		}
	}
	if ids != 1 {
		return ""
	}
	// Nothing after the object: a reader of a stream of JSON values (jq, a JSON-lines
	// reader) took a second object's "id" as another event's, the other workload's.
	if _, err := dec.Token(); err != nil { // the closing brace
		return ""
	}
	if _, err := dec.Token(); err != io.EOF {
		return ""
	}
	return id
}

// publishReportedStop publishes a relaying nexlet's WORKLOADSTOPPED from its ended
// report (body, the event), in the workload's namespace ns, unless the relay passed it
// already. The event the nexlet relays goes nowhere while no nexd runs; the report is
// retried until a node acknowledges it: without this, subscribers never heard of a job
// that ended while nexd was down (e2e TestLiveRestore).
func (n *Node) publishReportedStop(workloadID, ns string, body []byte) {
	if !protocol.IsToken(ns) || eventWorkloadID(body) != workloadID {
		n.log.Debug("not publishing a reported end: not that workload's event", "workload_id", workloadID)
		return
	}
	n.mu.Lock()
	first := n.feeds.firstStop(workloadID, time.Now())
	n.mu.Unlock()
	if !first {
		return
	}
	if err := n.o.NC.Publish(protocol.EventSubject(ns, protocol.EventWorkloadStopped), body); err != nil {
		n.log.Debug("publishing a reported end failed", "workload_id", workloadID, "err", err)
	}
}
