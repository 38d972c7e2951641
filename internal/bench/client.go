package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// ReadySubjectPrefix is where the NATS workload announces itself: <prefix>.<workload id>.
const ReadySubjectPrefix = "nexbench.ready"

// readyLine is what the shell workload prints on stdout to announce itself; nexbench
// sees it on the workload's $NEX log feed.
const readyLine = "nexbench-ready"

// client speaks the $NEX protocol to whatever nodes listen on its connection.
type client struct {
	nc      *nats.Conn
	ns      string
	tracker *tracker
	subs    []*nats.Subscription
}

func dial(url, name string) (*nats.Conn, error) {
	nc, err := nats.Connect(url, nats.Name(name), nats.Timeout(5*time.Second), nats.MaxReconnects(-1))
	if err != nil {
		return nil, fmt.Errorf("connect to NATS at %s: %w", url, err)
	}
	return nc, nil
}

// newClient connects and starts tracking workload announcements in ns.
func newClient(url, ns string) (*client, error) {
	nc, err := dial(url, "nexbench")
	if err != nil {
		return nil, err
	}
	c := &client{nc: nc, ns: ns, tracker: newTracker()}
	s1, err := nc.Subscribe(ReadySubjectPrefix+".>", func(m *nats.Msg) {
		c.tracker.announce(strings.TrimPrefix(m.Subject, ReadySubjectPrefix+"."))
	})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("subscribe to announcements: %w", err)
	}
	s2, err := nc.Subscribe(protocol.LogsWildcard(ns, "*"), func(m *nats.Msg) {
		// Upstream's native nexlet publishes each write of the pipe as it came,
		// newline included; nexd's publishes lines.
		if isReadyLog(m.Data) {
			c.tracker.announce(protocol.Token(m.Subject, 4))
		}
	})
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("subscribe to log feeds: %w", err)
	}
	for _, s := range []*nats.Subscription{s1, s2} {
		_ = s.SetPendingLimits(-1, -1)
	}
	c.subs = []*nats.Subscription{s1, s2}
	if err := nc.Flush(); err != nil {
		nc.Close()
		return nil, fmt.Errorf("flush subscriptions: %w", err)
	}
	return c, nil
}

func (c *client) Close() { c.nc.Close() }

// isReadyLog reports whether a log feed message carries the shell workload's ready line.
func isReadyLog(data []byte) bool {
	for line := range strings.SplitSeq(string(data), "\n") {
		if strings.TrimSpace(line) == readyLine {
			return true
		}
	}
	return false
}

// tracker records when each workload id first announced itself and how often.
type tracker struct {
	mu sync.Mutex
	m  map[string]*announcement
}

type announcement struct {
	first time.Time
	count int
	ch    chan struct{}
}

func newTracker() *tracker { return &tracker{m: map[string]*announcement{}} }

func (t *tracker) entry(id string) *announcement {
	a := t.m[id]
	if a == nil {
		a = &announcement{ch: make(chan struct{})}
		t.m[id] = a
	}
	return a
}

func (t *tracker) announce(id string) {
	now := time.Now()
	t.mu.Lock()
	defer t.mu.Unlock()
	a := t.entry(id)
	a.count++
	if a.count == 1 {
		a.first = now
		close(a.ch)
	}
}

// wait returns when id first announced itself.
func (t *tracker) wait(ctx context.Context, id string) (time.Time, error) {
	return t.waitEither(ctx, id, id)
}

// waitEither returns when the workload announced itself under its id or under the tag
// the tool gave it (upstream's nexlet does not tell a workload its id).
func (t *tracker) waitEither(ctx context.Context, id, tag string) (time.Time, error) {
	t.mu.Lock()
	a, b := t.entry(id), t.entry(tag)
	t.mu.Unlock()
	select {
	case <-a.ch:
		return a.first, nil
	case <-b.ch:
		return b.first, nil
	case <-ctx.Done():
		return time.Time{}, fmt.Errorf("workload %s (%s) never announced itself: %w", id, tag, ctx.Err())
	}
}

// reset forgets every announcement (recovery counts them afresh).
func (t *tracker) reset() {
	t.mu.Lock()
	t.m = map[string]*announcement{}
	t.mu.Unlock()
}

