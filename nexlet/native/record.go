package native

import (
	"maps"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nexd-project/nexd/internal/fifo"
	"github.com/nexd-project/nexd/internal/procid"
)

// Each workload has a record directory <runtime>/procs/<id>/, private to the nexlet
// (the workload's own directory is writable by the workload, so nothing the nexlet
// trusts on adoption lives there):
//
//	pid     "<pid> <start time>" of the main process, written at every launch
//	stdout  named FIFO: the workload's standard output
//	stderr  named FIFO: its standard error
//	exit    "<code> <reason>" once it ended on its own (a tombstone: a replay after a
//	        nexlet crash must report it, never start it again)
//	restart "<restarts> <code> run=<pid>-<start time> end=<unix ms> backoff=<ms> <reason>"
//	        once its process ended and its restart policy starts it again, written
//	        before the backoff: restart <restarts> of its budget is due backoff after
//	        end (so a next nexlet waits only the rest) after the run the pid record
//	        named then (the last run's code and reason, for the log). It is due while the pid
//	        record still names that run (a relaunch writes a new one), so a nexlet
//	        that dies at any moment of the backoff or the relaunch leaves the next one
//	        either a due restart or a launched run, never both (an older nexlet's
//	        record without run= was written at a detach: due; one without end=, at once)
//	restarts "<restarts>": the restart number of the newest launch, written before
//	        its fork (none: 0), so that the next nexlet goes on counting against
//	        the budget rather than from zero
//	launch  "<restarts> run=<pid>-<start time> t0=<tick> uid=<uid>": a relaunch about
//	        to fork, written before the fork: restart <restarts> after the run named,
//	        forked at clock tick t0 (procid.Ticks) or later, as uid when it is a
//	        dynamic one (the workload's alone; else uid=-). A nexlet killed between
//	        that fork and the pid record leaves the restart due; the next one looks
//	        for the process, the earliest started from t0 on: a process group leader
//	        in the workload's cgroup, else one of that uid, live or ended (nexd's exit
//	        record keeps the uid), and takes it as the restart's run instead of making
//	        the restart a second time (bindForkedRelaunch). A first launch writes
//	        nothing more: its run is found by its cgroup or its uid alone
//	        (bindForkedLaunch)
//
// and, apart from the record, <runtime>/stops/<id>, "<unix ms> <grace ms> <namespace>
// <type>": a stop the node asked for, written before its SIGTERM and kept while the
// nexlet remembers the stop (stopmark.go).
//
// The workload holds its FIFOs open for reading and writing (O_RDWR), so a write never
// meets a pipe without a reader (no EPIPE, no SIGPIPE) when the nexlet dies: it only
// blocks once the pipe buffer is full, until the next nexlet opens the FIFO again.

// PipeBufferSize is what each workload output pipe is raised to (F_SETPIPE_SZ): how much
// output a workload can write while no nexlet reads before its writes block.
const PipeBufferSize = 1 << 20

func (n *Nexlet) recordDir(id string) string {
	return filepath.Join(n.cfg.RuntimeDir, "procs", id)
}

// writePID records the main process of a launch.
func (n *Nexlet) writePID(id string, p procid.ID) error {
	return writeAtomic(filepath.Join(n.recordDir(id), "pid"), p.Format())
}

// writeReadyPID records the main process of a first launch whose record directory
// came from the record pool, into the pid.tmp the pool made there (pidRecordSize
// bytes, written: the record, padded to that size, takes no new space, so a full
// runtime directory still has it written): no inode is
// allocated on the deploy's path (ext4 without a journal scans past every inode
// deleted in the last seconds for a new one, 0.1 ms and more per file under a
// deploy loop's churn), and the file is neither truncated nor renamed over another,
// so ext4 starts no writeback at its close (auto_da_alloc). Otherwise as writePID.
func (n *Nexlet) writeReadyPID(id string, p procid.ID) error {
	path := filepath.Join(n.recordDir(id), "pid")
	f, err := os.OpenFile(path+".tmp", os.O_WRONLY|syscall.O_NOFOLLOW, 0)
	if err != nil {
		return writeAtomic(path, p.Format())
	}
	rec := p.Format()
	fi, err := f.Stat()
	if err != nil || !fi.Mode().IsRegular() || fi.Size() < int64(len(rec)) || fi.Size() > pidRecordSize {
		f.Close()
		return writeAtomic(path, rec)
	}
	// Padded with newlines (a record is read as its fields): written in place, in
	// the space the pool took.
	_, err = f.WriteAt([]byte(rec+strings.Repeat("\n", int(fi.Size())-len(rec))), 0)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return os.Rename(path+".tmp", path)
}

