package node

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/protocol"
)

// errStateUnread: node state has not been read since nexd started, so the namespace
// of a workload no nexlet has registered again with is unknown.
var errStateUnread = errors.New("node state not read since nexd started")

// recordedNS is what node state said, when the node read it, about the namespace of
// each workload it held: known from the node's start, before any nexlet registers
// again and is handed its workloads to replay (which is when n.owned learns them).
// Without it, a stop right after a restart from another namespace reached a nexlet
// that answers such a stop as a no-op done, and the node removed the other tenant's
// record (TestAttackTenantStopsAnothersWorkloadRightAfterRestart).
type recordedNS struct {
	mu      sync.Mutex
	read    bool              // node state was read
	ns      map[string]string // workload id -> namespace
	loading chan struct{}     // closed when the read under way ends; nil: none
	err     error             // the last read's
	// gone: the ids forgotten while a read is under way, which that read's outcome
	// (listed before they went) must not bring back.
	gone map[string]bool
}

// loadRecorded reads node state once (a read that failed is tried again by the next
// call). A call while a read is under way (the one begun at the start, or a stop's)
// waits for that read's outcome instead of reading again, so stops sent while node
// state is out of reach do not queue one read each. Ids are unique, so an entry of a
// workload removed since still names its namespace; forgetStored drops them as
// workloads end.
func (n *Node) loadRecorded(ctx context.Context) error {
	r := &n.recorded
	r.mu.Lock()
	if r.read {
		r.mu.Unlock()
		return nil
	}
	if ch := r.loading; ch != nil {
		r.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("%w: %w", errStateUnread, ctx.Err())
		}
		r.mu.Lock()
		defer r.mu.Unlock()
		if r.read {
			return nil
		}
		return r.err
	}
	ch := make(chan struct{})
	r.loading, r.gone = ch, map[string]bool{}
	r.mu.Unlock()
	return n.readRecorded(ctx, ch)
}

// beginRecordedRead announces the start's read of node state (Start calls it before
// it serves, so that every stop, list and removal from then on waits for the read's
// outcome rather than missing it); readRecorded(ch) does it, on a goroutine of the
// node's once it is built. ch is nil when node state was read already or a read is
// under way.
func (n *Node) beginRecordedRead() chan struct{} {
	r := &n.recorded
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.read || r.loading != nil {
		return nil
	}
	ch := make(chan struct{})
	r.loading, r.gone = ch, map[string]bool{}
	return ch
}

// readRecorded reads node state for the read that r.loading == ch announced, and ends
// it: its waiters see its outcome.
func (n *Node) readRecorded(ctx context.Context, ch chan struct{}) error {
	all, err := n.o.Store.All(ctx)
	return n.readRecordedEnded(ch, all, err)
}

// readRecordedEnded ends the read r.loading == ch with its outcome.
func (n *Node) readRecordedEnded(ch chan struct{}, all map[string]protocol.StartWorkloadRequest, err error) error {
	r := &n.recorded
	r.mu.Lock()
	defer r.mu.Unlock()
	gone := r.gone
	r.loading, r.gone = nil, nil
	defer close(ch)
	if err != nil {
		r.err = fmt.Errorf("%w: %w", errStateUnread, err)
		return r.err
	}
	for key, req := range all {
		if _, id, ok := state.SplitKey(key); ok && state.CheckRecord(key, req) == nil && !gone[id] {
			r.ns[id] = req.Namespace
		}
	}
	r.read = true
	return nil
}

// awaitRecorded waits, for at most bound, for a read of node state under way to end
// (starting none), and returns how long it waited. For what may use what node state
// said but does not need it to act: a list's rows, a removal's tombstone.
func (n *Node) awaitRecorded(ctx context.Context, bound time.Duration) time.Duration {
	n.recorded.mu.Lock()
	ch := n.recorded.loading
	n.recorded.mu.Unlock()
	if ch == nil {
		return 0
	}
	start := time.Now()
	timer := time.NewTimer(bound)
	defer timer.Stop()
	select {
	case <-ch:
	case <-ctx.Done():
	case <-timer.C:
	}
	return time.Since(start)
}

// recordedNamespace is the namespace node state recorded for workload id, "" when it
// holds none, reading node state first if that has not been done (bounded by the
// fan-out timeout); errStateUnread when it cannot be read.
func (n *Node) recordedNamespace(ctx context.Context, id string) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, n.o.FanoutTimeout)
	defer cancel()
	if err := n.loadRecorded(ctx); err != nil {
		return "", err
	}
	return n.recordedLookup(id), nil
}

// recordedLookup is what the last read of node state said of id's namespace ("":
// nothing, or not read).
func (n *Node) recordedLookup(id string) string {
	n.recorded.mu.Lock()
	defer n.recorded.mu.Unlock()
	return n.recorded.ns[id]
}

// forgetRecorded drops id's entry: the workload left node state.
func (n *Node) forgetRecorded(id string) {
	n.recorded.mu.Lock()
	delete(n.recorded.ns, id)
	if n.recorded.gone != nil {
		n.recorded.gone[id] = true
	}
	n.recorded.mu.Unlock()
}
