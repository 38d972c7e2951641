package native

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nexd-project/nexd/internal/stopmemo"
)

// A stop the node asked for is recorded in <runtime>/stops/<id> before its SIGTERM
// (markStopping), and the file is kept as long as the nexlet's stop memory keeps the
// stop (an hour, the last 1024), so that the stop outlives the nexlet. Killed mid-stop
// (in its grace, or between its answer and the node's removal of the workload from its
// state), the nexlet leaves it, and the next one remembers the stop, lists it among the
// workloads it stopped at a request (RecentlyStopped, nexd_stopped: the node then
// removes the workload from its state instead of starting it again), and, while the
// workload's record is still there, finishes the stop instead of adopting the
// workload or restarting it by its policy. Before, with nexd killed too, the next nexd
// replayed the stopped service and it ran on (e2e TestStopCutShortByKillsStaysStopped).

func (n *Nexlet) stopsDir() string { return filepath.Join(n.cfg.RuntimeDir, "stops") }

// markStopping records that w is being stopped with grace: one small tmpfs write,
// before the signal, so a stop whose SIGTERM went out is always on record. An error
// says it is not on record.
func (n *Nexlet) markStopping(w *workload, grace time.Duration) error {
	text := fmt.Sprintf("%d %d %s %s", time.Now().UnixMilli(), grace.Milliseconds(), w.ns, w.req.Request.WorkloadType)
	path := filepath.Join(n.stopsDir(), w.id)
	err := os.WriteFile(path, []byte(text), 0o600)
	if errors.Is(err, fs.ErrNotExist) { // made at New; gone since (a test's bare nexlet)
		if err = os.MkdirAll(n.stopsDir(), 0o700); err == nil {
			err = os.WriteFile(path, []byte(text), 0o600)
		}
	}
	if err != nil {
		n.log.Warn("cannot record a stop; a nexlet killed before the node removed the workload leaves it to be started again", "workload_id", w.id, "err", err)
	}
	return err
}

// forgetStops removes the stop records of stops the memory forgot.
func (n *Nexlet) forgetStops(ids []string) {
	for _, id := range ids {
		if err := os.Remove(filepath.Join(n.stopsDir(), id)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			n.log.Warn("remove stop record", "workload_id", id, "err", err)
		}
	}
}

// stopMark is a stop recorded by an earlier nexlet process.
type stopMark struct {
	id    string
	at    time.Time
	grace time.Duration
	ns    string
	typ   string
}

func (n *Nexlet) readStopMark(id string) (stopMark, bool) {
	path := filepath.Join(n.stopsDir(), id)
	b, err := os.ReadFile(path)
	if err != nil {
		return stopMark{}, false
	}
	m := stopMark{id: id}
	f := strings.Fields(string(b))
	if len(f) >= 2 {
		ms, err1 := strconv.ParseInt(f[0], 10, 64)
		g, err2 := strconv.ParseInt(f[1], 10, 64)
		if err1 == nil && err2 == nil && validMillis(g) {
			m.at, m.grace = time.UnixMilli(ms), time.Duration(g)*time.Millisecond
		}
	}
	if m.at.IsZero() { // cut short by a kill: when it was written, and no grace left
		st, err := os.Stat(path)
		if err != nil {
			return stopMark{}, false
		}
		m.at = st.ModTime()
	}
	if len(f) >= 4 {
		m.ns, m.typ = f[2], f[3]
	}
	return m, true
}