// readPID returns the recorded main process; ok is false when nothing was launched.
func (n *Nexlet) readPID(id string) (procid.ID, bool) {
	b, err := os.ReadFile(filepath.Join(n.recordDir(id), "pid"))
	if err != nil {
		return procid.ID{}, false
	}
	p, err := procid.Parse(strings.TrimSpace(string(b)))
	if err != nil {
		n.log.Warn("workload pid record unreadable", "workload_id", id, "err", err)
		return procid.ID{}, false
	}
	return p, true
}

// writeTombstone records how a workload that ended on its own ended.
func (n *Nexlet) writeTombstone(id string, code int, reason string) {
	if err := writeAtomic(filepath.Join(n.recordDir(id), "exit"), strconv.Itoa(code)+" "+reason); err != nil {
		n.log.Warn("cannot record a workload's end; a replay after a nexlet crash would not know it", "workload_id", id, "err", err)
	}
}

// readTombstone returns the recorded end of a workload, if any.
func (n *Nexlet) readTombstone(id string) (procid.Exit, bool) {
	b, err := os.ReadFile(filepath.Join(n.recordDir(id), "exit"))
	if err != nil {
		return procid.Exit{}, false
	}
	c, reason, _ := strings.Cut(string(b), " ")
	code, err := strconv.Atoi(c)
	if err != nil {
		return procid.Exit{}, false
	}
	return procid.Exit{Code: code, Reason: reason}, true
}

// runOf names the run the pid record names now, for a due restart record: "-" when no
// process was recorded.
func (n *Nexlet) runOf(id string) string {
	if p, ok := n.readPID(id); ok {
		return p.String()
	}
	return "-"
}

// restartDue is a workload's due restart record: restart number restarts of its budget,
// after the run that ended as last. end and backoff (zero in an older nexlet's record:
// due at once) say when: backoff after end, measured from the recorded end, so a
// nexlet killed during the backoff leaves the next one only the rest to wait
// (TestNexletKillDuringRestartBackoff).
type restartDue struct {
	restarts int
	last     procid.Exit
	end      time.Time
	backoff  time.Duration
}

// left is how much of the backoff is still to wait.
func (d restartDue) left() time.Duration {
	if d.end.IsZero() {
		return 0
	}
	return backoffLeft(d.end, d.backoff)
}

// backoffLeft is what is left to wait of a backoff after end: never more than the
// backoff itself. A recorded end is wall-clock time; a clock stepped back since it was
// recorded (an NTP step, a VM resumed) would otherwise add the step to the wait: a
// service down for an hour after its nexlet's restart (TestBackoffLeftAfterClockStep).
func backoffLeft(end time.Time, backoff time.Duration) time.Duration {
	return min(backoff, max(0, time.Until(end.Add(backoff))))
}

// writeRestartDue records that restart d.restarts of a workload is due by its restart
// policy after the run the pid record names now ended as d.last, d.backoff after d.end.
func (n *Nexlet) writeRestartDue(id string, d restartDue) {
	text := strconv.Itoa(d.restarts) + " " + strconv.Itoa(d.last.Code) + " run=" + n.runOf(id)
	if !d.end.IsZero() {
		text += " end=" + strconv.FormatInt(d.end.UnixMilli(), 10) + " backoff=" + strconv.FormatInt(d.backoff.Milliseconds(), 10)
	}
	text += " " + d.last.Reason
	if err := writeAtomic(filepath.Join(n.recordDir(id), "restart"), text); err != nil {
		n.log.Warn("cannot record a workload's due restart; the next nexlet does not know it", "workload_id", id, "err", err)
	}
}

