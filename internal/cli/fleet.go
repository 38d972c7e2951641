package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// fleet speaks the $NEX API exactly as upstream's client does, so it works against
// nexd and upstream nodes alike.
type fleet struct {
	nc *nats.Conn
	ns string
	// first bounds the wait for a first reply (and a single request's reply).
	first time.Duration
	// stall ends a scatter-gather this long after the last reply.
	stall time.Duration
	// deployTimeout bounds one ADEPLOY; nodes wait up to a minute for their nexlet.
	// A node's progress reports start it again, up to deployMax after the request.
	deployTimeout, deployMax time.Duration
	// stopWait bounds the wait for a stop's answer after the holder's word.
	stopWait time.Duration
	// aliveEvery is the keep-alive interval a deploy asks the node for (HeaderAlive);
	// after silence without one the node counts as gone mid-request.
	aliveEvery, silence time.Duration
	// jsDomain is the JetStream domain for KV state ("" for the account's default).
	jsDomain string
	// progress shows a node's progress reports during a deploy (nil: ignored).
	progress *deployProgress
	// trusted, when set, are the only node ids whose signed bids are used
	// (trusted_nodes): a valid signature proves a node id, not that it is ours.
	// Unsigned bids are then refused too (their node id is only a claim) unless
	// allowUnsigned (--allow-unsigned-bids, for upstream nodes).
	trusted       map[string]bool
	allowUnsigned bool
	// signers are the node ids that signed a bid or an answer nexctl verified in
	// this run: an unsigned answer in one's name is refused (answers.go).
	signersMu sync.Mutex
	signers   map[string]bool
	// noted are the nodes whose unsigned answer to a request on their own subject
	// (askNode) was noted as not verified in this run.
	noted map[string]bool
	// warn tells the user of replies refused on the way (nil: not told).
	warn func(format string, args ...any)
	// debug, under --verbose, says what a wait waits for and why (nil: nothing).
	debug func(format string, args ...any)
	// violation is closed at the server's next permissions violation on nc
	// (natsconn.Conn.NextViolation; nil: not watched).
	violation func() <-chan struct{}
	// cut hears that a gather was cut short by nexctl's connection closing (scatterGather);
	// nil: the gather's error is returned instead.
	cut func(error)
	// unlisted are the nodes that answered the last workload listing with an error
	// (listFailed): a lookup that found nothing says they may hold it.
	unlistedMu sync.Mutex
	unlisted   []error
}

// notFound is a lookup's "not found" for ref in the caller's namespace, why being what
// was looked at; it names the nodes whose list failed in the last listing, which may
// hold it.
func (f *fleet) notFound(ref, why string) error {
	f.unlistedMu.Lock()
	unlisted := slices.Clone(f.unlisted)
	f.unlistedMu.Unlock()
	msg := fmt.Sprintf("workload %s not found in namespace %s", ref, f.ns)
	if why != "" {
		msg += " (" + why + ")"
	}
	if len(unlisted) > 0 {
		msg += fmt.Sprintf("; but it may be on a node that did not list its workloads: %v", errors.Join(unlisted...))
		msg = strings.ReplaceAll(msg, "\n", "; ")
	}
	return errors.New(msg)
}

// jsGrant is what reading or changing the nodes' KV state needs, for refusals.
const jsGrant = "publish on $JS.API.> (the JetStream API; $JS.<domain>.API.> with a JetStream domain) in the account whose JetStream the nodes use (their KV state, the log stream): a node admin's credentials, such as those nexd connects with; a tenant's user has no JetStream grants"

// refusable derives from ctx a context that ends as soon as the server refuses this
// user one of subjects (a subject ending in "." stands for every subject under it) or
// a reply inbox: a JetStream request refused for permissions otherwise hears nothing
// and waits out its timeout. stop releases the context and returns the refusal, if any
// (it wraps nats.ErrPermissionViolation).
func (f *fleet) refusable(ctx context.Context, subjects ...string) (context.Context, func() error) {
	rctx, cancel := context.WithCancelCause(ctx)
	if f.violation == nil {
		return rctx, func() error { cancel(nil); return nil }
	}
	subjects = append(slices.Clip(subjects), f.inboxPrefix())
	next := f.violation() // before before: a violation in between closes it
	before := f.nc.LastError()
	var refused error
	var watch sync.WaitGroup
	watch.Go(func() {
		for {
			select {
			case <-rctx.Done():
				return
			case <-next:
			}
			next = f.violation()
			if err := scatter.Refused(f.nc, before, subjects...); err != nil {
				refused = err
				cancel(err)
				return
			}
		}
	})
	return rctx, func() error {
		cancel(nil)
		watch.Wait()
		return refused
	}
}

// jsAPIPrefix is the JetStream API's subject prefix of f's domain.
func (f *fleet) jsAPIPrefix() string {
	if f.jsDomain != "" {
		return "$JS." + f.jsDomain + ".API."
	}
	return jetstream.DefaultAPIPrefix
}

// jsRefused names a JetStream refusal for what and the grant it needs.
func jsRefused(what string, refused error) error {
	return fmt.Errorf("%s: %w; it needs %s", what, refused, jsGrant)
}

func (f *fleet) jetstream() (jetstream.JetStream, error) {
	if f.jsDomain != "" {
		return jetstream.NewWithDomain(f.nc, f.jsDomain)
	}
	return jetstream.New(f.nc)
}

// nodeError is a micro error reply from a node.
type nodeError struct {
	Code    int
	Message string
}

func (e *nodeError) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("%s (code %d)", e.Message, e.Code)
	}
	return e.Message
}

// replyError returns the micro error carried by m, if any.
func replyError(m *nats.Msg) error {
	if m.Header == nil {
		return nil
	}
	codeStr := m.Header.Get(protocol.HeaderErrorCode)
	if codeStr == "" {
		return nil
	}
	code, _ := strconv.Atoi(codeStr)
	msg := m.Header.Get(protocol.HeaderError)
	var body protocol.ErrorBody
	if json.Unmarshal(m.Data, &body) == nil && body.Error != "" {
		msg = body.Error
	}
	if msg == "" {
		msg = "node returned error code " + codeStr
	}
	return &nodeError{Code: code, Message: msg}
}

type gatherOpts struct {
	first time.Duration // wait at most this long for the first reply
	stall time.Duration // then end this long after the latest reply
	max   int           // and stop once this many arrived (0: no limit)
	head  nats.Header   // sent with the request
	// some: the caller needs some answers, not all (an auction, the count of nodes a
	// deploy expects bids from): a gather stopped at its bound returns what came with
	// an error wrapping scatter.ErrBounded for the caller to weigh, instead of ending
	// the command "outcome unknown" (a deploy that then succeeded was known).
	some bool
	// take, when set, refuses a reply as a copy of one taken (scatter.Options.Take).
	take func(m *nats.Msg) bool
}

// gather is scatter.Gather with nexctl's options.
func (f *fleet) gather(ctx context.Context, subject string, data []byte, o gatherOpts) ([]*nats.Msg, error) {
	so := scatter.Options{First: o.first, Stall: o.stall, Max: o.max, Header: o.head, Take: o.take}
	if o.some {
		so.Bound, so.MaxBytes = f.gatherBound(), gatherMaxBytes
		return scatter.Gather(ctx, f.nc, subject, data, so)
	}
	return f.scatterGather(ctx, subject, data, so)
}

