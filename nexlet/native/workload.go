package native

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/internal/steps"
	"github.com/nexd-project/nexd/internal/stopmemo"
	"github.com/nexd-project/nexd/internal/testhold"
	"github.com/nexd-project/nexd/internal/wallclock"
	"github.com/nexd-project/nexd/protocol"
)

// workload is one workload the nexlet holds. Fields below the marker are guarded by
// Nexlet.mu.
type workload struct {
	id, ns, name string
	req          protocol.AgentStartWorkloadRequest // as deployed: an encrypted env stays sealed
	plan         *plan
	argv         []string
	dir          string // root-owned: pid, uid, creds, artifact, home/
	exe          string
	want         ident // the user asked for (dynamic, or named), before leasing
	sb           sandbox
	stop         chan stopRequest // a stop request with its grace
	done         chan struct{}    // closed once the workload is gone
	output       outputLimit      // its stdout and stderr lines per second
	ready        *readyRecord     // its record directory, made ahead, for its first launch
	steps        *steps.Timer     // its start's steps (debug logging only)
	// replayDue: the restart a replay owes it (endedMeanwhile), for begin to make
	// once the rest of its backoff is over.
	replayDue *restartDue
	// emptied: its last end found its sandbox empty (terminate, supervise), so the removal
	// of what it left behind need not list the sandbox's processes again: nothing
	// joins an emptied group. Set and read by its supervisor and then its tidy.
	emptied bool
	// killBy: the deadline of the kill of its current end (killAndWait), zero once
	// its sandbox was seen empty or a run launched: a stop's kill, the grace's wait
	// for the main process and the tidy's kill share one wait, not one each
	// (TestStopPastKillDeadlineWaitsOnce). Owned as emptied.
	killBy time.Time

	// guarded by Nexlet.mu
	ident    ident // who it runs as, once begun
	state    protocol.WorkloadState
	started  time.Time
	pid      int
	restarts int
	sha256   string
	exitCode *int
	reason   string
	finished bool // ended on its own; kept for QueryWorkloads until stopped or pruned
	// endConfirmed: a node acknowledged its end with it out of node state
	// (EndConfirmed): pruned, its record may go too.
	endConfirmed bool
	ended        time.Time
	cur          *proc                       // its current run's process, set before anything can reap it (Detach)
	env          []string                    // replaced when credentials are renewed
	creds        protocol.NatsConnectionData // the newest credentials
	// renewTimer renews creds; renewStopped is set once the workload ended.
	renewTimer   *wallclock.Timer
	renewStopped bool
	// stopMarked: a stop of it is recorded (markStopping); marked, made by a stop
	// waiting for that (stopAndWait), is closed then.
	stopMarked bool
	marked     chan struct{}
	// keptStop: a stop at nexd's shutdown (nexd_keep) was asked for; a replay that
	// finds it stopping waits for its end and starts it again.
	keptStop bool
}

// FinishedRetention is how long a workload that ended on its own stays listed (with its
// exit code) unless it is stopped first; at most MaxFinished are kept.
const (
	FinishedRetention = time.Hour
	MaxFinished       = 256
)

// pruneLocked forgets finished workloads past their retention, oldest first.
func (n *Nexlet) pruneLocked() {
	var fin []*workload
	retention := FinishedRetention
	if testhold.Holds(n.cfg.TestHold, testhold.FinishedShort) {
		retention = testhold.FinishedShortBy
	}
	for _, w := range n.workloads {
		if !w.finished {
			continue
		}
		if time.Since(w.ended) > retention {
			n.forgetFinishedLocked(w)
			continue
		}
		fin = append(fin, w)
	}
	if len(fin) > MaxFinished {
		slices.SortFunc(fin, func(a, b *workload) int { return a.ended.Compare(b.ended) })
		for _, w := range fin[:len(fin)-MaxFinished] {
			n.forgetFinishedLocked(w)
		}
	}
	n.boundEndsKeptLocked()
}

// forgetFinishedLocked takes a finished workload out of the table. Its record (its
// end's tombstone) goes too once a node confirmed its end out of node state; else it
// stays, so the workload is still held (HeldWorkloads): a node that still has it
// replays it, and the replay reports its end again (endedMeanwhile), which removes
// it there; a node that does not have it does not replay it, and ReplayDone removes
// the record. Before, the record went too, and a job whose record the node kept
// unmarked (its nexd killed between this nexlet's answer and the start's mark, and a
// next nexd only after the prune) was taken for one whose start never reached the
// nexlet, and ran again (e2e TestForgottenJobNotRunAgain).
func (n *Nexlet) forgetFinishedLocked(w *workload) {
	delete(n.workloads, w.id)
	if w.endConfirmed {
		n.removeRecord(w.id)
		return
	}
	if n.endsKept == nil {
		n.endsKept = map[string]time.Time{}
	}
	n.endsKept[w.id] = w.ended
}

// maxEndsKept bounds the records of forgotten finished workloads whose end no node
// confirmed (forgetFinishedLocked); past it the oldest go and the memory of starts is
// dropped (it no longer holds every start it took). Each is a small directory in the
// runtime directory; they gather only while no node confirms ends (nexd away), and
// from jobs that end before their deploy kept them, which the next registration
// clears.
const maxEndsKept = 4 * MaxFinished

// boundEndsKeptLocked keeps endsKept (and the records it names) within maxEndsKept.
func (n *Nexlet) boundEndsKeptLocked() {
	if len(n.endsKept) <= maxEndsKept {
		return
	}
	for id := range n.endsKept {
		// Gone (a registration that did not replay it removed it) or held again (a
		// replay brought it back): no longer kept here.
		if _, held := n.workloads[id]; held {
			delete(n.endsKept, id)
		} else if _, err := os.Stat(n.recordDir(id)); err != nil {
			delete(n.endsKept, id)
		}
	}
	if len(n.endsKept) <= maxEndsKept {
		return
	}
	ids := slices.SortedFunc(maps.Keys(n.endsKept), func(a, b string) int { return n.endsKept[a].Compare(n.endsKept[b]) })
	n.dropMemoryLocked() // before a record goes
	for _, id := range ids[:len(ids)-maxEndsKept] {
		delete(n.endsKept, id)
		n.removeRecord(id)
	}
	n.log.Warn("too many ended workloads whose end no node confirmed: the oldest records dropped, and with them the memory of starts (a job whose start nexd never saw answered is not started again)",
		"kept", maxEndsKept)
}

// EndConfirmed implements nexlet.EndConfirmer.
func (n *Nexlet) EndConfirmed(id string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if w := n.workloads[id]; w != nil {
		w.endConfirmed = true
	}
}

// stopRequest asks a workload's supervisor to stop it within grace; steps times the
// stop when the nexlet logs at debug level (nil otherwise).
type stopRequest struct {
	grace time.Duration
	steps *steps.Timer
	// answered, when not nil, is closed once the stopper has its answer: the removal
	// of what the workload left behind waits for it (see finish).
	answered chan struct{}
	// record: a stop the node asked for, recorded before its signal (markStopping);
	// not one at the node's shutdown, which keeps the workload to start it again.
	record bool
	// recorded, when not nil, is called once the stop is recorded (record), before its
	// signal: the node's "stopping" to a client that does not wait rests on it.
	recorded func()
}

// markRecorded records the stop r asks for (when it is one to record) and says so, to
// r and to the other stops that wait for it (stopAndWait).
func (n *Nexlet) markRecorded(w *workload, r stopRequest) {
	if !r.record || n.markStopping(w, r.grace) != nil {
		return
	}
	n.mu.Lock()
	w.stopMarked = true
	if w.marked != nil {
		close(w.marked)
		w.marked = nil
	}
	n.mu.Unlock()
	if r.recorded != nil {
		r.recorded()
	}
}

// proc is one run of a workload's main process.
type proc struct {
	pid int
	// self is the main process's identity (zero: unknown), by which a stop signals it:
	// its pid may name a stranger once it ended (see terminate).
	self    procid.ID
	started time.Time
	exited  chan struct{}
	code    int    // valid after exited
	reason  string // valid after exited
	// final: the workload ended while no nexlet watched it (found on replay); it is
	// reported, never restarted.
	final bool
	// claimed: the exit is being handled, by supervise or (after a detach) by
	// detachedExit: exactly one of them records it.
	claimed atomic.Bool
	// rec is the process's identity (zero: unknown); ahead says its exit was recorded
	// ahead of its reap (recordExitAhead), a record that goes once the end's own is
	// written (dropExitAhead). ahead is set before exited is closed.
	rec   procid.ID
	ahead bool
	// due: a replayed restart whose backoff is not over yet (begin): p stands for the
	// run it follows, and its supervisor makes the restart once the rest is waited.
	due *restartDue
	// outs are its output streams' tokens in the watcher (launch; zero: none), for the
	// start's readNow right after its reply (StartReplied).
	outs [2]uint64
}

