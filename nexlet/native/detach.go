package native

// A detaching nexlet (Detach: nexd hands its workloads to a new nexlet) still reaps
// the workload processes that end until it exits, and it alone then knows their exit
// statuses: the next nexlet finds them gone, with no exit record from nexd, and would
// report a job "lost". So an end of its own that was being handled when the detach came
// is finished first (track, Detach waits), and one reaped at or after it is recorded
// for the next nexlet (detachedExit), exactly once (proc.claimed). A stop under way is
// not waited for: it may take its grace, and the supervisor kills a nexlet slower than
// its own.

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
	reason := p.reason
	if p.code == 0 && reason == "" {
		reason = "exited"
	}
	if w.restartsAfter(p) {
		n.mu.Lock()
		next, due := w.nextRestartLocked(p)
		n.mu.Unlock()
		if due {
			n.detachedRestart(w, p, next)
			return
		}
		reason = w.exhaustedReason(reason)
	}
	n.log.Info("workload process ended after the nexlet detached; recorded for the next nexlet", "workload_id", w.id, "code", p.code, "reason", reason)
	n.writeTombstone(w.id, p.code, reason)
}

// detachedRestart records that w, whose process p ended, is due to run again by its
// restart policy as its restart number restarts: the next nexlet starts it then
// (endedMeanwhile), a job included. Before, a job waiting out its backoff at a detach
// was reported with its exit code and never restarted, and a service's restarts began
// afresh (TestRestartDueAtDetach).
func (n *Nexlet) detachedRestart(w *workload, p *proc, restarts int) {
	n.log.Info("workload due to restart when the nexlet detached; left for the next nexlet", "workload_id", w.id,
		"restarts", restarts, "code", p.code, "reason", p.reason)
	n.writeRestartDue(w.id, restarts, p.code, p.reason)
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