// scatterGather is scatter.Gather on nexctl's connection. A gather cut short by that
// connection's close returns what came, as if the answers had stopped, so the command
// shows it; the close is told to f.cut, which ends the command "outcome unknown"
// (exit 3) once it printed that: what did not arrive is unknown, not absent, and a
// list that ended quietly read as "nothing more found".
//
// Anyone who sees the request (a rogue node, anyone on an open bus) may answer it, so
// a gather is bounded in time (gatherBound) and in what it holds (gatherMaxBytes):
// before, answers sent again within each stall kept nexctl listening for good, and a
// flood of them piled up in its memory. A gather that stopped at a bound returns what
// came and ends the command "outcome unknown" (exit 3) the same way.
func (f *fleet) scatterGather(ctx context.Context, subject string, data []byte, o scatter.Options) ([]*nats.Msg, error) {
	o.Bound, o.MaxBytes = f.gatherBound(), gatherMaxBytes
	sent := time.Now()
	msgs, err := scatter.Gather(ctx, f.nc, subject, data, o)
	switch {
	case errors.Is(err, scatter.ErrClosed) && f.cut != nil:
		f.cut(fmt.Errorf("%w: %d answer(s) came and are shown, others may not have", f.closedLink("the answers to "+subject, sent), len(msgs)))
		return msgs, nil
	case errors.Is(err, scatter.ErrBounded) && f.cut != nil:
		f.cut(fmt.Errorf("unknown: %w; nexctl stopped listening (a node, or someone answering in nodes' names, does not stop answering): the %d answer(s) taken are used, others may not have come",
			err, len(msgs)))
		return msgs, nil
	}
	return msgs, err
}

// gatherMaxBytes bounds what one gather holds (scatter.ReplyCost): 128 nodes' lists at
// the default max_payload (1 MiB).
const gatherMaxBytes = 128 << 20

// MemoryLimit is nexctl's soft memory limit (runtime/debug.SetMemoryLimit; GOMEMLIMIT
// overrides it): a gather holds at most gatherMaxBytes, and the collector then keeps
// the heap near that rather than letting it grow to twice what is live, as it did under
// a flood of answers on a loaded machine. Far above what any command needs otherwise.
const MemoryLimit = gatherMaxBytes + 64<<20

// gatherBound bounds how long one gather listens: its first-reply wait, a nexd node's
// promised list (listWait) and room for a slow fleet's answers, at least ten stalls.
func (f *fleet) gatherBound() time.Duration {
	return f.first + listWait + max(10*time.Second, 10*f.stall)
}

func (f *fleet) gatherOpts(max int) gatherOpts {
	return gatherOpts{first: f.first, stall: f.stall, max: max}
}

// request sends one request and waits for one reply; ok is false when nobody listens.
func (f *fleet) request(ctx context.Context, subject string, v any, timeout time.Duration) (*nats.Msg, bool, error) {
	data, err := json.Marshal(v)
	if err != nil {
		return nil, false, err
	}
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	before := f.nc.LastError()
	m, err := f.nc.RequestWithContext(rctx, subject, data)
	switch {
	case errors.Is(err, nats.ErrNoResponders):
		return nil, false, nil
	case err != nil:
		if refused := scatter.Refused(f.nc, before, subject, f.inboxPrefix()); refused != nil {
			return nil, true, fmt.Errorf("request %s: %w", subject, refused)
		}
		if ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
			return nil, true, fmt.Errorf("no reply on %s within %s: %w", subject, timeout, nats.ErrTimeout)
		}
		return nil, true, fmt.Errorf("request %s: %w", subject, err)
	}
	if err := replyError(m); err != nil {
		return m, true, err
	}
	return m, true, nil
}

// pingNodes lists the nodes whose tags match every filter entry.
func (f *fleet) pingNodes(ctx context.Context, filter map[string]string, o gatherOpts) ([]protocol.NodePingResponse, []error, error) {
	out, _, bad, err := f.pingNodesSigned(ctx, filter, o)
	return out, bad, err
}

// pingNodesSigned is pingNodes that says which rows came unsigned (nil: none). A row
// signed by a node other than the one it describes, or unsigned in the name of a node
// that signed in this run, is refused (in bad), so nobody but a nexd node adds or
// changes its row; unsigned rows are upstream nodes' (or anyone's posing as one).
func (f *fleet) pingNodesSigned(ctx context.Context, filter map[string]string, o gatherOpts) ([]protocol.NodePingResponse, *unsignedRows, []error, error) {
	data, err := json.Marshal(protocol.NodePingRequest{Filter: filter})
	if err != nil {
		return nil, nil, nil, err
	}
	nonce := newNonce()
	o.head = nats.Header{protocol.HeaderNonce: {nonce}}
	msgs, err := f.gather(ctx, protocol.PingSubject(), data, o)
	if err != nil {
		return nil, nil, nil, err
	}
	from, checks := f.checkAnswers(msgs, protocol.PingSubject(), nonce, nil)
	var out []protocol.NodePingResponse
	var bad []error
	var unsigned *unsignedRows
	for i, m := range msgs {
		if checks[i] != nil {
			bad = append(bad, checks[i])
			continue
		}
		if err := replyError(m); err != nil {
			bad = append(bad, err)
			continue
		}
		var r protocol.NodePingResponse
		if err := protocol.Decode(m.Data, &r); err != nil {
			bad = append(bad, err)
			continue
		}
		switch {
		case from[i].signed && r.NodeID != from[i].node:
			bad = append(bad, fmt.Errorf("answer refused: a row for node %s signed by node %s", r.NodeID, from[i].node))
			continue
		case !from[i].signed:
			// The row's own node id, too: a row unsigned in a signer's name is forged.
			if err := f.checkUnsigned(r.NodeID); err != nil {
				bad = append(bad, err)
				continue
			}
			unsigned = unsigned.add("node list row(s)", r.NodeID, 1)
		}
		out = append(out, r)
	}
	return out, unsigned, bad, nil
}

// nodeInfo asks one node for its info; only its own answer is taken (askNode).
func (f *fleet) nodeInfo(ctx context.Context, id string) (protocol.NodeInfoResponse, error) {
	var r protocol.NodeInfoResponse
	m, ok, err := f.askInfo(ctx, id)
	if !ok {
		return r, fmt.Errorf("node %s not found: no node answers on %s", id, protocol.InfoSubject(id))
	}
	if err != nil {
		return r, fmt.Errorf("node %s info: %w", id, err)
	}
	if err := protocol.Decode(m.Data, &r); err != nil {
		return r, fmt.Errorf("node %s info: %w", id, err)
	}
	return r, nil
}

// askInfo is askNode for node id's INFO.
func (f *fleet) askInfo(ctx context.Context, id string) (*nats.Msg, bool, error) {
	return f.askNode(ctx, id, protocol.InfoSubject(id), protocol.NodeInfoRequest{}, nil, "", "node "+id+"'s info")
}

// healthyHolder returns the id of one of nodes (ping answers; at most three asked)
// that offers tags, is not in lame duck mode and says it has a healthy nexlet of typ
// supporting lifecycle with room for a workload, or "" when none does: its missing bid
// was then likely lost, not withheld. full names the healthy nexlets a nexd node says
// are at their max_workloads (it withholds its bid for them); other nodes do not say,
// and their nexlets count as having room. unasked is the INFO error when none of the
// nodes asked answered (a tenant may not ask the system namespace): nothing is known.
func (f *fleet) healthyHolder(ctx context.Context, nodes []protocol.NodePingResponse, typ string, lifecycle protocol.Lifecycle, tags map[string]string) (holder string, full []string, unasked error) {
	asked, answered := 0, 0
	for _, n := range nodes {
		if asked == 3 {
			break
		}
		if n.Tags[protocol.TagLameduck] == "true" || !protocol.TagsMatch(tags, n.Tags) {
			continue
		}
		asked++
		info, err := f.nodeInfo(ctx, n.NodeID)
		if err != nil {
			unasked = err
			continue
		}
		answered++
		for _, s := range info.NodeAgentSummaries {
			lcs := s.AgentSummary.SupportedLifecycles
			// Unknown: registered, its first heartbeat not in yet (a nexlet that just
			// restarted, or a remote one: READY waits only for the local nexlets' first
			// heartbeat at start-up); it bids once that comes.
			if s.AgentSummary.Type != typ || (s.AgentHealth != protocol.HealthHealthy && s.AgentHealth != protocol.HealthUnknown) ||
				(lcs != "" && !slices.Contains(strings.Split(lcs, ","), string(lifecycle))) {
				continue
			}
			if s.MaxWorkloads > 0 && s.AgentSummary.WorkloadCount >= s.MaxWorkloads {
				full = append(full, fmt.Sprintf("node %s's %s nexlet %q is at its max_workloads (%d of %d workloads)",
					n.NodeID, typ, s.AgentSummary.Name, s.AgentSummary.WorkloadCount, s.MaxWorkloads))
				continue
			}
			return n.NodeID, full, nil
		}
	}
	if answered > 0 {
		return "", full, nil
	}
	return "", full, unasked
}