// clearRestartDue removes a workload's due restart record (a stop during the backoff).
func (n *Nexlet) clearRestartDue(id string) {
	if err := os.Remove(filepath.Join(n.recordDir(id), "restart")); err != nil && !os.IsNotExist(err) {
		n.log.Warn("cannot remove a stopped workload's due restart record", "workload_id", id, "err", err)
	}
}

// readRestartDue returns the restart left due, if any: one whose run the pid record
// still names (no relaunch was made after it; ok is false once one was).
func (n *Nexlet) readRestartDue(id string) (restartDue, bool) {
	b, err := os.ReadFile(filepath.Join(n.recordDir(id), "restart"))
	if err != nil {
		return restartDue{}, false
	}
	f := strings.SplitN(string(b), " ", 3)
	if len(f) < 2 {
		return restartDue{}, false
	}
	restarts, err1 := strconv.Atoi(f[0])
	code, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil || restarts < 0 {
		return restartDue{}, false
	}
	d := restartDue{restarts: restarts, last: procid.Exit{Code: code}}
	if len(f) == 3 {
		d.last.Reason = f[2]
		if run, ok := strings.CutPrefix(f[2], "run="); ok {
			run, d.last.Reason, _ = strings.Cut(run, " ")
			if run != n.runOf(id) {
				return restartDue{}, false // relaunched since
			}
			if v, ok := strings.CutPrefix(d.last.Reason, "end="); ok {
				var end, backoff string
				end, d.last.Reason, _ = strings.Cut(v, " ")
				if v, ok := strings.CutPrefix(d.last.Reason, "backoff="); ok {
					backoff, d.last.Reason, _ = strings.Cut(v, " ")
				}
				e, err1 := strconv.ParseInt(end, 10, 64)
				b, err2 := strconv.ParseInt(backoff, 10, 64)
				if err1 == nil && err2 == nil && validMillis(b) {
					d.end, d.backoff = time.UnixMilli(e), time.Duration(b)*time.Millisecond
				}
			}
		}
	}
	return d, true
}

// validMillis says whether a record's duration in milliseconds is one a nexlet writes:
// not negative, and within a time.Duration (a larger one would wrap around negative).
func validMillis(ms int64) bool { return ms >= 0 && ms <= math.MaxInt64/int64(time.Millisecond) }

// writeRestarts records the restart number of a launch about to be made.
func (n *Nexlet) writeRestarts(id string, restarts int) {
	if err := writeAtomic(filepath.Join(n.recordDir(id), "restarts"), strconv.Itoa(restarts)); err != nil {
		n.log.Warn("cannot record a workload's restart count; the next nexlet counts its restarts from zero", "workload_id", id, "err", err)
	}
}

// readRestarts returns the restart number of the newest launch (0: its first, or none
// recorded).
func (n *Nexlet) readRestarts(id string) int {
	b, err := os.ReadFile(filepath.Join(n.recordDir(id), "restarts"))
	if err != nil {
		return 0
	}
	r, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || r < 0 {
		return 0
	}
	return r
}

// launchRecord is a relaunch's launch record (see the top of this file).
type launchRecord struct {
	restarts int
	run      string // the run the restart follows, as runOf names it
	t0       uint64 // the relaunch forked at this clock tick or later
	uid      uint32 // as this dynamic uid, when hasUID
	hasUID   bool
}

// writeLaunch records a relaunch about to fork (restart restarts after the run the pid
// record names now, as u: its uid when dynamic) with the clock tick before its fork.
func (n *Nexlet) writeLaunch(id string, restarts int, u ident) {
	t0, err := procid.Ticks()
	if err == nil {
		uid := "-"
		if u.dynamic {
			uid = strconv.FormatUint(uint64(u.uid), 10)
		}
		text := strconv.Itoa(restarts) + " run=" + n.runOf(id) + " t0=" + strconv.FormatUint(t0, 10) + " uid=" + uid
		err = writeAtomic(filepath.Join(n.recordDir(id), "launch"), text)
	}
	if err != nil {
		n.log.Warn("cannot record a workload's relaunch before its fork; a nexlet killed before its pid record makes the restart again", "workload_id", id, "err", err)
	}
}