// resumeStops reads the stops an earlier nexlet process recorded (New, before the
// nexlet registers): each within the memory's age is remembered as stopped, and one
// whose record is still there (its stop not finished: the record goes with the stop's
// tidy) is finished: its processes are left the rest of their grace, then killed, and
// what it left is removed. In n.tidying meanwhile, so HeldWorkloads leaves it out, a
// start of the same id waits for it, and the replay's leftover sweep leaves it alone.
// A record launched after the stop (the id deployed again) is not this stop's; one
// with the workload's end recorded (a detach during the stop) is left to the replay,
// which reports that end (TestStopAtDetachReportedOnce).
func (n *Nexlet) resumeStops() {
	if err := os.MkdirAll(n.stopsDir(), 0o700); err != nil {
		n.log.Warn("stop records: cannot make their directory", "dir", n.stopsDir(), "err", err)
		return
	}
	ents, err := os.ReadDir(n.stopsDir())
	if err != nil {
		n.log.Warn("stop records unreadable", "dir", n.stopsDir(), "err", err)
		return
	}
	var marks []stopMark
	var stale []string
	now := time.Now()
	for _, e := range ents {
		if !validID(e.Name()) {
			continue
		}
		m, ok := n.readStopMark(e.Name())
		switch {
		case !ok || now.Sub(m.at) > stopmemo.DefaultAge:
			stale = append(stale, e.Name())
		default:
			marks = append(marks, m)
		}
	}
	n.forgetStops(stale)
	slices.SortFunc(marks, func(a, b stopMark) int { return a.at.Compare(b.at) })
	for _, m := range marks {
		if st, err := os.Stat(filepath.Join(n.recordDir(m.id), "pid")); err == nil && st.ModTime().After(m.at) {
			continue // launched again after that stop
		}
		_, err := os.Stat(n.recordDir(m.id))
		finished := err != nil // the record goes with the stop's tidy
		if _, ended := n.readTombstone(m.id); !finished && ended {
			// Its end was recorded (a nexlet that detached while it stopped): the
			// replay reports it, and a service ended so is not started again.
			continue
		}
		n.mu.Lock()
		forgot := n.rememberStopLocked(m.id, stopmemo.Entry{Namespace: m.ns, Type: m.typ, How: "stopped; an earlier nexlet process began the stop", At: m.at})
		n.mu.Unlock()
		n.forgetStops(forgot)
		if finished {
			continue
		}
		done := make(chan struct{})
		n.mu.Lock()
		n.tidying[m.id] = done
		n.mu.Unlock()
		n.log.Info("finishing a stop an earlier nexlet process began", "workload_id", m.id, "asked_at", m.at, "grace", m.grace)
		n.bg.Go(func() {
			defer func() {
				n.mu.Lock()
				delete(n.tidying, m.id)
				n.mu.Unlock()
				close(done)
			}()
			n.finishResumedStop(m)
		})
	}
}

// finishResumedStop waits until the workload's processes are gone or its grace, counted
// from the recorded stop, is over, kills what is left and removes its leftovers and
// record. Detached meanwhile, it lets go: the record stays for the next nexlet.
func (n *Nexlet) finishResumedStop(m stopMark) {
	sb, err := n.iso.sandbox(m.id, Limits{})
	if err != nil {
		n.log.Warn("resumed stop: sandbox; its record stays for the next nexlet", "workload_id", m.id, "err", err)
		return
	}
	defer letGo(sb) // tidied below, or detached
	dir := filepath.Join(n.wdir, m.id)
	prev, _ := readIdent(dir)
	w := &workload{id: m.id, sb: sb, dir: dir, ident: prev}
	// The mark's time is the wall clock's: a clock stepped back since must not add the
	// step to the grace (backoffLeft bounds it by the grace, as for restart backoffs).
	deadline := time.Now().Add(backoffLeft(m.at, m.grace))
	reason := "exited after SIGTERM"
	for {
		procs, err := sb.procs()
		if err == nil && len(procs) == 0 {
			w.emptied = true
			break
		}
		if !time.Now().Before(deadline) {
			n.log.Warn("workload ignored SIGTERM; killing its group", "workload_id", m.id, "grace", m.grace)
			w.emptied = n.killAndWait(w)
			reason = fmt.Sprintf("killed after a stop grace of %s", m.grace)
			break
		}
		select {
		case <-n.abandon:
			return
		case <-time.After(min(50*time.Millisecond, time.Until(deadline))):
		}
	}
	n.cleanup(w, nil, false)
	n.removeRecord(m.id)
	n.log.Info("workload stopped", "workload_id", m.id, "namespace", m.ns, "reason", reason, "stop", "finished by the next nexlet process")
}