// lameduck commands one node into lame duck mode.
func (f *fleet) lameduck(ctx context.Context, id string, delay time.Duration, tag map[string]string) (protocol.LameduckResponse, error) {
	return f.lameduckOn(ctx, id, delay, tag, "", nil)
}

// lameduckOn is lameduck with the reply on inbox ("" for a new one) and head's headers
// too; only the node's own answer is taken (askNode).
func (f *fleet) lameduckOn(ctx context.Context, id string, delay time.Duration, tag map[string]string, inbox string, head nats.Header) (protocol.LameduckResponse, error) {
	var r protocol.LameduckResponse
	subject := protocol.LameduckSubject(id)
	m, ok, err := f.askNode(ctx, id, subject, protocol.LameduckRequest{Delay: delay.String(), Tag: tag}, head, inbox, "the lame duck of node "+id)
	if !ok {
		return r, fmt.Errorf("node %s not found: no node answers on %s", id, subject)
	}
	if errors.Is(err, nats.ErrTimeout) && len(tag) > 0 {
		return r, fmt.Errorf("node %s did not answer; its tags may not match --tag %s", id, strings.Join(sortedTags(tag), ","))
	}
	if err != nil {
		return r, fmt.Errorf("lameduck node %s: %w", id, err)
	}
	if err := protocol.Decode(m.Data, &r); err != nil {
		return r, fmt.Errorf("lameduck node %s: %w", id, err)
	}
	return r, nil
}

// drainTell is what a nexd node tells a client that asked for its drain's outcome
// (HeaderDrainWait): only its own signed word over the nonce counts.
type drainTell struct {
	nodeID, nonce string
	sub           *nats.Subscription

	mu            sync.Mutex
	told          bool   // the node promised (or gave) its outcome
	state, reason string // its outcome (protocol.DrainDrained or DrainFailed), "" before
	forged        int    // claims refused: not signed by the node, or for another nonce
	forgedErr     error  // the first refusal's reason
}