// readLaunch returns a workload's launch record, if any.
func (n *Nexlet) readLaunch(id string) (launchRecord, bool) {
	b, err := os.ReadFile(filepath.Join(n.recordDir(id), "launch"))
	if err != nil {
		return launchRecord{}, false
	}
	f := strings.Fields(string(b))
	if len(f) != 4 {
		return launchRecord{}, false
	}
	var l launchRecord
	var err1, err2, err3 error
	var uid uint64
	l.restarts, err1 = strconv.Atoi(f[0])
	run, ok1 := strings.CutPrefix(f[1], "run=")
	t0, ok2 := strings.CutPrefix(f[2], "t0=")
	u, ok3 := strings.CutPrefix(f[3], "uid=")
	l.t0, err2 = strconv.ParseUint(t0, 10, 64)
	if u != "-" {
		uid, err3 = strconv.ParseUint(u, 10, 32)
		l.hasUID = true
	}
	if err1 != nil || err2 != nil || err3 != nil || !ok1 || !ok2 || !ok3 || l.restarts < 0 {
		return launchRecord{}, false
	}
	l.run, l.uid = run, uint32(uid)
	return l, true
}

// launchedAt is when the recorded process was launched (its pid record's time).
func (n *Nexlet) launchedAt(id string) (time.Time, bool) {
	st, err := os.Stat(filepath.Join(n.recordDir(id), "pid"))
	if err != nil {
		return time.Time{}, false
	}
	return st.ModTime(), true
}

func (n *Nexlet) removeRecord(id string) {
	if err := os.RemoveAll(n.recordDir(id)); err != nil {
		n.log.Warn("remove workload record", "workload_id", id, "err", err)
	}
}

func writeAtomic(path, text string) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(text), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// newFIFO makes a fresh named FIFO dir/name and returns the nexlet's read end (a
// non-blocking descriptor for its watcher) and the workload's end (blocking,
// read-write).
func newFIFO(dir, name string) (r int, w *os.File, err error) {
	if w, err = fifo.NewWriter(dir, name, PipeBufferSize); err != nil {
		return -1, nil, err
	}
	if r, err = fifo.OpenReaderFd(w.Name()); err != nil {
		w.Close()
		return -1, nil, err
	}
	return r, w, nil
}

// openFIFOReader opens an existing FIFO for reading without blocking.
func openFIFOReader(path string) (int, error) { return fifo.OpenReaderFd(path) }

// RecentlyStopped implements nexlet.StopRememberer: the workloads this nexlet stopped
// at a request within the last hour (recentStops; not those a restart of the nexlet
// itself forgot).
func (n *Nexlet) RecentlyStopped() []string { return n.recentStops.IDs(time.Now()) }

// HeldWorkloads implements nexlet.WorkloadHolder: the workloads in the table and those
// with a record left by an earlier nexlet process (running, or ended with a tombstone).
// A stored job missing from it ran before and is not started again. Not those stopped
// whose record is still being removed (n.tidying: a stop's tidy, or a stop an earlier
// nexlet process did not finish): RecentlyStopped lists them.
func (n *Nexlet) HeldWorkloads() []string {
	held := map[string]bool{}
	entries, err := os.ReadDir(filepath.Join(n.cfg.RuntimeDir, "procs"))
	if err != nil && !os.IsNotExist(err) {
		n.log.Warn("workload records unreadable; reporting only the workloads in the table", "err", err)
	}
	n.mu.Lock()
	for _, e := range entries {
		if _, stopped := n.tidying[e.Name()]; !stopped && e.IsDir() && validID(e.Name()) { // not a ready one (recordPool)
			held[e.Name()] = true
		}
	}
	for id := range n.workloads {
		held[id] = true
	}
	n.mu.Unlock()
	return slices.Sorted(maps.Keys(held))
}
