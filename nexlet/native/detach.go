package native

import (
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/protocol"
)

// A detaching nexlet (Detach: nexd hands its workloads to a new nexlet) still reaps
// the workload processes that end until it exits, and it alone then knows their exit
// statuses: the next nexlet finds them gone, with no exit record from nexd, and would
// report a job "lost". So an end of its own that was being handled when the detach came
// is finished first (track, Detach waits), one reaped before it that no supervisor
// counted yet is recorded by Detach (recordUnhandledEnds), and one reaped at or after
// it is recorded for the next nexlet (detachedExit), exactly once (proc.claimed). A
// stop under way is not waited for: it may take its grace, and the supervisor kills a
// nexlet slower than its own. It claims its end once the process exited (stopped), so
// that the detach records the end only when the stop did not, and never after the stop
// removed the record.

// track counts an end under way, which Detach waits for; false once the nexlet has
// detached (none is counted after that).
func (n *Nexlet) track() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	select {
	case <-n.abandon:
		return false
	default:
		n.ending.Add(1)
		return true
	}
}

// detached says whether the nexlet let go of its workloads.
func (n *Nexlet) detached() bool {
	select {
	case <-n.abandon:
		return true
	default:
		return false
	}
}

// recordUnhandledEnds records, once the nexlet detached and the ends it counted are
// done, the ends reaped before the detach that no supervisor counted (track) yet: one
// that had not run since its workload's process was reaped would never record it, and
// the next nexlet would report a job "lost" (TestEndBeforeDetachRecorded). Those
// reaped after the detach are recorded by reaped.
func (n *Nexlet) recordUnhandledEnds() {
	type run struct {
		w *workload
		p *proc
	}
	n.mu.Lock()
	runs := make([]run, 0, len(n.workloads))
	for _, w := range n.workloads {
		if w.cur != nil {
			runs = append(runs, run{w, w.cur})
		}
	}
	n.mu.Unlock()
	for _, r := range runs {
		if exitedNow(r.p) && r.p.claimed.CompareAndSwap(false, true) {
			n.detachedExit(r.w, r.p)
		}
	}
}

// reaped runs once w's process p was reaped (its status in p): after a detach, nobody
// supervises it any more, so its end is recorded here.
func (n *Nexlet) reaped(w *workload, p *proc) {
	select {
	case <-n.abandon:
	default:
		return
	}
	if p.claimed.CompareAndSwap(false, true) {
		n.detachedExit(w, p)
	}
}

// detachedExit records the end of w's process p, reaped by this detached nexlet, for
// the next nexlet, which honours w's restart policy as this one would have: a restart
// the policy and its budget allow is left due (detachedRestart); any other end is
// recorded as its tombstone, reported with its exit code and never run again. A process
// found ended on replay needs nothing (its end is recorded already).
func (n *Nexlet) detachedExit(w *workload, p *proc) {
	if p.final {
		return
	}
	if n.beforeDetachedRecord != nil {
		n.beforeDetachedRecord(w.id)
	}
	reason := p.reason
	if p.code == 0 && reason == "" {
		reason = "exited"
	}
	n.mu.Lock()
	stopping := w.state == protocol.WorkloadStopping || w.state == protocol.WorkloadStopped // a stop's end is never restarted
	next, due := w.nextRestartLocked(p)
	n.mu.Unlock()
	if w.restartsAfter(p) && !stopping {
		if due {
			n.detachedRestart(w, p, restartDue{restarts: next, last: procid.Exit{Code: p.code, Reason: p.reason}, end: time.Now(), backoff: w.plan.backoff})
			n.dropExitAhead(p)
			return
		}
		reason = w.exhaustedReason(reason)
	}
	n.recordDetachedEnd(w, p.code, reason)
	n.dropExitAhead(p)
}

// recordDetachedEnd records, as its tombstone, the end of w that this detached nexlet
// knows: the next nexlet reports it with its exit code and never runs it again.
func (n *Nexlet) recordDetachedEnd(w *workload, code int, reason string) {
	n.log.Info("workload process ended after the nexlet detached; recorded for the next nexlet", "workload_id", w.id, "code", code, "reason", reason)
	n.writeTombstone(w.id, code, reason)
}

// detachedRestart records that w, whose process p ended, is due to run again by its
// restart policy as its restart number restarts: the next nexlet starts it then
// (endedMeanwhile), a job included. Before, a job waiting out its backoff at a detach
// was reported with its exit code and never restarted, and a service's restarts began
// afresh (TestRestartDueAtDetach).
func (n *Nexlet) detachedRestart(w *workload, p *proc, d restartDue) {
	n.log.Info("workload due to restart when the nexlet detached; left for the next nexlet", "workload_id", w.id,
		"restarts", d.restarts, "code", p.code, "reason", p.reason)
	n.writeRestartDue(w.id, d)
}

// exitedNow says whether p has exited, without waiting.
func exitedNow(p *proc) bool {
	select {
	case <-p.exited:
		return true
	default:
		return false
	}
}