// take reads one reply on the drain inbox for a drain claim: the node's promise in its
// answer, its later outcome, or a claim by someone else, refused. The answer itself
// is lameduckOn's to check.
func (t *drainTell) take(m *nats.Msg) {
	var r protocol.LameduckResponse
	if replyError(m) != nil || len(m.Data) == 0 || json.Unmarshal(m.Data, &r) != nil || r.Drain == nil {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	err := protocol.VerifyDrain(t.nodeID, t.nonce, *r.Drain)
	if err == nil && r.Drain.State != protocol.DrainDraining && r.Drain.State != protocol.DrainDrained && r.Drain.State != protocol.DrainFailed {
		err = fmt.Errorf("unknown drain state %q", r.Drain.State)
	}
	if err != nil {
		t.forged++
		if t.forgedErr == nil {
			t.forgedErr = err
		}
		return
	}
	t.told = true
	if r.Drain.State != protocol.DrainDraining && t.state == "" {
		t.state, t.reason = r.Drain.State, r.Drain.Reason
	}
	if r.Drain.State != protocol.DrainDraining && strings.HasPrefix(m.Reply, "_INBOX") {
		// Acknowledged (HeaderDrainAck): the node stops sending it again. Only to an
		// inbox: a copy of the node's word with a reply subject of someone else's
		// choosing must not make this client publish elsewhere.
		_ = m.Respond(nil)
	}
}

// outcome is what the node told so far: whether it promised to, and its outcome.
func (t *drainTell) outcome() (told bool, state, reason string) {
	if t == nil {
		return false, "", ""
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.told, t.state, t.reason
}

// refused is how many claims were refused and why the first was.
func (t *drainTell) refused() (int, error) {
	if t == nil {
		return 0, nil
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.forged, t.forgedErr
}

func (t *drainTell) close() {
	if t != nil {
		_ = t.sub.Unsubscribe()
	}
}

// lameduckTold is lameduck asking the node to tell its drain's outcome on an inbox of
// its own (HeaderDrainWait): a nexd node answers with its signed promise and later
// sends the outcome there; others answer as to lameduck. The caller closes tell.
func (f *fleet) lameduckTold(ctx context.Context, id string, delay time.Duration, tag map[string]string) (r protocol.LameduckResponse, tell *drainTell, err error) {
	tell = &drainTell{nodeID: id, nonce: nextID()}
	inbox := f.nc.NewInbox()
	if tell.sub, err = f.nc.Subscribe(inbox, tell.take); err != nil {
		return r, nil, fmt.Errorf("subscribe for the lameduck reply: %w", err)
	}
	r, err = f.lameduckOn(ctx, id, delay, tag, inbox, nats.Header{protocol.HeaderDrainWait: {tell.nonce}, protocol.HeaderDrainAck: {"1"}})
	if err != nil {
		tell.close()
		return r, nil, err
	}
	return r, tell, nil
}

// placementTags returns every answering node's tags. A nexd node signs its answer to
// the request's nonce: a reply is taken as a ping row is (checkAnswers), and bad holds
// the refused ones and a note of unsigned ones.
func (f *fleet) placementTags(ctx context.Context) (out []map[string]string, bad []error, err error) {
	nonce := newNonce()
	o := f.gatherOpts(0)
	o.head = nats.Header{protocol.HeaderNonce: {nonce}}
	msgs, err := f.gather(ctx, protocol.PTagsSubject(), []byte("{}"), o)
	if err != nil {
		return nil, nil, err
	}
	from, checks := f.checkAnswers(msgs, protocol.PTagsSubject(), nonce, nil)
	var unsigned *unsignedRows
	for i, m := range msgs {
		if checks[i] != nil {
			bad = append(bad, checks[i])
			continue
		}
		if replyError(m) != nil {
			continue
		}
		var tags map[string]string
		if json.Unmarshal(m.Data, &tags) != nil {
			continue
		}
		if !from[i].signed {
			unsigned = unsigned.add("node tag answer(s)", from[i].node, 1)
		}
		out = append(out, tags)
	}
	if unsigned != nil {
		bad = append(bad, unsigned)
	}
	return out, bad, nil
}

// auction collects the bids for a workload of typ in ns. signed holds the bidder ids of
// bids signed by the node they name; a bid with a signature that does not verify is
// dropped (someone posing as a node) and reported in bad. id is the auction's id (the
// signatures cover it). Each bidder is taken once (bidOnce): copies are refused and
// counted in bad.
func (f *fleet) auction(ctx context.Context, ns, typ string, tags map[string]string, o gatherOpts) (bids []protocol.AuctionResponse, signed map[string]bool, id string, bad []error, err error) {
	if tags == nil {
		tags = map[string]string{}
	}
	req := protocol.AuctionRequest{AgentType: typ, AuctionID: nextID(), Tags: tags}
	data, err := json.Marshal(req)
	if err != nil {
		return nil, nil, "", nil, err
	}
	o.some = true
	once := &bidOnce{ns: ns, auctionID: req.AuctionID, bidders: map[string]bool{}, nodes: map[string]bool{}, checked: map[*nats.Msg]checkedBid{}}
	o.take = once.take
	msgs, err := f.gather(ctx, protocol.AuctionSubject(ns), data, o)
	if once.copies > 0 {
		bad = append(bad, fmt.Errorf("%d bid(s) refused: copies of bids this auction took already (sent again by someone who read them; each node bids once)", once.copies))
	}
	if errors.Is(err, scatter.ErrBounded) {
		// The bids that came are as good as any: the placement goes on, said once.
		bad = append(bad, fmt.Errorf("%w; nexctl stopped listening and chooses among the bids in them", err))
		defer func() { // named first, ahead of the unusable bids it may come with
			if len(bad) > 1 {
				bad = append(bad[len(bad)-1:], bad[:len(bad)-1]...)
			}
		}()
		err = nil
	}
	if err != nil {
		return nil, nil, "", nil, err
	}
	signed = map[string]bool{}
	for _, m := range msgs {
		if err := replyError(m); err != nil {
			bad = append(bad, err)
			continue
		}
		c, ok := once.checked[m] // decoded and verified as it came (bidOnce)
		if !ok {
			if err := protocol.Decode(m.Data, &c.bid); err != nil {
				bad = append(bad, err)
				continue
			}
			c.err = protocol.VerifyBid(ns, req.AuctionID, c.bid)
		}
		b := c.bid
		switch err := c.err; {
		case err == nil && f.trusted != nil && !f.trusted[b.NodeID]:
			bad = append(bad, fmt.Errorf("bid refused from %s: node %s is not in trusted_nodes", bidLabel(b), b.NodeID))
			continue
		case err == nil:
			signed[b.BidderID] = true
			f.noteSigner(b.NodeID)
		case errors.Is(err, protocol.ErrUnsignedBid) && f.trusted != nil && !f.allowUnsigned:
			// Anyone can claim a listed node id in a bid it does not sign.
			bad = append(bad, fmt.Errorf("bid refused from %s: it is not signed, so its node id cannot be checked against trusted_nodes (--allow-unsigned-bids accepts such bids)", bidLabel(b)))
			continue
		case !errors.Is(err, protocol.ErrUnsignedBid):
			bad = append(bad, fmt.Errorf("bid refused from %s: %w", bidLabel(b), err))
			continue
		}
		bids = append(bids, b)
	}
	return bids, signed, req.AuctionID, bad, nil
}

// bidOnce takes each bidder once in one auction. A bid's signature is in its body and
// covers the auction, so anyone who reads the client's inbox can send a node's bid
// again and the copy verifies: before, it counted as one more node's (the auction,
// expecting as many bids as nodes answered the ping, ended before a node's bid came and
// the workload went elsewhere), and a copy was the "next bid" a refused deploy fell back
// to (the same node asked twice). Taken once: a bidder id (random for each bid, so known
// to nobody before its bid is out: nexd's and upstream's), and the node id of a bid its
// node signed; the first comes from the node, a copy only after it.
type bidOnce struct {
	ns, auctionID  string
	bidders, nodes map[string]bool
	copies         int
	// checked holds each bid taken, decoded, with its signature's check (VerifyBid),
	// so that auction neither decodes nor verifies it again.
	checked map[*nats.Msg]checkedBid
}

type checkedBid struct {
	bid protocol.AuctionResponse
	err error
}

// take says whether m is taken: false for a copy. A reply that is no bid, or whose
// signature does not verify, is taken here and refused by auction with its reason.
func (o *bidOnce) take(m *nats.Msg) bool {
	var b protocol.AuctionResponse
	if replyError(m) != nil || protocol.Decode(m.Data, &b) != nil {
		return true
	}
	verr := protocol.VerifyBid(o.ns, o.auctionID, b)
	signed := verr == nil
	if o.bidders[b.BidderID] || (signed && o.nodes[b.NodeID]) {
		o.copies++
		return false
	}
	o.bidders[b.BidderID] = true
	if signed {
		o.nodes[b.NodeID] = true
	}
	o.checked[m] = checkedBid{bid: b, err: verr}
	return true
}

// errDeployTimeout marks a deploy whose outcome is unknown: the workload may be starting,
// so the caller must not fall back to another node and risk two copies.
var errDeployTimeout = errors.New("deploy timed out")

// errNotStarted marks a deploy the node refused before anything ran: only then may
// another bid be tried.
var errNotStarted = errors.New("not started")

// errOutcomeUnknown marks a deploy whose node went silent mid-request: the workload may
// have started there, so nothing is tried elsewhere and the exit code says "unknown".
var errOutcomeUnknown = errors.New("unknown: the node did not answer")

// errLinkClosed marks a deploy whose answer nexctl could no longer hear: its own NATS
// connection closed after the request went out (credentials revoked or expired), so
// the outcome is unknown as with errOutcomeUnknown.
var errLinkClosed = errors.New("unknown: nexctl's NATS connection closed")

// deploy sends the start request to the node holding bidderID. A node that says it is
// alive (nexd does when asked: HeaderAlive) and then goes silent for f.silence is
// reported as errOutcomeUnknown; signer (the node id of a signed bid: a nexd) makes
// silence from the start count too. Other nodes get until f.deployTimeout.
//
// With signer, only that node's signed replies count (answers.go): anyone else who
// sees the request could answer it first, and before, a forged "not started" made
// nexctl try the next bid while the bid's node started the workload too (two copies),
// and a forged answer reported a workload that did not exist. Others' replies, a server's
// "no responders" among them (a rogue can write that status too, and with any node
// listening it cannot be the server's), are ignored and counted in a warning.
func (f *fleet) deploy(ctx context.Context, bidderID string, req protocol.StartWorkloadRequest, signer string) (r protocol.StartWorkloadResponse, err error) {
	expectAlive := signer != ""
	if req.Tags == nil {
		req.Tags = map[string]string{}
	}
	data, err := json.Marshal(req)
	if err != nil {
		return r, err
	}
	subject := protocol.DeploySubject(req.Namespace, bidderID)
	before := f.nc.LastError()
	inbox := f.nc.NewInbox()
	// The node's answer, keep-alives and progress wait in a list sized to them, not a
	// sync subscription's 512 KB channel (scatter.Replies).
	sub, err := scatter.Subscribe(f.nc, inbox)
	if err != nil {
		return r, fmt.Errorf("subscribe for the deploy reply: %w", err)
	}
	defer sub.Close()
	// HeaderProgress asks a node that can to report how the start goes (an artifact
	// download) with body-less replies before its answer; others ignore it.
	nonce := newNonce()
	msg := &nats.Msg{Subject: subject, Reply: inbox, Data: data, Header: nats.Header{protocol.HeaderProgress: {"1"}, protocol.HeaderNonce: {nonce}}}
	var forged refusals
	defer forged.warn(f, "the deploy not signed by node "+signer+", which took the bid")
	if f.aliveEvery > 0 && f.silence > 0 {
		msg.Header.Set(protocol.HeaderAlive, f.aliveEvery.String())
	}
	sent := time.Now()
	if err := f.nc.PublishMsg(msg); err != nil {
		return r, fmt.Errorf("publish %s: %w", subject, err)
	}
	if err := scatter.FlushRefused(ctx, f.nc, before, f.first, subject, inbox); err != nil {
		return r, err
	}
	deadline := sent.Add(f.deployTimeout)
	if f.progress != nil {
		defer f.progress.done()
	}
	var m *nats.Msg
	var heard time.Time // the node's last keep-alive
	// The numbers (HeaderSeq) of the signer's keep-alives and progress reports taken:
	// each is alike each time, and a copy (anyone who reads the inbox can send one
	// again, and it verifies) counted as the node heard from, up to the deploy's own
	// bounds. A nexd node numbers them; an older one does not, and is taken as before.
	seqs := map[string]bool{}
	var copied refusals
	defer copied.warn(f, "the deploy that were copies of node "+signer+"'s keep-alives or progress reports (sent again by someone who read them)")
	for {
		until := deadline
		watch := f.silence > 0 && (expectAlive || !heard.IsZero())
		if watch {
			last := sent
			if heard.After(last) {
				last = heard
			}
			if q := last.Add(f.silence); q.Before(until) {
				until = q
			}
		}
		rctx, cancel := context.WithDeadline(ctx, until)
		m, err = sub.Next(rctx)
		cancel()
		switch {
		case err != nil && ctx.Err() != nil:
			return r, ctx.Err()
		case errors.Is(err, scatter.ErrClosed):
			// Not the node's silence nor the deploy bound: nexctl's own link is gone.
			return r, fmt.Errorf("%w: the workload may have started there, so no other node is tried; "+
				"'nexctl workload list' shows it once nexctl can connect again", f.closedLink("the node's answer", sent))
		case err != nil && watch && time.Now().Before(deadline):
			return r, fmt.Errorf("%w%s", f.silentNode(sent, heard), droppedNote(sub))
		case err != nil:
			return r, fmt.Errorf("%w after %s%s", errDeployTimeout, time.Since(sent).Round(time.Second), droppedNote(sub))
		}
		if signer != "" {
			a, verr := f.verifyAnswer(m, subject, nonce)
			if verr == nil && a.node != signer {
				verr = fmt.Errorf("signed by node %s", a.node)
			}
			if verr != nil {
				forged.add(verr)
				continue
			}
			if seq := m.Header.Get(protocol.HeaderSeq); seq != "" && len(m.Data) == 0 {
				if seqs[seq] {
					copied.add(fmt.Errorf("reply %s %s taken already", protocol.HeaderSeq, seq))
					continue
				}
				seqs[seq] = true
			}
		}
		switch {
		case m.Header.Get(protocol.HeaderAlive) != "" && len(m.Data) == 0 && replyError(m) == nil:
			heard = time.Now()
			continue
		case len(m.Data) == 0 && m.Header.Get("Status") == "503":
			return r, fmt.Errorf("%w: bid %s expired: no node answers for it", errNotStarted, bidderID)
		case m.Header.Get(protocol.HeaderProgress) != "" && len(m.Data) == 0 && replyError(m) == nil:
			if f.progress != nil {
				f.progress.show(progressOf(m.Header))
			}
			// The node is still at it; but not for ever: anyone who sees the request (a
			// rogue node, or the bidder itself) could report progress without end.
			deadline = time.Now().Add(f.deployTimeout)
			if f.deployMax > 0 {
				deadline = earliest(deadline, sent.Add(f.deployMax))
			}
			continue
		}
		break
	}
	if err := replyError(m); err != nil {
		if m.Header.Get(protocol.HeaderDeployOutcome) == protocol.DeployNotStarted {
			return r, fmt.Errorf("%w: %w", errNotStarted, err)
		}
		return r, err
	}
	if err := protocol.Decode(m.Data, &r); err != nil {
		return r, err
	}
	return r, nil
}

// droppedNote is what an error of a wait on sub adds when replies to it were dropped
// unread (scatter.Subscribe's bound): the answer waited for may be among them, and
// whoever sees a request may flood its inbox.
func droppedNote(sub *scatter.Replies) string {
	n := sub.Dropped()
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("; %d repl(ies) to it were dropped unread, past %d MiB waiting (someone floods the reply inbox?): the answer may have been among them",
		n, scatter.ReplyPendingBytes>>20)
}

// silentNode is the error for a node that stopped answering a deploy (or never
// acknowledged it): what was heard when, and that nexctl's own link may be the cut one.
func (f *fleet) silentNode(sent, heard time.Time) error {
	what := fmt.Sprintf("it never acknowledged the request in %s", f.silence)
	if !heard.IsZero() {
		what = fmt.Sprintf("it acknowledged the request, then said nothing for %s", f.silence)
	}
	if !f.nc.IsConnected() {
		what += "; nexctl's own NATS connection is down too"
	}
	return fmt.Errorf("%w (%s; %s since the request): the workload may have started there, so no other node is tried; "+
		"'nexctl workload list' shows it once the node is reachable again", errOutcomeUnknown, what, time.Since(sent).Round(100*time.Millisecond))
}

// closedLink is the error for a request whose answer (what) nexctl can no longer
// hear: its connection closed (why, as nats.go last heard it from the server).
func (f *fleet) closedLink(what string, sent time.Time) error {
	why := ""
	if err := f.nc.LastError(); err != nil {
		why = "; last error: " + err.Error()
	}
	return fmt.Errorf("%w while it waited for %s (%s since the request%s)", errLinkClosed, what, time.Since(sent).Round(100*time.Millisecond), why)
}

// partialList is a node's list answer that lacks some of its nexlets' workloads
// (protocol.HeaderPartial): they did not answer the node in time, or answered with an
// error.
type partialList struct {
	node string // the node's id (HeaderNode)
	protocol.PartialList
	// failed is the node's error answer to the list (listFailed): none of its
	// workloads are in it.
	failed error
}

func (e *partialList) Error() string {
	if e.failed != nil {
		return (&listFailed{node: e.node, err: e.failed}).Error()
	}
	return fmt.Sprintf("node %s (%s) listed only part of its workloads; missing those of %s",
		orDash(e.NodeName), orDash(e.node), e.which())
}

// which names the nexlets the list lacks, never "": outside the system namespace the
// node says how many, not which.
func (e *partialList) which() string {
	if e.failed != nil {
		return fmt.Sprintf("every nexlet's: the node answered the list with an error: %v", e.failed)
	}
	if what := protocol.MissingText(e.Missing); what != "" {
		return what
	}
	return fmt.Sprintf("%d of its nexlets (the node names them to the system namespace only)", max(1, e.MissingCount))
}

// listFailed is a node's list answer that carries none of its workloads: an error
// reply (a list over max_payload, 413; a node that could not ask its nexlets, 500) or
// one that cannot be read. The node may run workloads all the same.
type listFailed struct {
	node string // the node's id (HeaderNode); "" for a node that does not name itself
	err  error
}

func (e *listFailed) Error() string {
	if e.node == "" {
		return fmt.Sprintf("a node that does not name itself (not a nexd node) did not list its workloads: %v", e.err)
	}
	return fmt.Sprintf("node %s did not list its workloads: %v", e.node, e.err)
}

func (e *listFailed) Unwrap() error { return e.err }

// listWait bounds how long nexctl waits for a nexd node that acknowledged a WPING
// (HeaderProgress) to answer: the node waits 2 s for its nexlets.
const listWait = 5 * time.Second

// wpingOpts gathers WPING answers: nexd nodes acknowledge at once when asked
// (HeaderProgress), naming themselves (HeaderNode), and each such node's answer is
// waited for, so a node whose nexlet is slow (its answer comes after its 2 s fan-out,
// with Nex-Partial) is not cut off by faster nodes' answers. Upstream nodes do not
// acknowledge and are gathered as before. resourcesOf asks that node for cgroup
// figures (HeaderResources).
//
// The request carries a fresh nonce (HeaderNonce; the returned one, for the subject
// subject) and an acknowledgement counts only when signed by the node it names, or
// unsigned from a node that may answer unsigned (checkUnsigned). The answers the
// promises verified are returned for checkAnswers.
func (f *fleet) wpingOpts(subject, resourcesOf string) (scatter.Options, string, checked) {
	nonce := newNonce()
	head := nats.Header{protocol.HeaderProgress: {"1"}, protocol.HeaderNonce: {nonce}}
	if resourcesOf != "" {
		head.Set(protocol.HeaderResources, resourcesOf)
	}
	done := checked{}
	return scatter.Options{First: f.first, Stall: f.stall, Header: head, Promised: listWait,
		// A node's acknowledgement promises its answer; its answer (or error) ends the
		// promise, so the gather ends once every node that promised answered. Only what
		// checks counts, for either: no one else makes or ends a node's promise. Before,
		// an answer ended none (its key was ""): every list on nexd nodes waited out
		// listWait, 5 s, after their acknowledgements (e2e TestStopAnsweredByALateHolder:
		// each `workload stop` and `lameduck --migrate` spent 5 s in its listing).
		Promise: func(m *nats.Msg) (string, bool) {
			a, err := f.verifyAnswer(m, subject, nonce)
			ack := len(m.Data) == 0 && m.Header.Get(protocol.HeaderProgress) != "" && replyError(m) == nil
			if !ack { // an answer: the gather returns it, and checkAnswers takes this check
				done[m] = verified{a, err}
			}
			if errors.Is(err, protocol.ErrUnsignedAnswer) {
				err = f.checkUnsigned(a.node)
			}
			if err != nil {
				return "", false
			}
			return a.node, ack
		}}, nonce, done
}

// partialOf is a WPING reply's HeaderPartial (nil when the reply is whole).
func partialOf(m *nats.Msg) *partialList {
	h := m.Header.Get(protocol.HeaderPartial)
	if h == "" {
		return nil
	}
	p := &partialList{node: m.Header.Get(protocol.HeaderNode)}
	if err := json.Unmarshal([]byte(h), &p.PartialList); err != nil {
		p.Missing = []protocol.MissingNexlet{{Name: "-", ID: "-", Reason: fmt.Sprintf("unreadable %s header %q: %v", protocol.HeaderPartial, h, err)}}
	}
	return p
}

// listWorkloads gathers workload summaries in ns, optionally filtered by id or name.
// bad holds the replies that could not be used and, as *partialList, the nodes whose
// answer lacks some nexlets' workloads (their rows are in the list).
func (f *fleet) listWorkloads(ctx context.Context, ns string, filter []string) ([]protocol.WorkloadSummary, []error, error) {
	out, _, _, bad, err := f.listWorkloadsAndStops(ctx, ns, filter, "")
	return out, bad, err
}

// listWorkloadsAndStops is listWorkloads that, with stoppedRef, also asks nexd nodes
// for the workloads they stopped lately that stoppedRef names (HeaderStoppedRef), in
// the caller's namespace; each id once. holders names the node that listed each
// workload (HeaderNode; nodes that do not name themselves are left out, and so are
// workloads two nodes list).
func (f *fleet) listWorkloadsAndStops(ctx context.Context, ns string, filter []string, stoppedRef string) (out []protocol.WorkloadSummary, stopped []protocol.RecentStop, holders map[string]string, bad []error, err error) {
	if filter == nil {
		filter = []string{}
	}
	data, err := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: ns, Filter: filter})
	if err != nil {
		return nil, nil, nil, nil, err
	}
	subject := protocol.WPingSubject(ns)
	opts, nonce, done := f.wpingOpts(subject, "")
	if stoppedRef != "" {
		opts.Header.Set(protocol.HeaderStoppedRef, stoppedRef)
	}
	msgs, err := f.scatterGather(ctx, subject, data, opts)
	if err != nil {
		return nil, nil, nil, nil, err
	}
	holders = map[string]string{}
	contested := map[string]bool{}
	seen := map[string]bool{}
	var unlisted []error
	defer func() {
		f.unlistedMu.Lock()
		f.unlisted = unlisted
		f.unlistedMu.Unlock()
	}()
	from, checks := f.checkAnswers(msgs, subject, nonce, done)
	var unsigned *unsignedRows
	defer func() {
		if unsigned != nil {
			bad = append(bad, unsigned)
		}
	}()
	for i, m := range msgs {
		if checks[i] != nil {
			bad = append(bad, checks[i])
			continue
		}
		if err := replyError(m); err != nil {
			lf := &listFailed{node: m.Header.Get(protocol.HeaderNode), err: err}
			bad, unlisted = append(bad, lf), append(unlisted, lf)
			continue
		}
		if p := partialOf(m); p != nil {
			bad = append(bad, p)
		}
		var rs []protocol.RecentStop
		if h := m.Header.Get(protocol.HeaderStopped); h != "" && json.Unmarshal([]byte(h), &rs) == nil {
			for _, r := range rs {
				if !seen[r.ID] {
					seen[r.ID] = true
					stopped = append(stopped, r)
				}
			}
		}
		if len(m.Data) == 0 || string(m.Data) == "null" {
			continue
		}
		var ws []protocol.WorkloadSummary
		if err := json.Unmarshal(m.Data, &ws); err != nil {
			lf := &listFailed{node: m.Header.Get(protocol.HeaderNode), err: fmt.Errorf("unreadable workload list: %w", err)}
			bad, unlisted = append(bad, lf), append(unlisted, lf)
			continue
		}
		out = append(out, ws...)
		if !from[i].signed && len(ws) > 0 {
			unsigned = unsigned.add("workload row(s)", from[i].node, len(ws))
		}
		if node := from[i].node; node != "" {
			for _, w := range ws {
				if h, ok := holders[w.ID]; ok && h != node {
					contested[w.ID] = true
				}
				holders[w.ID] = node
			}
		}
	}
	// One workload id, one node: when two nodes list it, one (a node id anyone can make
	// up and sign as) poses as its holder, so none is known. Before, the last one named
	// was taken, and a clone took only its signed answer (TestAttackRogueSignerClaimsHolder).
	for id := range contested {
		delete(holders, id)
	}
	return out, stopped, holders, bad, nil
}

// workloadNamespace finds the summary and namespace of workload id (exact id).
func (f *fleet) workloadNamespace(ctx context.Context, id string) (protocol.WorkloadSummary, error) {
	ws, _, err := f.listWorkloads(ctx, f.ns, []string{id})
	if err != nil {
		return protocol.WorkloadSummary{}, err
	}
	var found []protocol.WorkloadSummary
	seen := map[string]bool{}
	for _, w := range ws {
		if w.ID != id {
			continue
		}
		ns := f.ns
		if w.Namespace != nil && *w.Namespace != "" {
			ns = *w.Namespace
		}
		if !seen[ns] {
			seen[ns] = true
			w.Namespace = &ns
			found = append(found, w)
		}
	}
	switch len(found) {
	case 0:
		return protocol.WorkloadSummary{}, f.notFound(id, "")
	case 1:
		return found[0], nil
	}
	return protocol.WorkloadSummary{}, fmt.Errorf("workload id %s matches workloads in %d namespaces; use --namespace to pick one", id, len(found))
}

// stopUnrecorded is a node's word that it is stopping a workload whose nexlet did not
// confirm in time that it recorded the stop (protocol.HeaderStopUnrecorded).
type stopUnrecorded string

func (e stopUnrecorded) Error() string { return string(e) }

// stopWait bounds the wait for a node that said it is stopping a workload: the node
// answers once the workload is gone (its grace, then a kill) or after its own bound.
const stopWait = 5*time.Minute + 30*time.Second

// stopWorkload asks every node in ns to stop id. The node holding it says "stopping"
// at once (nexd; upstream nodes do not) and answers when the workload is gone; with
// wait false the "stopping" is the answer (stopping true). Replies of nodes that do not
// hold the workload ("not found") end the wait only when no node said "stopping". With
// holder (the node a listing or a clone answer named as holding it; "" when unknown),
// they do not end it at all: the holder's word or answer does (it names itself,
// HeaderNode), else the wait's first bound. Before, a loaded holder whose word came
// more than --gather-stall after the others' "not found" had its stop reported as
// "not found" while it stopped the workload (CI, e2e TestLameduckMigrate).
func (f *fleet) stopWorkload(ctx context.Context, ns, id string, wait bool, holder string) (resp protocol.StopWorkloadResponse, stopping bool, err error) {
	ret := protocol.StopWorkloadResponse{ID: id, Message: protocol.ErrTextWorkloadNotFound}
	data, err := json.Marshal(protocol.StopWorkloadRequest{Namespace: ns})
	if err != nil {
		return ret, false, err
	}
	before := f.nc.LastError()
	inbox := f.nc.NewInbox()
	sub, err := scatter.Subscribe(f.nc, inbox)
	if err != nil {
		return ret, false, fmt.Errorf("subscribe for stop replies: %w", err)
	}
	defer sub.Close()
	nonce := newNonce()
	m := &nats.Msg{Subject: protocol.UndeploySubject(ns, id), Reply: inbox, Data: data,
		Header: nats.Header{protocol.HeaderProgress: {"1"}, protocol.HeaderNonce: {nonce}}}
	subject := m.Subject
	// A holder that signs (a nexd node whose listing or bid verified) is heard only in
	// replies it signed: anyone else who sees the request could say "stopped", or the
	// "stopping" word, in its name (answers.go). Others' replies are checked as in a
	// gather: an unsigned one in a signer's name is refused.
	strict := f.isSigner(holder)
	var forged refusals
	defer forged.warn(f, "the stop of "+id)
	sent := time.Now()
	if err := f.nc.PublishMsg(m); err != nil {
		return ret, false, fmt.Errorf("publish stop request: %w", err)
	}
	if err := scatter.FlushRefused(ctx, f.nc, before, f.first, m.Subject, inbox); err != nil {
		return ret, false, err
	}
	var errs []error
	heardHolder, anonymous := false, false
	speaker := "" // the node whose "stopping" word came (HeaderNode)
	wordHeard := false
	deadline := time.Now().Add(f.first)
	// However the replies come, the wait ends by then: a word within f.first, its
	// answer within stopWait. Before, each word (and, before one, each reply) moved
	// the end on, so anyone who sees the request kept nexctl waiting for good.
	answerWait := f.stopWait
	if answerWait <= 0 {
		answerWait = stopWait
	}
	bound := sent.Add(f.first + answerWait)
	for {
		left := time.Until(earliest(deadline, bound))
		if left <= 0 {
			break
		}
		rctx, cancel := context.WithTimeout(ctx, left)
		m, err := sub.Next(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return ret, stopping, ctx.Err()
			}
			if errors.Is(err, scatter.ErrClosed) {
				// Neither "not found" nor the node's silence: nexctl's own link is gone.
				return ret, stopping, fmt.Errorf("%w: whether it stopped is unknown; 'nexctl workload list' shows it once nexctl can connect again",
					f.closedLink("the stop's answer", sent))
			}
			break
		}
		a, cerr := f.checkAnswer(m, subject, nonce)
		if cerr == nil && strict && (!a.signed || a.node != holder) {
			switch {
			case a.signed && saysNotFound(m):
				// Another node's own answer, signed by it, that it does not hold the
				// workload: taken as that, which ends nothing (only the holder's answer
				// does). Before, it was refused and warned of as a forgery
				// (`ignored 1 repl(ies) … signed by node B, not by node A`) on every stop
				// on more than one node.
			case a.signed:
				cerr = fmt.Errorf("signed by node %s, not by node %s, which holds it", a.node, holder)
			default:
				cerr = fmt.Errorf("unsigned, while node %s, which holds it, signs its answers", holder)
			}
		}
		if cerr != nil {
			forged.add(cerr)
			continue
		}
		if len(m.Data) == 0 && m.Header.Get("Status") == "503" {
			break // nobody listens
		}
		from := a.node
		fromHolder := holder != "" && from == holder
		heardHolder = heardHolder || fromHolder
		anonymous = anonymous || from == "" // upstream's, or a nexd's before it named itself
		if m.Header.Get(protocol.HeaderProgress) != "" && len(m.Data) == 0 && replyError(m) == nil {
			stopping = true
			if speaker == "" {
				speaker = from
			}
			if !wait {
				ret.Message = "stopping"
				if why := m.Header.Get(protocol.HeaderStopUnrecorded); why != "" {
					return ret, true, stopUnrecorded(why)
				}
				return ret, true, nil
			}
			if !wordHeard { // the first word only: a stop is answered within wait of it
				wordHeard = true
				deadline = time.Now().Add(answerWait)
				if f.debug != nil {
					f.debug("stop of %s: %s is stopping it; waiting up to %s for its answer", id, nodeName(from), answerWait)
				}
			}
			continue
		}
		if !stopping {
			if holder == "" || fromHolder {
				deadline = time.Now().Add(f.stall)
			} else if f.debug != nil {
				// Said here, where the wait goes on, so the line is the wait's own: an
				// operator (and e2e TestStopAnsweredByALateHolder) learns that this
				// answer was taken and did not end it.
				f.debug("stop of %s: %s answered (%s); still waiting up to %s for node %s, which holds it", id, nodeName(from),
					stopReplyText(m), time.Until(earliest(deadline, bound)).Round(time.Millisecond), holder)
			}
		}
		if err := replyError(m); err != nil {
			if from != "" && (fromHolder || from == speaker) {
				// The holding node's answer is this error: no other is coming from it
				// (before, nexctl waited on, after a word up to stopWait).
				return ret, stopping, &stopFailed{node: from, err: err}
			}
			errs = append(errs, err)
			continue
		}
		var r protocol.StopWorkloadResponse
		if err := json.Unmarshal(m.Data, &r); err != nil {
			errs = append(errs, err)
			continue
		}
		if r.Stopped {
			return r, false, nil
		}
		if r.Message != "" && r.Message != protocol.ErrTextWorkloadNotFound {
			ret.Message = r.Message
			if stopping || fromHolder {
				return ret, stopping, nil // the holding node's answer
			}
		}
		if fromHolder {
			return ret, stopping, nil // the holder holds it no more: not found
		}
	}
	if stopping && ret.Message == protocol.ErrTextWorkloadNotFound {
		ret.Message = fmt.Sprintf("still stopping: the node did not answer within %s%s", answerWait, droppedNote(sub))
	}
	if !stopping && holder != "" && !heardHolder && !anonymous && ret.Message == protocol.ErrTextWorkloadNotFound {
		ret.Message = fmt.Sprintf("node %s, which held it, did not answer the stop within %s (nor did any other node stop it)%s", holder, f.first, droppedNote(sub))
	}
	return ret, stopping, errors.Join(errs...)
}