// ended is a proc for a workload found finished on replay.
func ended(code int, reason string) *proc {
	p := &proc{started: time.Now(), exited: make(chan struct{}), code: code, reason: reason, final: true}
	close(p.exited)
	return p
}

// limitsOf is w's limits with the nexlet's defaults filled in.
func (n *Nexlet) limitsOf(w *workload) Limits {
	limits := w.plan.limits
	if limits.MemoryMax == 0 {
		limits.MemoryMax = n.cfg.DefaultLimits.MemoryMax
	}
	if limits.PidsMax == 0 {
		limits.PidsMax = n.cfg.DefaultLimits.PidsMax
	}
	return limits
}

// begin prepares the sandbox and either adopts a live workload (replay) or launches it.
func (n *Nexlet) begin(w *workload, existing bool, report func(protocol.Progress)) (*proc, bool, error) {
	limits := n.limitsOf(w)
	mk := n.iso.sandbox
	if !existing {
		mk = n.iso.fresh // from the fork pool: no cgroup migration on the deploy path
	}
	sb, err := mk(w.id, limits)
	if err != nil {
		return nil, false, fmt.Errorf("workload %s: sandbox: %w", w.id, err)
	}
	if existing && (n.bindForkedRelaunch(w, sb) || n.bindForkedLaunch(w, sb)) && n.iso.mode() == "none" {
		if sb, err = mk(w.id, limits); err != nil { // a process group, found by the pid record now
			return nil, false, fmt.Errorf("workload %s: sandbox: %w", w.id, err)
		}
	}
	w.sb = sb
	w.steps.Step("sandbox")
	if n.iso.mode() == "none" && w.plan.limits != (Limits{}) {
		n.log.Warn("limits requested but not enforced without cgroups", "workload_id", w.id)
	}
	w.exe = w.plan.art.path
	if w.plan.art.scheme == "nats" {
		// A live workload's artifact is in the store, named by its link (a regular file
		// there is one fetched by a nexlet from before the store).
		w.exe = filepath.Join(w.dir, artifactLink)
		if t, err := os.Readlink(w.exe); err == nil {
			w.exe = t
		}
	}
	prev, known := readIdent(w.dir)
	if existing {
		procs, err := sb.procs()
		if _, due := n.readRestartDue(w.id); due && err == nil && len(procs) > 0 {
			// A restart is due after the run the pid record names, so that run ended:
			// what is left in its sandbox are its leftovers, which its nexlet died
			// before killing. They go below, before the restart (adopted, they held
			// the restart off until they all ended, a daemonized one for ever:
			// TestLeftoversDoNotHoldOffADueRestart).
			n.log.Info("replayed workload's restart is due; its ended run's leftover processes are killed first", "workload_id", w.id, "procs", len(procs))
			procs = nil
		}
		if err == nil && len(procs) > 0 {
			if !known {
				// Started before workloads had users of their own: it keeps the
				// nexlet's, also across restarts.
				prev = n.users.self
			}
			if prev.dynamic {
				if err := n.users.hold(prev.uid, w.dir); err != nil {
					n.log.Warn("adopted workload: uid lease not renewed", "workload_id", w.id, "uid", prev.uid, "err", err)
				}
			}
			n.mu.Lock()
			w.ident = prev
			n.mu.Unlock()
			// The replay brought fresh credentials: the live workload gets them at
			// its next reconnect.
			if err := writeCredsFile(n.credsPath(w.id), w.req.WorkloadCreds, prev); err != nil {
				n.log.Warn("adopted workload: credentials file not rewritten", "workload_id", w.id, "err", err)
			}
			if err := sb.readopt(); err != nil {
				n.log.Warn("adopted workload: limits not applied again", "workload_id", w.id, "err", err)
			}
			// Its restarts go on counting against its budget (before, they started
			// from zero: TestRestartCountSurvivesNexletKill).
			used := n.readRestarts(w.id)
			n.mu.Lock()
			w.restarts = used
			n.mu.Unlock()
			return n.adopt(w, procs), true, nil
		}
		if p := n.endedMeanwhile(w); p != nil {
			if known {
				n.mu.Lock()
				w.ident = prev // released when the end is recorded
				n.mu.Unlock()
			}
			return p, true, nil
		}
	}
	n.mu.Lock()
	restarting := w.restarts > 0 // a restart endedMeanwhile found due (its record says so)
	n.mu.Unlock()
	if !restarting {
		n.removeRecord(w.id) // a fresh start: no old record may describe it
	}
	// A replayed restart keeps its records (the pid record of the run it follows and
	// the due restart) until its launch writes the new run's, as a restart in one
	// nexlet does: a nexlet killed before that launch leaves the next one the same
	// restart due and its record held (before, the records went first: the next nexlet
	// found nothing, and nexd dropped a job it no longer held, its restart never made;
	// TestKillInReplayedRestartBeforeLaunch).
	// Never two copies: whatever is left in the sandbox goes before a fresh start (a
	// new fork pool group holds nothing).
	if !sb.empty() {
		n.killAndWait(w)
	}
	// Its previous uid's processes are killed only while the uid is still leased to its
	// directory (retire): a directory a nexlet killed mid-tidy left names a uid whose
	// lease went stale, which another workload may hold by now, and a kill by uid
	// killed that workload's processes (TestReplayKillsNoOtherWorkloadsUID).
	if prev.dynamic && !n.users.retire(prev.uid, w.dir) {
		n.log.Info("the workload's previous uid is not leased to it any more; nothing of it killed", "workload_id", w.id, "uid", prev.uid)
	} else if killed, err := n.users.releaseCounted([]ident{prev}); err != nil {
		n.log.Warn("previous uid of the workload not released", "workload_id", w.id, "killed", killed, "err", err)
	} else if killed > 0 {
		n.log.Info("killed processes left running as the workload's previous uid", "workload_id", w.id, "uid", prev.uid, "killed", killed)
	}
	fail := func(err error) (*proc, bool, error) {
		n.cleanup(w, nil, false)
		if restarting {
			n.removeRecord(w.id) // as a fresh start's failure leaves none
		}
		return nil, false, err
	}
	if err := os.RemoveAll(w.dir); err != nil {
		return fail(fmt.Errorf("workload %s: clear directory: %w", w.id, err))
	}
	id, made, err := n.users.acquire(w.want, w.dir)
	if err != nil {
		return fail(fmt.Errorf("workload %s: %w", w.id, err))
	}
	n.mu.Lock()
	w.ident = id
	n.mu.Unlock()
	if !made {
		if err := makeWorkloadDirs(w.dir, id); err != nil {
			return fail(fmt.Errorf("workload %s: %w", w.id, err))
		}
	}
	w.steps.Step("uid") // the lease, the directory
	if n.beforeLaunch != nil {
		n.beforeLaunch(w.id)
	}
	if err := writeCredsFile(n.credsPath(w.id), w.req.WorkloadCreds, id); err != nil {
		return fail(fmt.Errorf("workload %s: %w", w.id, err))
	}
	var sum string
	if w.plan.art.scheme == "nats" {
		// Into the store, not reachable by the workload's user by path: it gets the
		// file as an open descriptor (execArtifact), so no access check by path.
		// With the fetch user the node minted for it when there is one: the workload's
		// own has no JetStream grant then (see mint.artifactPermissions).
		fetchCreds := w.req.WorkloadCreds
		if w.req.ArtifactCreds != nil {
			fetchCreds = *w.req.ArtifactCreds
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		w.exe, sum, err = n.arts.fetchArtifact(ctx, fetchCreds, w.ns, w.plan.art, w.dir, n.cfg.ArtifactMax, report)
		cancel()
		if err != nil {
			return fail(fmt.Errorf("run_request: uri %q: %w", w.plan.req.URI, err))
		}
	} else if st, err := canRun(id, w.exe); err != nil {
		return fail(fmt.Errorf("run_request: uri %q: %w", w.plan.req.URI, err))
	} else {
		sum = n.digests.sumStat(w.exe, &st)
	}
	if wd := w.plan.req.Workdir; wd != "" {
		if err := canAccess(id, wd, 1); err != nil {
			return fail(fmt.Errorf("run_request: workdir %q: the workload's user cannot enter it: %w", wd, err))
		}
		if fi, err := os.Stat(wd); err != nil || !fi.IsDir() { // it may look: canAccess
			return fail(fmt.Errorf("run_request: workdir %q is not a directory", wd))
		}
	}
	if sum == "" {
		if sum, err = n.digests.sum(w.exe); err != nil {
			return fail(fmt.Errorf("run_request: uri %q: %w", w.plan.req.URI, err))
		}
	}
	n.mu.Lock()
	w.sha256 = sum
	n.mu.Unlock()
	w.steps.Step("files") // credentials file, artifact, access checks, digest
	if !restarting {
		w.ready = n.records.take(n.recordDir(w.id)) // removed above: free for the rename
	} else if d := w.replayDue; d != nil && d.left() > 0 {
		// The rest of its backoff first, measured from the recorded end: its
		// supervisor waits it out and makes the restart, as for an end it saw.
		// Before, a nexlet killed during a backoff had the next one restart at once
		// (TestNexletKillDuringRestartBackoff).
		n.mu.Lock()
		w.restarts = d.restarts - 1 // the end's handling counts it again
		n.mu.Unlock()
		p := &proc{started: time.Now(), exited: make(chan struct{}), code: d.last.Code, reason: d.last.Reason, due: d}
		close(p.exited)
		return p, true, nil
	}
	p, err := n.launch(w)
	if w.ready != nil { // launch failed before it took them
		w.ready.close()
		w.ready = nil
	}
	if err != nil {
		return fail(err)
	}
	return p, false, nil
}

// countWriter tells fn how many bytes went through it so far.
type countWriter struct {
	w  io.Writer
	n  int64
	fn func(int64)
}

func (c *countWriter) Write(p []byte) (int, error) {
	k, err := c.w.Write(p)
	c.n += int64(k)
	c.fn(c.n)
	return k, err
}

// digestCache remembers the SHA-256 of executables by path, device, inode, size and
// modification time, so a deploy of an unchanged binary does not hash it again (a
// 25 MB binary took 23-57 ms per start, most of the placement time).
type digestCache struct {
	mu   sync.Mutex
	sums map[digestKey]string
}

type digestKey struct {
	path       string
	dev, ino   uint64
	size, nsec int64
}

func (c *digestCache) sum(path string) (string, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return "", &os.PathError{Op: "stat", Path: path, Err: err}
	}
	return c.sumOf(path, &st)
}