// counts returns announcements per id.
func (t *tracker) counts() map[string]int {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make(map[string]int, len(t.m))
	for id, a := range t.m {
		if a.count > 0 {
			out[id] = a.count
		}
	}
	return out
}

// gatherOpts ends a scatter-gather: after first without a reply, stall after the latest
// reply, or as soon as max replies are in (0: no early end).
type gatherOpts struct {
	first, stall time.Duration
	max          int
}

// gather is scatter.Gather on the tool's connection.
func (c *client) gather(ctx context.Context, subject string, data []byte, o gatherOpts) ([]*nats.Msg, error) {
	return scatter.Gather(ctx, c.nc, subject, data, scatter.Options{First: o.first, Stall: o.stall, Max: o.max})
}

// replyErr returns the micro error a node replied with, if any.
func replyErr(m *nats.Msg) error {
	if m.Header == nil || m.Header.Get(protocol.HeaderErrorCode) == "" {
		return nil
	}
	msg := m.Header.Get(protocol.HeaderError)
	var body protocol.ErrorBody
	if json.Unmarshal(m.Data, &body) == nil && body.Error != "" {
		msg = body.Error
	}
	code, _ := strconv.Atoi(m.Header.Get(protocol.HeaderErrorCode))
	return fmt.Errorf("node error %d: %s", code, msg)
}

// running lists the ids of the workloads node's nexlets report running.
func (c *client) running(ctx context.Context, nodeID string) (map[string]bool, error) {
	req, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: protocol.SystemNamespace})
	msgs, err := c.gather(ctx, protocol.QueryWorkloadsSubject(nodeID), req, gatherOpts{first: 5 * time.Second, stall: 50 * time.Millisecond})
	if err != nil {
		return nil, err
	}
	out := map[string]bool{}
	for _, m := range msgs {
		var ws []protocol.WorkloadSummary
		if replyErr(m) != nil || json.Unmarshal(m.Data, &ws) != nil {
			continue
		}
		for _, w := range ws {
			if w.WorkloadState == protocol.WorkloadRunning {
				out[w.ID] = true
			}
		}
	}
	return out, nil
}

// ping lists the nodes answering a system ping.
func (c *client) ping(ctx context.Context, o gatherOpts) ([]protocol.NodePingResponse, error) {
	msgs, err := c.gather(ctx, protocol.PingSubject(), []byte(`{"filter":{}}`), o)
	if err != nil {
		return nil, err
	}
	var out []protocol.NodePingResponse
	for _, m := range msgs {
		var r protocol.NodePingResponse
		if replyErr(m) == nil && json.Unmarshal(m.Data, &r) == nil {
			out = append(out, r)
		}
	}
	return out, nil
}

// auction collects native bids.
func (c *client) auction(ctx context.Context, o gatherOpts) ([]protocol.AuctionResponse, error) {
	data, _ := json.Marshal(protocol.AuctionRequest{AgentType: "native", AuctionID: nuid.Next(), Tags: map[string]string{}})
	msgs, err := c.gather(ctx, protocol.AuctionSubject(c.ns), data, o)
	if err != nil {
		return nil, fmt.Errorf("auction: %w", err)
	}
	var bids []protocol.AuctionResponse
	var errs []error
	for _, m := range msgs {
		if err := replyErr(m); err != nil {
			errs = append(errs, err)
			continue
		}
		var b protocol.AuctionResponse
		if err := json.Unmarshal(m.Data, &b); err != nil {
			errs = append(errs, err)
			continue
		}
		bids = append(bids, b)
	}
	if len(bids) == 0 {
		return nil, fmt.Errorf("auction: no bids (%w)", errors.Join(errs...))
	}
	return bids, nil
}

// leastLoaded picks the bid with the fewest workloads (nexd's extension; upstream bids
// all read 0, so the first bid wins there).
func leastLoaded(bids []protocol.AuctionResponse) protocol.AuctionResponse {
	best := bids[0]
	for _, b := range bids[1:] {
		if b.WorkloadCount < best.WorkloadCount {
			best = b
		}
	}
	return best
}