// nodeName names the node a reply came from (HeaderNode) for --verbose.
func nodeName(id string) string {
	if id == "" {
		return "a node that does not name itself"
	}
	return "node " + id
}

// saysNotFound says whether m is a node's plain answer to a stop that it does not hold
// the workload: no word, no error, not stopped.
func saysNotFound(m *nats.Msg) bool {
	if m.Header.Get(protocol.HeaderProgress) != "" || replyError(m) != nil {
		return false
	}
	var r protocol.StopWorkloadResponse
	return json.Unmarshal(m.Data, &r) == nil && !r.Stopped && r.Message == protocol.ErrTextWorkloadNotFound
}

// stopReplyText is what a reply to a stop says, for --verbose.
func stopReplyText(m *nats.Msg) string {
	if err := replyError(m); err != nil {
		return err.Error()
	}
	var r protocol.StopWorkloadResponse
	switch {
	case json.Unmarshal(m.Data, &r) != nil:
		return "an answer that does not decode"
	case r.Stopped:
		return "stopped"
	}
	return r.Message
}

// stopFailed is the error answer of the node holding a workload (the listing named it,
// or it said it was stopping it) to its stop.
type stopFailed struct {
	node string
	err  error
}

func (e *stopFailed) Error() string {
	return fmt.Sprintf("node %s, which holds it, answered the stop with an error: %v", e.node, e.err)
}