// sumStat is sum for a path stat'ed just before (st): "" when the digest cannot be
// made, for sum to try again and say why.
func (c *digestCache) sumStat(path string, st *unix.Stat_t) string {
	sum, _ := c.sumOf(path, st)
	return sum
}

func (c *digestCache) sumOf(path string, st *unix.Stat_t) (string, error) {
	key := digestKey{path: path, dev: st.Dev, ino: st.Ino, size: st.Size,
		nsec: st.Mtim.Sec*1e9 + st.Mtim.Nsec}
	c.mu.Lock()
	sum, ok := c.sums[key]
	c.mu.Unlock()
	if ok {
		return sum, nil
	}
	sum, err := digest(path)
	if err != nil {
		return "", err
	}
	c.mu.Lock()
	if c.sums == nil || len(c.sums) > 4096 {
		c.sums = map[digestKey]string{}
	}
	c.sums[key] = sum
	c.mu.Unlock()
	return sum, nil
}

func digest(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("digest: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// launch starts the workload's main process in its sandbox.
func (n *Nexlet) launch(w *workload) (*proc, error) {
	cmd := exec.Command(w.exe, w.argv...)
	if w.plan.art.scheme == "nats" {
		f, err := execArtifact(cmd, w.exe, w.plan.art.object)
		if err != nil {
			return nil, fmt.Errorf("workload %s: artifact: %w", w.id, err)
		}
		defer f.Close()
	}
	n.mu.Lock()
	cmd.Env = w.env
	restarts := w.restarts
	id := w.ident
	n.mu.Unlock()
	if restarts > 0 {
		// Before the fork: a nexlet that dies once it ran leaves the next one the count
		// of what runs (a first launch has none: 0), and the bounds of the process
		// it forks, by which the next one finds that run when the nexlet died before
		// its pid record (bindForkedRelaunch): its cgroup, or its uid when dynamic
		// (the workload's alone).
		n.writeRestarts(w.id, restarts)
		n.writeLaunch(w.id, restarts, id)
		n.testHold(testhold.RelaunchRecorded, w.id)
	}
	cmd.Dir = filepath.Join(w.dir, homeDirName)
	if !id.same {
		// Setgroups to the named user's groups (none for dynamic users) and drop to
		// its uid: permitted and effective capabilities go with the uid change.
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: id.uid, Gid: id.gid, Groups: id.groups}}
	}
	if w.plan.req.Workdir != "" {
		cmd.Dir = w.plan.req.Workdir
	}
	// Own FIFOs (not io.Writers) so that Wait returns when the main process exits even
	// if a grandchild still holds them, and so that the output outlives this nexlet
	// (see record.go).
	ready := w.ready != nil // its record directory from the pool: pid.tmp made there
	outR, outW, errR, errW, err := n.outputFIFOs(w)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	// The read ends go to the watcher before the fork, which then owns them: the
	// workload's first line (a placement's announcement) is read once it is written,
	// not after the fork's hand-back and the pid record below (0.8-2 ms later under
	// load; the shell's echo comes about 0.9 ms after its exec here). Should the start
	// fail, the write ends close with it and the watcher ends the streams.
	outs := [2]uint64{n.watchOutput(w, outR, "stdout"), n.watchOutput(w, errR, "stderr")}
	oomBefore := 0 // a new, empty group has seen no OOM kill
	if !w.sb.empty() {
		oomBefore = w.sb.oomKills()
	}
	// Born with its oom_score_adj (oomGate): what it forks at once inherits it too.
	oomV, oomAfter := n.oom.enter(n.log)
	if w.sb.setupThread() {
		err = w.sb.start(cmd) // one hop to a locked thread fewer
	} else {
		err = n.spawn.run(func() error { return w.sb.start(cmd) })
	}
	n.oom.leave(n.log)
	outW.Close()
	errW.Close()
	w.steps.Step("fork") // to the child's execve (vfork), on the fork pool's thread in v1
	if err != nil {
		return nil, fmt.Errorf("workload %s: start %s: %w", w.id, w.exe, err)
	}
	if restarts > 0 {
		n.testHold(testhold.RelaunchForked, w.id)
	} else {
		n.testHold(testhold.LaunchForked, w.id)
	}
	if n.afterFork != nil {
		n.afterFork(w.id)
	}
	if oomAfter {
		// The nexlet could not raise its own for the fork: as good as it gets now.
		_ = os.WriteFile("/proc/"+strconv.Itoa(cmd.Process.Pid)+"/oom_score_adj", []byte(strconv.Itoa(oomV)), 0)
	}
	if err := w.sb.placed(cmd.Process.Pid); err != nil {
		_ = w.sb.kill()
		_ = cmd.Wait()
		return nil, fmt.Errorf("workload %s: place %s: %w", w.id, w.exe, err)
	}
	p := &proc{pid: cmd.Process.Pid, started: time.Now(), exited: make(chan struct{}), outs: outs}
	writePID := n.writePID
	if ready {
		writePID = n.writeReadyPID
	}
	// Our child, not yet waited for: the pid cannot have been reused.
	self, err := procid.Of(p.pid)
	if err != nil {
		n.log.Warn("workload start time unreadable; it cannot be adopted after a nexlet restart", "workload_id", w.id, "err", err)
	} else if err := writePID(w.id, self); err != nil {
		if restarts == 0 && noSpace(err) {
			return nil, n.unlaunch(w, cmd, p, fmt.Errorf("workload %s: its pid record cannot be written in %s (%w): the runtime directory is full; not started", w.id, n.recordDir(w.id), err))
		}
		n.log.Warn("workload pid not recorded; it cannot be adopted after a nexlet restart", "workload_id", w.id, "err", err)
	} else {
		p.rec = self
	}
	p.self = self // zero when unreadable
	if err := n.reserveExit(w, p, ready); err != nil {
		if restarts == 0 && noSpace(err) {
			return nil, n.unlaunch(w, cmd, p, fmt.Errorf("workload %s: no space for its exit record in %s (%w): the runtime directory is full; not started", w.id, n.cfg.ExitsDir, err))
		}
		n.log.Warn("no space reserved for the workload's exit record: should its nexlet die while the runtime directory is full, nexd cannot record its end", "workload_id", w.id, "dir", n.cfg.ExitsDir, "err", err)
	}
	w.steps.Step("pid") // its oom_score_adj, its pid and start time recorded, its exit's space
	n.mu.Lock()
	// Its current run from now on, before anything can reap it: an end the reaper
	// leaves to the detach (reaped) is then seen by the detach (recordUnhandledEnds).
	w.pid, w.cur = p.pid, p
	n.mu.Unlock()
	// oom: its sandbox counted an OOM kill since the launch (the kill is counted as
	// it is sent, so before the exit is seen).
	oom := func() bool { return w.sb.oomKills() > oomBefore }
	exited := func(code int, reason string, oom bool) {
		p.code, p.reason = code, endReason(reason, oom)
		close(p.exited)
		n.reaped(w, p)
	}
	// Opened before anything can reap the child, so the pid cannot have been reused.
	pidfd, err := openPidfd(p.pid)
	if err == nil {
		err = n.watch.addChild(pidfd, func(pidfd int) {
			oom := oom()
			n.recordExitAhead(w, p, pidfd, oom)
			w.sb.exiting() // while its zombie holds its process group's number
			code, reason, _ := reapPidfd(pidfd)
			if n.afterReap != nil {
				n.afterReap(w.id)
			}
			if p.ahead {
				n.testHold(testhold.ExitReaped, w.id)
			}
			exited(code, reason, oom)
		})
	}
	if err != nil {
		n.log.Warn("no pidfd: waiting for the workload holds an OS thread", "workload_id", w.id, "err", err)
		go func() {
			var info unix.Siginfo
			for errors.Is(unix.Waitid(unix.P_PID, p.pid, &info, unix.WEXITED|unix.WNOWAIT, nil), unix.EINTR) {
			}
			w.sb.exiting() // exited, not reaped: see the pidfd's path
			err := cmd.Wait()
			code, reason := exitStatus(cmd.ProcessState, err)
			exited(code, reason, oom())
		}()
		return p, nil
	}
	// Ours reaps it: Go's os.Process holds a pidfd of its own, a second descriptor per
	// workload (5,000 workloads ran out of a 20,000 limit).
	_ = cmd.Process.Release()
	return p, nil
}