// deploy sends a start request to the holder of bidderID and returns the workload id.
func (c *client) deploy(ctx context.Context, bidderID string, req protocol.StartWorkloadRequest) (string, error) {
	data, _ := json.Marshal(req)
	m, err := c.nc.RequestWithContext(ctx, protocol.DeploySubject(c.ns, bidderID), data)
	if err != nil {
		return "", fmt.Errorf("deploy: %w", err)
	}
	if err := replyErr(m); err != nil {
		return "", fmt.Errorf("deploy: %w", err)
	}
	var r protocol.StartWorkloadResponse
	if err := json.Unmarshal(m.Data, &r); err != nil {
		return "", fmt.Errorf("deploy reply: %w", err)
	}
	if r.ID == "" {
		return "", fmt.Errorf("deploy reply without a workload id: %s", m.Data)
	}
	return r.ID, nil
}

// undeploy stops id; nodes that do not hold it answer not found, which the first
// stopped:true answer outranks. With expect 1 it ends at the first reply.
func (c *client) undeploy(ctx context.Context, id string, o gatherOpts) error {
	data, _ := json.Marshal(protocol.StopWorkloadRequest{Namespace: c.ns})
	msgs, err := c.gather(ctx, protocol.UndeploySubject(c.ns, id), data, o)
	if err != nil {
		return fmt.Errorf("undeploy %s: %w", id, err)
	}
	for _, m := range msgs {
		var r protocol.StopWorkloadResponse
		if replyErr(m) == nil && json.Unmarshal(m.Data, &r) == nil && r.Stopped {
			return nil
		}
	}
	return fmt.Errorf("undeploy %s: no node stopped it (%d replies)", id, len(msgs))
}

// workloadSpec is the run_request the tool deploys.
type workloadSpec struct {
	Kind string // "sh": /bin/sh prints the ready line; "nats": the tool itself publishes
	Self string // absolute path of the nexbench binary (kind nats)
}

func (w workloadSpec) request(ns, name string) protocol.StartWorkloadRequest {
	var rr map[string]any
	switch w.Kind {
	case "nats":
		// The tag is the workload's name: nexd tells the workload its id, upstream
		// does not, so the workload announces itself under the tag there.
		rr = map[string]any{"uri": "file://" + w.Self, "argv": []string{"workload"},
			"environment": map[string]string{workloadTagEnv: name}}
	default:
		rr = map[string]any{"uri": "file:///bin/sh", "argv": []string{"-c", "echo " + readyLine + "; exec sleep 86400"}}
	}
	b, _ := json.Marshal(rr)
	return protocol.StartWorkloadRequest{
		Name: name, Namespace: ns, RunRequest: string(b), Tags: map[string]string{},
		WorkloadLifecycle: protocol.LifecycleService, WorkloadType: "native",
		Description: "nexbench workload",
	}
}

// phases of one placement.
type placement struct {
	ID                     string
	At                     time.Time // the auction's start
	Auction, Deploy, Start time.Duration
	Total                  time.Duration
	Bids                   int
}

// place runs auction, deploy and the wait for the process's announcement.
func (c *client) place(ctx context.Context, ao gatherOpts, w workloadSpec, name string, deployTimeout time.Duration) (placement, error) {
	var p placement
	t0 := time.Now()
	p.At = t0
	bids, err := c.auction(ctx, ao)
	if err != nil {
		return p, err
	}
	t1 := time.Now()
	p.Auction, p.Bids = t1.Sub(t0), len(bids)
	bid := leastLoaded(bids)
	dctx, cancel := context.WithTimeout(ctx, deployTimeout)
	defer cancel()
	// A run may deploy the same name twice; the suffix keeps the tag unique.
	name = name + "-" + strings.ToLower(nuid.Next()[16:])
	id, err := c.deploy(dctx, bid.BidderID, w.request(c.ns, name))
	if err != nil {
		return p, err
	}
	t2 := time.Now()
	p.ID, p.Deploy = id, t2.Sub(t1)
	ready, err := c.tracker.waitEither(dctx, id, name)
	if err != nil {
		return p, err
	}
	// The process may announce itself before the deploy reply arrives.
	if ready.After(t2) {
		p.Start = ready.Sub(t2)
	}
	end := t2
	if ready.After(end) {
		end = ready
	}
	p.Total = end.Sub(t0)
	return p, nil
}