func (e *stopFailed) Unwrap() error { return e.err }

// unknown says whether the stop may have gone on there: a node error (5xx) may come
// after the stop was handed to its nexlet (a node stopping cancels its handlers).
func (e *stopFailed) unknown() bool {
	var ne *nodeError
	return errors.As(e.err, &ne) && ne.Code >= 500
}

// cloneRequest fetches a workload's start request.
func (f *fleet) cloneRequest(ctx context.Context, id, xkeyPub string) (protocol.StartWorkloadRequest, error) {
	swr, _, err := f.clone(ctx, id, protocol.CloneWorkloadRequest{Namespace: f.ns, NewTargetXKey: xkeyPub})
	return swr, err
}

// cloneRequestHeld is cloneRequest that also names the node that answered, the one
// holding the workload (HeaderNode; "" for a node that does not name itself).
func (f *fleet) cloneRequestHeld(ctx context.Context, id string) (protocol.StartWorkloadRequest, string, error) {
	return f.clone(ctx, id, protocol.CloneWorkloadRequest{Namespace: f.ns})
}

// cloneFor fetches a workload's start request with its sealed environment re-sealed
// for the nexlet of bid, which a node signed in auction auctionID in ns.
func (f *fleet) cloneFor(ctx context.Context, id string, bid protocol.AuctionResponse, ns, auctionID string) (protocol.StartWorkloadRequest, error) {
	swr, _, err := f.clone(ctx, id, protocol.CloneWorkloadRequest{Namespace: f.ns, NewTargetXKey: bid.XKey,
		Bid: &bid, BidAuctionID: auctionID, BidNamespace: ns})
	return swr, err
}