// endReason is the reason of a run that ended as its reaper says (reason), or by the
// OOM killer (oom: its sandbox counted a kill since the launch).
func endReason(reason string, oom bool) string {
	if oom {
		return "killed by the OOM killer (memory limit reached)"
	}
	return reason
}

// recordExitAhead writes, before the reap of w's process p (whose pidfd says it
// exited; oom: by the OOM killer), the exit record that nexd writes for a process whose nexlet died: from the
// reap until the end's own record (a due restart, a tombstone) only this nexlet knew the
// exit status, and a nexlet killed then left the next one a job lost and a restart not
// made (TestKillBetweenReapAndRecord). Not without nexd's exits directory or p's
// identity, nor for a stop's end (the stop waits for it and says how it ended).
func (n *Nexlet) recordExitAhead(w *workload, p *proc, pidfd int, oom bool) {
	if n.cfg.ExitsDir == "" || p.rec.PID == 0 {
		return
	}
	n.mu.Lock()
	stopping := w.state == protocol.WorkloadStopping || w.state == protocol.WorkloadStopped
	n.mu.Unlock()
	if stopping {
		return
	}
	code, reason, err := peekPidfd(pidfd)
	if err != nil {
		return // the reap says why
	}
	// The OOM killer's kill as the normal path says it, not its signal (before, a
	// next nexlet reported "killed by signal killed": TestOOMKillRecordedAheadOfReap).
	if err := procid.WriteExit(n.cfg.ExitsDir, p.rec, procid.Exit{Code: code, Reason: endReason(reason, oom)}); err != nil {
		n.log.Warn("workload exit not recorded ahead of its reap; a nexlet killed before its end is recorded loses it", "workload_id", w.id, "err", err)
		return
	}
	p.ahead = true
}

// dropExitAhead removes the exit record written ahead of p's reap, once the end's own
// record is written (or its stop removed the workload's), and the space reserved for it
// when nothing took it (reserveExit).
func (n *Nexlet) dropExitAhead(p *proc) {
	if p.ahead {
		procid.RemoveExit(n.cfg.ExitsDir, p.rec)
	}
	if n.cfg.ExitsDir != "" && p.self.PID != 0 {
		procid.DropReserve(n.cfg.ExitsDir, p.self)
	}
}

// reserveExit takes the space of the exit record of p, a run just launched, in nexd's
// exits directory (procid.ReserveExit): the reserve a ready record directory holds
// (ready: its first launch; a rename), else a new one. nexd's reaper, recording the
// exit of a run whose nexlet died, writes into it and needs no new space: before, a
// full runtime directory lost that record and the next nexlet reported the job lost
// (e2e TestFullRuntimeDirKeepsOrphansExitCode). Not without nexd's exits directory or
// p's identity.
func (n *Nexlet) reserveExit(w *workload, p *proc, ready bool) error {
	if n.cfg.ExitsDir == "" || p.self.PID == 0 {
		return nil
	}
	from := ""
	if ready {
		from = filepath.Join(n.recordDir(w.id), exitReserveName)
	}
	return procid.ReserveExit(n.cfg.ExitsDir, p.self, from)
}

// noSpace says err is a full file system's (or a full quota's).
func noSpace(err error) bool {
	return errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT)
}

// unlaunch undoes a first launch whose records could not be written (a full runtime
// directory): before, its workload ran without them, and a nexlet that died then left
// its exit unrecorded (the job reported lost). Its process, just forked and not yet
// reported, is killed and reaped, its record and its exit record's reserve removed;
// the deploy fails with err, naming the directory.
func (n *Nexlet) unlaunch(w *workload, cmd *exec.Cmd, p *proc, err error) error {
	_ = w.sb.kill()
	_ = cmd.Wait()
	if n.cfg.ExitsDir != "" && p.self.PID != 0 {
		procid.DropReserve(n.cfg.ExitsDir, p.self)
	}
	n.removeRecord(w.id) // a first launch's: it records nothing that ran
	return err
}

// watchOutput hands a workload's output FIFO (its read end) to the watcher, and
// returns its token there (0: not watched).
func (n *Nexlet) watchOutput(w *workload, fd int, stream string) uint64 {
	tok, err := n.watch.addOutput(w, fd, stream)
	if err != nil {
		n.log.Warn("workload output not forwarded", "workload_id", w.id, "stream", stream, "err", err)
	}
	return tok
}

// outputFIFOs are the workload's new stdout and stderr FIFOs in its record directory:
// made ahead (recordPool) for a first launch, made here for a restart.
func (n *Nexlet) outputFIFOs(w *workload) (outR int, outW *os.File, errR int, errW *os.File, err error) {
	if r := w.ready; r != nil {
		w.ready = nil
		return r.outR, r.outW, r.errR, r.errW, nil
	}
	rec := n.recordDir(w.id)
	if outR, outW, err = newFIFO(rec, "stdout"); err != nil {
		return -1, nil, -1, nil, fmt.Errorf("workload %s: stdout: %w", w.id, err)
	}
	if errR, errW, err = newFIFO(rec, "stderr"); err != nil {
		unix.Close(outR)
		outW.Close()
		return -1, nil, -1, nil, fmt.Errorf("workload %s: stderr: %w", w.id, err)
	}
	return outR, outW, errR, errW, nil
}

func exitStatus(ps *os.ProcessState, err error) (int, string) {
	if ps == nil {
		return -1, fmt.Sprintf("wait: %v", err)
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int(ws.Signal()), "killed by signal " + ws.Signal().String()
	}
	if c := ps.ExitCode(); c != 0 {
		return c, "exited with code " + strconv.Itoa(c)
	}
	return 0, "exited"
}

// adopt tracks a workload still alive in its sandbox after a nexlet restart. It is not
// our child: nexd, the child subreaper, reaps it and records its exit status, which the
// nexlet reads once the process is gone. Its end is noticed through a pidfd on its main
// process when that process is known (the pid record names a process that still runs
// with the recorded start time), else by polling the sandbox until it is empty. Its
// output FIFOs are opened again, so forwarding resumes with what it wrote meanwhile.
func (n *Nexlet) adopt(w *workload, procs []int) *proc {
	pid, known := procs[0], false
	rec, hasRec := n.readPID(w.id)
	if hasRec && slices.Contains(procs, rec.PID) && rec.Alive() {
		pid, known = rec.PID, true
	}
	sum, _ := n.digests.sum(w.exe)
	p := &proc{pid: pid, started: time.Now(), exited: make(chan struct{})}
	if known {
		p.self = rec
	} else if id, err := procid.Of(pid); err == nil {
		p.self = id // listed in its sandbox a moment ago
	}
	if at, ok := n.launchedAt(w.id); ok && known {
		p.started = at // whether it ran long enough to start its budget afresh (ranHealthy)
	}
	n.mu.Lock()
	w.pid, w.sha256, w.cur = pid, sum, p // before anything can reap it (see launch)
	n.mu.Unlock()
	for _, stream := range []string{"stdout", "stderr"} {
		r, err := openFIFOReader(filepath.Join(n.recordDir(w.id), stream))
		if err != nil {
			n.log.Warn("adopted workload: its output cannot be read again", "workload_id", w.id, "stream", stream, "err", err)
			continue
		}
		n.watchOutput(w, r, stream)
	}
	exited := func() {
		// Not our child: nexd reaps it, perhaps already. Its process group's members
		// are noted while its number may still be held (see sandbox.exiting).
		w.sb.exiting()
		p.code, p.reason = -1, "adopted workload exited (exit code unknown)"
		if known {
			if ex, ok := n.awaitExitRecord(rec); ok {
				p.code, p.reason = ex.Code, ex.Reason
			}
		}
		close(p.exited)
		n.reaped(w, p)
	}
	if known {
		if pidfd, err := openPidfd(pid); err == nil {
			// The pid could have been reused between listing and opening: the
			// process must still be the recorded one (same start time) now that the
			// pidfd pins it.
			if !rec.Alive() {
				unix.Close(pidfd)
			} else if err := n.watch.addAdopted(pidfd, exited); err != nil {
				n.log.Warn("adopted workload: no pidfd watch; polling its sandbox instead", "workload_id", w.id, "err", err)
			} else {
				return p
			}
		}
	}
	go n.pollAdopted(w, exited)
	return p
}

// awaitExitRecord waits briefly for nexd to reap an adopted process and record its
// exit, and consumes the record.
func (n *Nexlet) awaitExitRecord(id procid.ID) (procid.Exit, bool) {
	ex, ok := n.waitExitRecord(id)
	if ok {
		procid.RemoveExit(n.cfg.ExitsDir, id)
	}
	return ex, ok
}

// waitExitRecord waits up to ExitRecordWait for nexd's exit record of id and leaves it.
func (n *Nexlet) waitExitRecord(id procid.ID) (procid.Exit, bool) {
	if n.cfg.ExitsDir == "" {
		return procid.Exit{}, false
	}
	deadline := time.Now().Add(ExitRecordWait)
	for {
		ex, err := procid.ReadExit(n.cfg.ExitsDir, id)
		if err == nil {
			return ex, true
		}
		if !errors.Is(err, procid.ErrNoExit) || time.Now().After(deadline) {
			return procid.Exit{}, false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// ExitRecordWait bounds the wait for nexd to record the exit of an adopted workload.
const ExitRecordWait = 3 * time.Second

// endedMeanwhile reports a replayed workload that is no longer running but ran before:
// one that ended on its own (its tombstone), or one whose process ended while no nexlet
// watched (nexd's exit record, or "lost" when even that is missing). A job is never
// started twice but by its restart policy; nil means the workload may be started (a
// service, one never launched, or one its policy starts again: left due by its last
// nexlet, or ended while none watched), as restart number w.restarts.
func (n *Nexlet) endedMeanwhile(w *workload) *proc {
	if ex, ok := n.readTombstone(w.id); ok {
		n.log.Info("replayed workload had already ended", "workload_id", w.id, "exit_code", ex.Code, "reason", ex.Reason)
		n.removeRunExit(w.id) // TestTombstoneReplayRemovesExitRecord
		return ended(ex.Code, ex.Reason)
	}
	if d, ok := n.readRestartDue(w.id); ok {
		// Its last nexlet detached or died while its policy was about to start it
		// again: this nexlet does, counting the restarts it used (TestRestartDueAtDetach,
		// TestNexletKillDuringRestartBackoff), once the rest of its backoff is over.
		n.log.Info("replayed workload was due to restart when its nexlet let go; starting it again",
			"workload_id", w.id, "restarts", d.restarts, "max_restarts", w.plan.maxRestarts, "exit_code", d.last.Code,
			"reason", d.last.Reason, "backoff_left", d.left().Round(time.Millisecond).String())
		// Written again naming its run: begin keeps it until the launch, and an older
		// nexlet's record without the run would stay due after that launch too.
		n.writeRestartDue(w.id, d)
		n.removeRunExit(w.id)
		n.mu.Lock()
		w.restarts = d.restarts
		n.mu.Unlock()
		w.replayDue = &d
		return nil
	}
	used := n.readRestarts(w.id) // carried: its budget goes on (TestRestartCountSurvivesNexletKill)
	rec, launched := n.readPID(w.id)
	if !launched {
		return nil
	}
	ex, known := procid.Exit{}, false
	end := time.Now()
	if n.cfg.ExitsDir != "" {
		if e, err := procid.ReadExit(n.cfg.ExitsDir, rec); err == nil {
			ex, known = e, true
			if st, err := os.Stat(filepath.Join(n.cfg.ExitsDir, rec.String())); err == nil {
				end = st.ModTime() // nexd reaped it then
			}
			// Removed once what it says is recorded in the workload's own records
			// (below), so a nexlet killed meanwhile leaves the next one the exit.
			defer procid.RemoveExit(n.cfg.ExitsDir, rec)
		}
	}
	job := w.req.Request.WorkloadLifecycle == protocol.LifecycleJob
	if !known && job {
		ex = procid.Exit{Code: -1, Reason: "lost: the job's process ended while no nexlet watched it and its exit status is unknown (last known state: running)"}
		n.log.Info("replayed job had already run; not starting it again", "workload_id", w.id, "exit_code", ex.Code, "reason", ex.Reason)
		return ended(ex.Code, ex.Reason)
	}
	code := -1 // a service's unknown end counts as a failure
	if known {
		code = ex.Code
	}
	if w.policyRestarts(code) {
		// Its policy starts it again, as its nexlet would have: restart number used+1,
		// if its budget allows (before, a service's was not counted, a job's not made).
		if at, ok := n.launchedAt(w.id); ok && end.Sub(at) > 2*MaxBackoff {
			used = 0 // it ran healthy (ranHealthy)
		}
		if used >= w.plan.maxRestarts {
			reason := w.exhaustedReason(ex.Reason)
			n.log.Info("replayed workload had ended while no nexlet watched and its restarts are used up; not starting it again",
				"workload_id", w.id, "exit_code", code, "reason", reason)
			return ended(code, reason)
		}
		n.log.Info("replayed workload had ended while no nexlet watched; its policy starts it again", "workload_id", w.id,
			"restarts", used+1, "max_restarts", w.plan.maxRestarts, "exit_code", code, "reason", ex.Reason)
		// Due from here on, as a restart its nexlet saw, its backoff after the end
		// nexd recorded: a nexlet killed before the launch leaves the next one this
		// restart (begin keeps the records).
		d := restartDue{restarts: used + 1, last: procid.Exit{Code: code, Reason: ex.Reason}, end: end, backoff: w.plan.backoff}
		n.writeRestartDue(w.id, d)
		n.mu.Lock()
		w.restarts = used + 1
		n.mu.Unlock()
		w.replayDue = &d
		return nil
	}
	// Its policy does not start it again (never; on-failure after a clean exit): it
	// ended, as it would have with its nexlet watching. Before, a service was started
	// again whatever its policy said (TestServiceEndWhileNexletDeadFollowsPolicy).
	if !known { // a service whose policy restarts no failure
		ex = procid.Exit{Code: -1, Reason: "lost: its process ended while no nexlet watched it and its exit status is unknown (last known state: running)"}
	}
	n.log.Info("replayed workload had ended while no nexlet watched; its restart policy does not start it again",
		"workload_id", w.id, "policy", w.plan.policy, "exit_code", ex.Code, "reason", ex.Reason)
	return ended(ex.Code, ex.Reason)
}

// relaunchBound bounds, in clock ticks (10 ms), how long after its launch record a
// relaunch's process may have started (the fork follows the record at once; this
// leaves room for a loaded machine).
const relaunchBound = 10 * 100

// bindForkedRelaunch finds the run of a relaunch that its nexlet forked and died before
// recording: the pid record still names the run the due restart follows, and the
// launch record names that same run. The relaunch's process is the earliest that
// started from the record's tick on: in the workload's cgroup, a process group leader
// (every run is one; what the ended run left behind is in its group), live; else one
// of the launch's dynamic uid (the workload's alone), live (or a zombie nexd has not
// reaped yet) or ended (nexd's exit record keeps the uid). Found, it is recorded as
// the workload's run, so the restart is due no more: begin adopts it, or
// endedMeanwhile gives its end the policy, counting the restart it made. Before, the
// next nexlet made that restart a second time: a run too many and its restarts
// counted one short (TestRelaunchForkedBeforePidRecord; a named user's or the
// nexlet's uid, found by the cgroup alone: its nameduser case). It reports whether a
// run was recorded.
func (n *Nexlet) bindForkedRelaunch(w *workload, sb sandbox) bool {
	d, due := n.readRestartDue(w.id)
	if !due {
		return false
	}
	restarts := d.restarts
	l, ok := n.readLaunch(w.id)
	if !ok || l.restarts != restarts || l.run != n.runOf(w.id) {
		return false
	}
	run, zombie, found := procid.ID{}, false, false
	if n.iso.mode() != "none" {
		procs, _ := sb.procs()
		for _, pid := range procs {
			id, err := procid.Of(pid)
			if err != nil || id.Start < l.t0 || id.Start > l.t0+relaunchBound {
				continue
			}
			if pg, err := syscall.Getpgid(pid); err != nil || pg != pid {
				continue
			}
			if !found || startedBefore(id, run) {
				run, found = id, true
			}
		}
	}
	if !found && l.hasUID {
		run, zombie, found = n.findByUID(l.uid, l.t0, l.t0+relaunchBound)
	}
	if !found {
		return false // never forked (or, of a uid not its alone, ended): the restart is still due
	}
	if zombie {
		// Reparented to nexd, which reaps it and records its end (left for
		// endedMeanwhile to read).
		n.waitExitRecord(run)
	}
	if err := n.writePID(w.id, run); err != nil {
		n.log.Warn("a relaunch forked before its pid record was found but not recorded; its restart is made again", "workload_id", w.id, "err", err)
		return false
	}
	n.log.Info("replayed workload's restart was forked by its last nexlet before it recorded the run; that run is the restart",
		"workload_id", w.id, "restarts", restarts, "pid", run.PID)
	return true
}

// bindForkedLaunch finds the run of a first launch whose nexlet died between its fork
// and its pid record: the record directory is there (renamed into place before the
// fork) with no pid record, tombstone or due restart. Where the workload has a cgroup
// (its own, named by its id, the fork pool's group the process was forked in), the
// run is the earliest-started process in it; without one, or once that process ended,
// the earliest process of the workload's dynamic uid (its alone) started since its
// directory's user was recorded, live or ended (nexd's exit record keeps the uid).
// Found, it is recorded as the workload's run: begin adopts it, or endedMeanwhile
// gives its end the policy. The deploy's hot path writes nothing more for it. Before,
// a replay found the process but no pid record, adopted it by its group alone and
// reported its end as unknown; a process that had ended was started again
// (TestDeployKilledBeforePidRecord, TestForkedLaunchFoundByUID). It reports whether a run
// was recorded.
func (n *Nexlet) bindForkedLaunch(w *workload, sb sandbox) bool {
	if _, ok := n.readPID(w.id); ok {
		return false
	}
	if _, ok := n.readTombstone(w.id); ok {
		return false
	}
	if _, err := os.Stat(n.recordDir(w.id)); err != nil {
		return false // never got as far as its fork
	}
	run, found, how := procid.ID{}, false, "cgroup"
	if n.iso.mode() != "none" {
		procs, _ := sb.procs()
		for _, pid := range procs {
			id, err := procid.Of(pid)
			if err == nil && (!found || startedBefore(id, run)) {
				run, found = id, true
			}
		}
	}
	if !found {
		id, known := readIdent(w.dir)
		st, err := os.Stat(filepath.Join(w.dir, identFileName))
		now, terr := procid.Ticks()
		if !known || !id.dynamic || err != nil || terr != nil {
			return false
		}
		// The tick its user was recorded at, a second early for the clocks' grain.
		ago := uint64(max(0, time.Since(st.ModTime())/(10*time.Millisecond))) + 100
		t0 := uint64(0)
		if now > ago {
			t0 = now - ago
		}
		var zombie bool
		if run, zombie, found = n.findByUID(id.uid, t0, ^uint64(0)); !found {
			return false
		}
		if zombie {
			n.waitExitRecord(run)
		}
		how = "uid"
	}
	if err := n.writePID(w.id, run); err != nil {
		n.log.Warn("a first launch forked before its pid record was found but not recorded", "workload_id", w.id, "err", err)
		return false
	}
	n.log.Info("replayed workload's first launch was forked by its last nexlet before it recorded the run; that run is the workload's",
		"workload_id", w.id, "pid", run.PID, "found_by", how)
	return true
}

// startedBefore orders processes by start: the earlier tick, then (within one tick)
// the lower pid.
func startedBefore(a, b procid.ID) bool {
	return a.Start < b.Start || (a.Start == b.Start && a.PID < b.PID)
}

// findByUID returns the earliest process of uid started from tick lo to hi: a live one
// or a zombie (zombie true when it has ended), or one nexd recorded the end of.
func (n *Nexlet) findByUID(uid uint32, lo, hi uint64) (run procid.ID, zombie, found bool) {
	in := func(start uint64) bool { return start >= lo && start <= hi }
	better := func(id procid.ID) bool {
		return !found || startedBefore(id, run)
	}
	if ents, err := os.ReadDir("/proc"); err == nil {
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			st, err := procid.ReadStat(pid)
			if err != nil || !in(st.Start) {
				continue
			}
			if u, err := procid.UID(pid); err != nil || u != uid {
				continue
			}
			if id := (procid.ID{PID: pid, Start: st.Start}); better(id) {
				run, zombie, found = id, !st.Runs(), true // Runs: a main thread ended alone is no end
			}
		}
	}
	if n.cfg.ExitsDir != "" {
		ids, _ := procid.ListExits(n.cfg.ExitsDir)
		for _, id := range ids {
			if !in(id.Start) || !better(id) {
				continue
			}
			if ex, err := procid.ReadExit(n.cfg.ExitsDir, id); err == nil && ex.HasUID && ex.UID == uid {
				run, zombie, found = id, false, true
			}
		}
	}
	return run, zombie, found
}

// removeRunExit removes the exit record of the run the pid record names, once its end
// is recorded in the workload's own records (a due restart, a tombstone): one written
// ahead of its reap (recordExitAhead) stays when its nexlet died before removing it.
func (n *Nexlet) removeRunExit(id string) {
	if rec, ok := n.readPID(id); ok && n.cfg.ExitsDir != "" {
		procid.RemoveExit(n.cfg.ExitsDir, rec)
	}
}

// pollAdopted polls an adopted workload's sandbox until it is empty.
func (n *Nexlet) pollAdopted(w *workload, exited func()) {
	t := time.NewTicker(n.cfg.PollInterval)
	defer t.Stop()
	for {
		select {
		case <-n.abandon:
			return
		case <-t.C:
		}
		if ps, err := w.sb.procs(); err == nil && len(ps) == 0 {
			exited()
			return
		}
	}
}

// Workload output limits: each workload may forward this many lines per second (with
// bursts) to its log feed and the nexlet's log; the rest is dropped before any
// formatting or publishing, and counted in one line per OutputNoteEvery.
const (
	OutputRate      = 200
	OutputBurst     = 1000
	OutputNoteEvery = 10 * time.Second
	// outputPause is how long the reader rests once a workload is over its limit.
	outputPause = 50 * time.Millisecond
)

// outputLimit is one workload's bucket, shared by its stdout and stderr pumps.
type outputLimit struct {
	mu      sync.Mutex
	tokens  float64
	last    time.Time
	dropped int
	noted   time.Time
}

// take reports whether one more line may go out, and how many dropped lines to
// report now (at most once per OutputNoteEvery).
func (o *outputLimit) take(now time.Time) (ok bool, report int) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.last.IsZero() {
		o.tokens, o.last, o.noted = OutputBurst, now, now
	}
	o.tokens = min(OutputBurst, o.tokens+now.Sub(o.last).Seconds()*OutputRate)
	o.last = now
	if ok = o.tokens >= 1; ok {
		o.tokens--
	} else {
		o.dropped++
	}
	if o.dropped > 0 && (now.Sub(o.noted) >= OutputNoteEvery) {
		report, o.dropped, o.noted = o.dropped, 0, now
	}
	return ok, report
}

// drop counts lines dropped without asking for tokens.
func (o *outputLimit) drop(lines int) {
	o.mu.Lock()
	o.dropped += lines
	o.mu.Unlock()
}

// pumpSmallBuf and pumpMaxLine: the size up to which a stream's unfinished line is
// kept between reads without giving its buffer back, and the longest line published
// whole (longer ones go out in pieces of this size).
const (
	pumpSmallBuf = 4 << 10
	pumpMaxLine  = 64 << 10
)

// announceStart logs the start and emits WORKLOADSTARTED.
func (n *Nexlet) announceStart(w *workload, p *proc) {
	n.mu.Lock()
	user := w.ident.String()
	n.mu.Unlock()
	n.log.Info("workload started", "workload_id", w.id, "namespace", w.ns, "pid", p.pid, "isolation", n.iso.mode(),
		"user", user)
	n.emit(w.ns, protocol.EventWorkloadStarted, protocol.WorkloadStartedEvent{ID: w.id, Namespace: w.ns,
		WorkloadType: w.req.Request.WorkloadType})
}

// supervise waits for the workload's process, restarts it by policy and handles stops.
// started: it logs the start and emits WORKLOADSTARTED first, here rather than before
// the start's reply (a log write and an event's encoding, 0.1 ms of a deploy); the
// event still precedes the WORKLOADSTOPPED this goroutine emits.
func (n *Nexlet) supervise(w *workload, p *proc, started bool) {
	defer close(w.done)
	if started {
		// On a goroutine of its own, waited for: the log line's JSON handler and the
		// event's encoding grow a stack to 8 KB or more, and this goroutine then waits
		// as long as the workload runs, keeping whatever its stack grew to (the
		// collector halves a waiting goroutine's stack at most once a cycle).
		announced := make(chan struct{})
		go func() {
			defer close(announced)
			n.announceStart(w, p)
		}()
		<-announced
	}
	backoff := w.plan.backoff
	for {
		select {
		case <-n.abandon:
			return // an end reaped meanwhile is the detach's to record (Detach, reaped)
		case r := <-w.stop:
			n.stopped(w, p, r)
			return
		case <-p.exited:
		}
		if n.beforeEnd != nil {
			n.beforeEnd(w.id)
		}
		if p = n.ended(w, p, &backoff); p == nil {
			return
		}
	}
}

// ended handles the end of w's process p: it records it, or starts w again by its
// policy after its backoff and returns the new run's process (nil: w is done here). An
// end this counts (track) the detach waits for, cutting its backoff short; a nexlet
// that detached before leaves the end to the detach (recordUnhandledEnds, reaped),
// which records it for the next nexlet.
func (n *Nexlet) ended(w *workload, p *proc, backoff *time.Duration) *proc {
	if !n.track() {
		return nil
	}
	defer n.ending.Done()
	if !p.claimed.CompareAndSwap(false, true) {
		return nil // recorded by the detach
	}
	if p.code == 0 && p.reason == "" {
		p.reason = "exited"
	}
	restart := w.restartsAfter(p)
	if restart && ranHealthy(p) {
		*backoff = w.plan.backoff
	}
	end := time.Now()
	if p.due != nil {
		// A replayed restart: its backoff as recorded, after the recorded end.
		end, *backoff = p.due.end, p.due.backoff
	}
	var next int
	var due bool
	if restart {
		n.mu.Lock()
		next, due = w.nextRestartLocked(p)
		n.mu.Unlock()
		if due {
			// Recorded before anything else, the backoff above all, and before it is
			// listed: a nexlet killed from here on leaves the next one this restart to
			// make, or the relaunch that made it (TestNexletKillDuringRestartBackoff).
			n.writeRestartDue(w.id, restartDue{restarts: next, last: procid.Exit{Code: p.code, Reason: p.reason}, end: end, backoff: *backoff})
			n.dropExitAhead(p)
			if n.afterRestartDue != nil {
				n.afterRestartDue(w.id)
			}
		}
		n.mu.Lock()
		w.restarts = next
		if due {
			w.state = protocol.WorkloadStarting
		}
		n.mu.Unlock()
	}
	empty := n.killAndWait(w) // leftovers of a main process that ended on its own
	n.log.Info("workload process ended", "workload_id", w.id, "code", p.code, "reason", p.reason)
	if !due {
		w.emptied = empty            // nothing is launched in it again
		n.finish(w, p, nil, restart) // its tombstone
		n.dropExitAhead(p)
		return nil
	}
	t := time.NewTimer(backoffLeft(end, *backoff))
	defer t.Stop()
	select {
	case <-n.abandon:
		n.detachedRestart(w, p, restartDue{restarts: next, last: procid.Exit{Code: p.code, Reason: p.reason}, end: end, backoff: *backoff})
		return nil
	case r := <-w.stop:
		// Recorded too: a nexlet killed before the finish leaves the stop to the next
		// one, which would otherwise restart the workload by its due restart.
		n.markRecorded(w, r)
		n.clearRestartDue(w.id) // stopped: due no more
		n.finish(w, p, &r, false)
		return nil
	case <-t.C:
	}
	// Still counted as an end under way, which Detach waits for: the nexlet exits once
	// Detach returns, and a launch not made by then was lost (the next nexlet found no
	// process and no due restart, and reported a job lost; TestRestartLaunchedAtDetach).
	if n.beforeRelaunch != nil {
		n.beforeRelaunch(w.id)
	}
	*backoff = min(2**backoff, MaxBackoff)
	np, err := n.launch(w)
	if err != nil {
		n.log.Error("workload restart failed", "workload_id", w.id, "err", err)
		p.code, p.reason = -1, err.Error()
		n.finish(w, p, nil, true)
		return nil
	}
	w.killBy = time.Time{} // a new run: its end's kill waits anew
	n.setState(w, protocol.WorkloadRunning)
	return np
}

// stopped stops w, whose process is p, as r asks. The stop claims p's end once
// terminate is done (not before: a nexlet that detaches and exits mid-stop leaves the
// end to the detach, which records it with its exit code), so that a detach meanwhile
// records it at most once and never after the stop removed w's record (a write then
// made the record again: the next nexlet held w, stopped, a second time). An end the
// detach claimed first, or one the stop claims after the detach, is left recorded for
// the next nexlet, and the stop is answered that the next nexlet reports it
// (TestStopAtDetachReportedOnce).
func (n *Nexlet) stopped(w *workload, p *proc, r stopRequest) {
	n.markRecorded(w, r)
	n.terminate(w, p, r.grace, r.steps)
	if !p.claimed.CompareAndSwap(false, true) {
		return // recorded by the detach
	}
	exited := exitedNow(p) // and p.ahead set: an end recorded before the stop came
	if exited && n.detached() {
		n.recordDetachedEnd(w, p.code, p.reason)
	} else {
		n.finish(w, p, &r, false)
	}
	if exited {
		n.dropExitAhead(p)
	}
}

// restartsAfter says whether w's policy starts it again after its process p ended (a
// process found ended on replay, never).
func (w *workload) restartsAfter(p *proc) bool {
	return !p.final && w.policyRestarts(p.code)
}

// policyRestarts says whether w's policy starts it again after a run that ended with code.
func (w *workload) policyRestarts(code int) bool {
	return w.plan.policy == RestartAlways || (w.plan.policy == RestartOnFailure && code != 0)
}

// ranHealthy says whether p ran long enough to start its workload's restart budget
// afresh.
func ranHealthy(p *proc) bool { return time.Since(p.started) > 2*MaxBackoff }

// nextRestartLocked is w's restart count once its policy restarted it after p ended
// (which restartsAfter says it does), and whether its budget allows that restart (due);
// not due, the count its budget ended with. Called with Nexlet.mu held.
func (w *workload) nextRestartLocked(p *proc) (restarts int, due bool) {
	used := w.restarts
	if ranHealthy(p) {
		used = 0
	}
	if used >= w.plan.maxRestarts {
		return used, false
	}
	return used + 1, true
}

// exhaustedReason is the reason of a workload's end whose restart budget is used up.
func (w *workload) exhaustedReason(last string) string {
	return fmt.Sprintf("restart limit of %d reached; last run: %s", w.plan.maxRestarts, last)
}

// terminate sends SIGTERM, waits up to grace for the main process, then kills the group.
func (n *Nexlet) terminate(w *workload, p *proc, grace time.Duration, st *steps.Timer) {
	n.setState(w, protocol.WorkloadStopping)
	// Not for a run that stands for an ended one (pid 0: a replayed end, a replayed
	// restart waiting out its backoff). By its identity, never by the bare pid: the
	// process may have ended (an adopted one nexd reaped, a run whose end the stop
	// raced) and its pid gone to a stranger, which a SIGTERM by number stopped. One
	// whose identity is unknown gets none: the grace's kill of its sandbox stops it.
	if p.pid > 0 && p.self.PID != 0 {
		if err := procid.Signal(p.self, unix.SIGTERM); err != nil && !errors.Is(err, unix.ESRCH) {
			n.log.Warn("SIGTERM failed", "workload_id", w.id, "pid", p.pid, "err", err)
		}
	}
	st.Step("signal")
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-p.exited:
		st.Step("exit") // the pidfd's wake-up, the reap
		w.emptied = n.killAndWait(w)
		st.Step("kill") // its group known empty
		return
	case <-t.C:
	}
	n.holdStopGrace(w.id)
	n.log.Warn("workload ignored SIGTERM; killing its group", "workload_id", w.id, "grace", grace)
	w.emptied = n.killAndWait(w)
	wait := n.killWait // emptied: the main process is gone, its reap is a moment away
	if !w.emptied {
		wait = max(0, time.Until(w.killBy)) // what is left of the kill's one wait
	}
	select {
	case <-p.exited:
	case <-time.After(wait):
		n.log.Error("workload process did not exit after SIGKILL", "workload_id", w.id, "pid", p.pid)
		return
	}
	p.reason = fmt.Sprintf("killed after a stop grace of %s", grace)
	st.Step("kill")
}