func (f *fleet) clone(ctx context.Context, id string, req protocol.CloneWorkloadRequest) (out protocol.StartWorkloadRequest, node string, err error) {
	data, err := json.Marshal(req)
	if err != nil {
		return out, "", err
	}
	// The node that holds it, from a listing (a nexd node acknowledges a list at once
	// and is waited for): when it signs, only its signed answer is taken, however late
	// it comes after anyone else's (answers.go).
	if _, _, holders, _, lerr := f.listWorkloadsAndStops(ctx, f.ns, []string{id}, ""); lerr == nil && f.isSigner(holders[id]) {
		return f.cloneFrom(ctx, id, data, holders[id])
	}
	// Every answer, not the first: the one signed by a node is taken over unsigned ones
	// (anyone who sees the request may answer it, first, with a start request of its
	// making, which nexctl would then deploy: answers.go).
	subject := protocol.CloneSubject(f.ns, id)
	nonce := newNonce()
	msgs, err := f.gather(ctx, subject, data, gatherOpts{first: f.first, stall: f.stall, head: nats.Header{protocol.HeaderNonce: {nonce}}})
	if err != nil {
		return out, "", err
	}
	from, checks := f.checkAnswers(msgs, subject, nonce, nil)
	var errs []error
	var found []int // usable answers: signed ones first
	signers := map[string]bool{}
	for i, m := range msgs {
		if checks[i] != nil {
			errs = append(errs, checks[i])
			continue
		}
		if err := replyError(m); err != nil {
			errs = append(errs, err)
			continue
		}
		if len(m.Data) == 0 || string(m.Data) == "null" {
			continue
		}
		if from[i].signed {
			signers[from[i].node] = true
			found = append([]int{i}, found...)
		} else {
			found = append(found, i)
		}
	}
	if len(signers) > 1 {
		// One workload id, one node: a node id someone made up signs the other answer.
		return out, "", fmt.Errorf("workload %s: %d nodes signed an answer to its clone (%s): one poses as its holder; list your nodes in trusted_nodes",
			id, len(signers), strings.Join(slices.Sorted(maps.Keys(signers)), ", "))
	}
	for _, i := range found {
		if from[i].signed != (len(signers) > 0) {
			continue // unsigned beside a signed answer: not the holder's
		}
		if err := json.Unmarshal(msgs[i].Data, &out); err != nil {
			errs = append(errs, fmt.Errorf("clone reply: %w", err))
			continue
		}
		for j := range checks {
			if checks[j] != nil && f.warn != nil {
				f.warn("ignoring a reply to the clone of %s: %v", id, checks[j])
			}
		}
		return out, from[i].node, nil
	}
	if len(errs) > 0 {
		return out, "", fmt.Errorf("workload %s: %w", id, errors.Join(errs...))
	}
	return out, "", fmt.Errorf("workload %s not found in namespace %s", id, f.ns)
}