// killWaitDefault is how long a kill waits for a workload's processes to be gone
// (Nexlet.killWait): a process in an uninterruptible sleep (a hung NFS or FUSE mount)
// or a frozen cgroup outlives its SIGKILL, and the stop goes on without it.
const killWaitDefault = 30 * time.Second

// killAndWait SIGKILLs the sandbox and waits until it is empty, n.killWait at most;
// empty says it was seen empty (not: its processes could not be listed, or survived).
// The wait is one per end of a run (w.killBy): a later call for the same end (the
// stop's tidy after the stop's own kill) waits only for what is left of it, so a
// group that outlives SIGKILL (a process in an uninterruptible sleep, a frozen
// cgroup) holds a stop and its tidy n.killWait in all, not once each.
func (n *Nexlet) killAndWait(w *workload) (empty bool) {
	began := time.Now()
	if w.killBy.IsZero() {
		w.killBy = began.Add(n.killWait)
	}
	for {
		procs, err := w.sb.procs()
		if err != nil || len(procs) == 0 {
			if err == nil {
				w.killBy = time.Time{} // seen empty: a later end's kill waits anew
			}
			return err == nil
		}
		if err := w.sb.kill(); err != nil {
			n.log.Warn("kill workload group", "workload_id", w.id, "err", err)
		}
		if time.Now().After(w.killBy) {
			n.log.Error("workload processes survive SIGKILL", "workload_id", w.id, "pids", procs, "waited", time.Since(began))
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cleanup removes what a workload that ended left behind. later: it runs after a stop's
// reply, and each step first lets the starts in flight go (startGate).
func (n *Nexlet) cleanup(w *workload, st *steps.Timer, later bool) {
	yield := func() {
		if later {
			n.starts.yield(tidyYield)
		}
	}
	if w.sb != nil {
		if !w.emptied {
			yield()
			n.killAndWait(w)
		}
		st.Step("empty")
		yield()
		if err := w.sb.remove(); err != nil {
			n.log.Warn("remove workload sandbox", "workload_id", w.id, "err", err)
		}
		st.Step("sandbox")
	}
	n.mu.Lock()
	id := w.ident
	n.mu.Unlock()
	// The lease passes from its directory to this nexlet before the directory goes
	// (retire): the uid stays leased and unused until its release.
	if id.dynamic && !n.users.retire(id.uid, w.dir) {
		id = ident{} // not leased for this workload: not its to release
	}
	st.Step("retire")
	yield()
	if err := os.RemoveAll(w.dir); err != nil {
		n.log.Warn("remove workload directory", "workload_id", w.id, "err", err)
	}
	st.Step("dir")
	if w.plan == nil || w.plan.art.scheme == "nats" {
		n.arts.sweep(false) // its artifact goes unless another workload links it
		st.Step("sweep")
	}
	// The release walks /proc for survivors of the uid (milliseconds on a busy host):
	// it runs after the stop's reply, batched with other stops' (one walk for all).
	n.releases.add(id)
}

// finish records the end, removes the sandbox and private directory and emits
// WORKLOADSTOPPED. A stopped workload leaves the table; one that ended on its own stays
// (state stopped or error, with its exit code) until it is stopped.
//
// A stop's reply waits only for the workload's processes to be gone: once they are,
// what it left behind (its cgroup, directory, record, the uid's retirement) is removed
// and its end logged and announced after the reply (tidy), from answered on; not in
// lame duck, whose drain precedes nexd's exit. Until then
// the uid stays leased to the workload's directory and the id in n.tidying, which a
// start of the same id and the nexlet's shutdown wait for.
func (n *Nexlet) finish(w *workload, p *proc, r *stopRequest, exhausted bool) {
	requested := r != nil
	var st *steps.Timer // times a requested stop's steps (debug logging only)
	if requested {
		st = r.steps
	}
	if requested && !r.record {
		// A stop at nexd's or the nexlet's shutdown removes the workload's record but
		// is remembered nowhere: the memory no longer holds every start it took.
		n.dropMemory()
	}
	n.stopRenewal(w)
	code, reason := p.code, p.reason
	exited := true
	select {
	case <-p.exited:
	default:
		exited = false
		code, reason = -1, "stopped before the process exited"
	}
	if exhausted {
		reason = w.exhaustedReason(reason)
	}
	n.mu.Lock()
	// In lame duck and at shutdown the leftovers go before the reply, as nexd stops
	// once its drain is answered and would not wait for them.
	later := requested && exited && !n.lameduck
	n.mu.Unlock()
	if !later {
		n.cleanup(w, st, false)
		if requested {
			n.removeRecord(w.id)
		} else {
			n.writeTombstone(w.id, code, reason)
		}
		st.Step("record")
	}
	var tidied chan struct{}
	var forgot []string  // stops the memory forgot: their records go with the tidy
	queued := time.Now() // before a start can find it in n.tidying and hurry it
	n.mu.Lock()
	w.exitCode, w.reason, w.pid, w.ended = &code, reason, 0, time.Now()
	if requested {
		w.state = protocol.WorkloadStopped
		if cur, ok := n.workloads[w.id]; ok && cur == w {
			delete(n.workloads, w.id)
			if r.record {
				// Under the same lock: a repeated stop finds the workload or this. Not
				// a stop at nexd's or the nexlet's shutdown: those workloads start
				// again, and a registration listing them (nexd_stopped) would have
				// the node drop them (TestKeptStopNotListedAsStopped).
				forgot = n.rememberStopLocked(w.id, stopmemo.Entry{Namespace: w.ns, Type: w.req.Request.WorkloadType, How: stopHow(code, reason), At: w.ended})
			}
		}
		if later {
			tidied = make(chan struct{})
			n.tidying[w.id] = tidied
			if !r.record {
				n.keptTidying[w.id] = true
			}
		}
	} else {
		// Only an end of its own adds to what is pruned (a scan of every workload,
		// 60 us with 5,000 running: BenchmarkPruneScan); the heartbeat prunes too.
		n.pruneLocked()
		w.finished = true
		w.state = protocol.WorkloadStopped
		if code != 0 || exhausted {
			w.state = protocol.WorkloadError
		}
	}
	n.mu.Unlock()
	st.Step("state")
	ev := protocol.WorkloadStoppedEvent{ID: w.id, Namespace: w.ns, WorkloadType: w.req.Request.WorkloadType,
		Metadata: map[string]string{"exit_code": strconv.Itoa(code), "reason": reason},
		// A stop at nexd's or the nexlet's shutdown: the node keeps the workload.
		Kept: requested && !r.record}
	if (!requested && code != 0) || exhausted || strings.HasPrefix(reason, "killed after") {
		ev.Error = &protocol.EventError{Code: strconv.Itoa(code), Message: reason}
	}
	announce := func() {
		n.log.Info("workload stopped", "workload_id", w.id, "namespace", w.ns, "exit_code", code, "reason", reason)
		n.emit(w.ns, protocol.EventWorkloadStopped, ev)
	}
	if !later {
		announce()
		n.forgetStops(forgot)
		st.Step("event") // the log line, WORKLOADSTOPPED and the ended report sent
		return
	}
	n.bg.Go(func() {
		if r.answered != nil {
			<-r.answered // the stopper has its answer: the reply goes first
		}
		n.quiet.touch()
		n.quiet.wait(queued) // until starts and stops pause (quietGate)
		if n.beforeTidy != nil {
			n.beforeTidy(w.id)
		}
		n.testHold(testhold.StopTidy, w.id)
		tt := steps.Start(n.log)
		n.cleanup(w, tt, true)
		n.starts.yield(tidyYield)
		n.removeRecord(w.id)
		n.forgetStops(forgot)
		tt.Step("record")
		announce() // before the tidy counts as done: a shutdown waits for its event
		tt.Step("event")
		n.mu.Lock()
		delete(n.tidying, w.id)
		delete(n.keptTidying, w.id)
		n.mu.Unlock()
		close(tidied)
		tt.Log(n.log, "stop tidy steps", "workload_id", w.id)
	})
}

// waitTidied waits until what stopped workloads left behind is removed.
func (n *Nexlet) waitTidied() {
	n.mu.Lock()
	chs := make([]chan struct{}, 0, len(n.tidying))
	for _, ch := range n.tidying {
		chs = append(chs, ch)
	}
	n.mu.Unlock()
	for _, ch := range chs {
		<-ch
	}
}

// holdStopGrace is testhold.StopGraceHeld (Config.TestHold): the kill at the end of
// a stop's grace waits for the test's release, or for the nexlet's shutdown (n.life),
// whose own stops would otherwise sit in it. Never in production.
func (n *Nexlet) holdStopGrace(id string) {
	if !testhold.Holds(n.cfg.TestHold, testhold.StopGraceHeld) {
		return
	}
	n.log.Warn("test hold: the stop's grace is over, its kill held until released", "hold", testhold.StopGraceHeld, "workload_id", id)
	released := testhold.Released(n.life, n.cfg.TestHold, testhold.StopGraceHeld, testhold.StopGraceHeldMax)
	n.log.Warn("test hold: the stop goes on", "hold", testhold.StopGraceHeld, "workload_id", id, "released", released)
}

// replayMeetsStopLocked is testhold.StopGraceHeld's word, for the test to release
// the held stop on: a replay of id found its stop under way. n.mu is held.
func (n *Nexlet) replayMeetsStopLocked(id string, existing bool) {
	if !existing || !testhold.Holds(n.cfg.TestHold, testhold.StopGraceHeld) {
		return
	}
	if w := n.workloads[id]; w != nil && w.state == protocol.WorkloadStopping && !w.finished {
		n.log.Warn("test hold: a replay met the workload's stop under way", "hold", testhold.StopGraceHeld, "workload_id", id)
	}
}

// testHold holds the calling goroutine for ever at point when an e2e fault test asked
// for it (Config.TestHold): the test kills the nexlet there. Never in production.
// Each point holds once per runtime directory (the nexlet after the killed one passes).
func (n *Nexlet) testHold(point, id string) {
	if !testhold.Holds(n.cfg.TestHold, point) {
		return
	}
	f, err := os.OpenFile(filepath.Join(n.cfg.RuntimeDir, "test-held-"+point), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return // held before
	}
	f.Close()
	n.log.Warn("test hold: the nexlet waits here to be killed", "hold", point, "workload_id", id)
	select {}
}