// cloneFrom asks for the start request of workload id (the CLONE request data) and
// takes only the signed answer of holder, a node that signs: any other reply is
// ignored, with a warning. It waits f.first for that answer.
func (f *fleet) cloneFrom(ctx context.Context, id string, data []byte, holder string) (out protocol.StartWorkloadRequest, node string, err error) {
	subject := protocol.CloneSubject(f.ns, id)
	before := f.nc.LastError()
	inbox := f.nc.NewInbox()
	sub, err := scatter.Subscribe(f.nc, inbox)
	if err != nil {
		return out, "", fmt.Errorf("subscribe for the clone reply: %w", err)
	}
	defer sub.Close()
	nonce := newNonce()
	if err := f.nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data, Header: nats.Header{protocol.HeaderNonce: {nonce}}}); err != nil {
		return out, "", fmt.Errorf("publish %s: %w", subject, err)
	}
	if err := scatter.FlushRefused(ctx, f.nc, before, f.first, subject, inbox); err != nil {
		return out, "", err
	}
	var forged refusals
	defer forged.warn(f, "the clone of "+id)
	rctx, cancel := context.WithTimeout(ctx, f.first)
	defer cancel()
	for {
		m, err := sub.Next(rctx)
		switch {
		case err != nil && ctx.Err() != nil:
			return out, "", ctx.Err()
		case err != nil:
			return out, "", fmt.Errorf("workload %s: node %s, which holds it, did not answer its clone within %s%s", id, holder, f.first, droppedNote(sub))
		}
		a, verr := f.verifyAnswer(m, subject, nonce)
		if verr == nil && a.node != holder {
			verr = fmt.Errorf("signed by node %s, not by node %s, which holds it", a.node, holder)
		} else if errors.Is(verr, protocol.ErrUnsignedAnswer) {
			verr = fmt.Errorf("unsigned, while node %s, which holds it, signs its answers", holder)
		}
		if verr != nil {
			forged.add(verr)
			continue
		}
		if err := replyError(m); err != nil {
			return out, "", fmt.Errorf("workload %s: %w", id, err)
		}
		if len(m.Data) == 0 || string(m.Data) == "null" {
			continue
		}
		if err := json.Unmarshal(m.Data, &out); err != nil {
			return out, "", fmt.Errorf("workload %s: clone reply: %w", id, err)
		}
		return out, holder, nil
	}
}

// inboxPrefix is the prefix of every reply inbox of the connection, with its dot.
func (f *fleet) inboxPrefix() string {
	if p := f.nc.Opts.InboxPrefix; p != "" {
		return p + "."
	}
	return nats.InboxPrefix
}

func nextID() string { return nuid.Next() }

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
