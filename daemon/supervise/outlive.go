package supervise

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/fifo"
	"github.com/nexd-project/nexd/internal/procid"
)

// A nexlet with Spec.Outlive may outlive its supervisor, as containerd's shims outlive
// containerd: Detach then Stop leaves it running (it stays the parent and reaper of its
// workloads and keeps their exit statuses), and the next supervisor with the same
// RecordDir adopts it instead of starting a second one. For that the running process is
// recorded (pid and start time: a pid alone can be reused) and its output goes through
// named FIFOs that the next supervisor opens again.

// SignalReattach is sent to an adopted nexlet: a new supervisor watches it now; it
// should register with the node again.
const SignalReattach = syscall.SIGHUP

// outputBuffer is the pipe buffer of an outliving nexlet's output FIFOs: what it may
// log while no supervisor reads.
const outputBuffer = 1 << 20

// Record is what the supervisor keeps about a running nexlet that may outlive it.
type Record struct {
	Name  string            `json:"name"`
	PID   int               `json:"pid"`
	Start uint64            `json:"start_time"` // clock ticks since boot (procid)
	Meta  map[string]string `json:"meta,omitempty"`
}

// ID is the recorded process.
func (r Record) ID() procid.ID { return procid.ID{PID: r.PID, Start: r.Start} }

func recordPath(dir, name string) string { return filepath.Join(dir, name, "process.json") }

// ReadRecord returns the record of nexlet name in dir when its process still runs.
func ReadRecord(dir, name string) (Record, bool) {
	if dir == "" {
		return Record{}, false
	}
	b, err := os.ReadFile(recordPath(dir, name))
	if err != nil {
		return Record{}, false
	}
	var r Record
	if json.Unmarshal(b, &r) != nil || r.Name != name || r.PID <= 1 || !r.ID().Alive() {
		return Record{}, false
	}
	return r, true
}

func writeRecord(dir string, r Record) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	path := recordPath(dir, r.Name)
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	tmp := path + ".new"
	_ = os.Remove(tmp)
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

func removeRecord(dir, name string) {
	if dir != "" {
		_ = os.Remove(recordPath(dir, name))
	}
}

// outlives reports whether this nexlet is recorded and may be left running.
func (n *nexlet) outlives() bool {
	return n.spec.Outlive && n.s.opts.RecordDir != "" && n.s.opts.FIFODir != ""
}

// outputPipes makes the nexlet's stdout and stderr: named FIFOs for one that may
// outlive the supervisor, else plain pipes. It returns the read ends and the child's.
func (n *nexlet) outputPipes() (outR, outW, errR, errW *os.File, err error) {
	if n.outlives() {
		dir := n.s.opts.FIFODir
		if outR, outW, err = fifo.New(dir, n.spec.Name+".stdout", outputBuffer); err != nil {
			return nil, nil, nil, nil, err
		}
		if errR, errW, err = fifo.New(dir, n.spec.Name+".stderr", outputBuffer); err != nil {
			outR.Close()
			outW.Close()
			return nil, nil, nil, nil, err
		}
		return outR, outW, errR, errW, nil
	}
	if outR, outW, err = os.Pipe(); err != nil {
		return nil, nil, nil, nil, err
	}
	if errR, errW, err = os.Pipe(); err != nil {
		outR.Close()
		outW.Close()
		return nil, nil, nil, nil, err
	}
	return outR, outW, errR, errW, nil
}

// record writes the record of a freshly started outliving nexlet.
func (n *nexlet) record(pid int) {
	if !n.outlives() {
		return
	}
	id, err := procid.Of(pid)
	if err == nil {
		r := Record{Name: n.spec.Name, PID: pid, Start: id.Start}
		if n.s.opts.Meta != nil {
			r.Meta = n.s.opts.Meta(n.spec.Name)
		}
		err = writeRecord(n.s.opts.RecordDir, r)
	}
	if err != nil {
		n.s.log.Warn("cannot record the nexlet's process; the next nexd will start a new one", "nexlet", n.spec.Name, "err", err)
	}
}

// EndRecorded ends a recorded nexlet that must not be adopted (it was started for
// another node): SIGKILL through a pidfd, never by its pid, which may have been reused.
// It waits up to bound for the process to end and removes the record either way. A
// process already gone is not an error.
func EndRecorded(dir string, r Record, bound time.Duration) error {
	defer removeRecord(dir, r.Name)
	pidfd, err := procid.OpenPidfd(r.ID())
	if err != nil {
		if !r.ID().Alive() {
			return nil
		}
		return err
	}
	defer pidfd.Close()
	if err := procid.SignalPidfd(pidfd, unix.SIGKILL); err != nil {
		return fmt.Errorf("kill nexlet %s (pid %d): %w", r.Name, r.PID, err)
	}
	ended := make(chan error, 1)
	go func() { ended <- procid.WaitPidfd(pidfd) }() // ends with the process or the close below
	select {
	case err := <-ended:
		return err
	case <-time.After(bound):
		pidfd.Close()
		<-ended
		return fmt.Errorf("nexlet %s (pid %d) still runs %s after SIGKILL", r.Name, r.PID, bound)
	}
}

// adoptable returns the record of a live nexlet of this name left by an earlier
// supervisor, once: later runs start new processes.
func (n *nexlet) adoptable() (Record, bool) {
	if !n.outlives() || n.adoptTried {
		return Record{}, false
	}
	n.adoptTried = true
	for _, a := range n.s.opts.Adopt {
		if a == n.spec.Name {
			return n.s.record(n.spec.Name)
		}
	}
	return Record{}, false
}

// record is the record of nexlet name whose process still runs: the one handed over
// in memory, else the file in RecordDir.
func (s *Supervisor) record(name string) (Record, bool) {
	if r, ok := s.opts.Handed[name]; ok {
		if r.Name == name && r.PID > 1 && r.ID().Alive() {
			return r, true
		}
		return Record{}, false
	}
	return ReadRecord(s.opts.RecordDir, name)
}

// adopted is a nexlet process taken over from an earlier supervisor.
type adopted struct {
	pid    int
	signal func(os.Signal) error
	waited <-chan error // receives once the process has ended
	// wstatus is how it ended, once waited has fired; nil when unknown (a process
	// that is not our child cannot be waited for).
	wstatus    *syscall.WaitStatus
	outR, errR *os.File
	child      bool // our child (adopted across an execve of nexd)
}

// adopt takes over a recorded nexlet: a pidfd tells when it ends (it may not be our
// child: then its exit status is unknown), its FIFOs are opened again and it is told
// to register again (SignalReattach).
func (n *nexlet) adopt(rec Record) (*adopted, error) {
	r := n.s.reaper
	if r != nil {
		// Across an execve the nexlet is still our child: the reaper must leave its
		// exit to us.
		r.forkMu.Lock()
		r.started(rec.PID)
		r.forkMu.Unlock()
	}
	fail := func(err error) (*adopted, error) {
		if r != nil {
			r.waited(rec.PID)
		}
		return nil, err
	}
	pidfd, err := procid.OpenPidfd(rec.ID())
	if err != nil {
		return fail(err)
	}
	dir := n.s.opts.FIFODir
	outR, err := fifo.OpenReader(filepath.Join(dir, n.spec.Name+".stdout"))
	if err != nil {
		pidfd.Close()
		return fail(err)
	}
	errR, err := fifo.OpenReader(filepath.Join(dir, n.spec.Name+".stderr"))
	if err != nil {
		pidfd.Close()
		outR.Close()
		return fail(err)
	}
	st, _ := procid.ReadStat(rec.PID)
	p := &adopted{pid: rec.PID, outR: outR, errR: errR, child: st.PPID == os.Getpid()}
	p.signal = func(sig os.Signal) error {
		s, ok := sig.(syscall.Signal)
		if !ok {
			return errors.New("not a syscall signal")
		}
		// Through the pidfd (failing once it is closed), never by pid: the pid of a
		// process that is not our child may be reused.
		return procid.SignalPidfd(pidfd, s)
	}
	waited := make(chan error, 1)
	p.waited = waited
	go func() { // ends when the adopted process does
		err := procid.WaitPidfd(pidfd)
		if p.child && err == nil {
			var ws syscall.WaitStatus
			if got, werr := syscall.Wait4(rec.PID, &ws, 0, nil); werr == nil && got == rec.PID {
				p.wstatus = &ws
			}
		}
		if r != nil {
			r.waited(rec.PID)
		}
		pidfd.Close()
		waited <- err
	}()
	if err := p.signal(SignalReattach); err != nil {
		n.s.log.Warn("cannot tell the adopted nexlet to register again", "nexlet", n.spec.Name, "pid", rec.PID, "err", err)
	}
	return p, nil
}

// exitOf describes how an adopted process ended.
func (p *adopted) exitOf() (code int, reason string) {
	if p.wstatus == nil {
		return -1, "exited (an adopted nexlet that is not nexd's child: exit status unknown)"
	}
	ex := procid.ExitOf(*p.wstatus)
	return ex.Code, ex.Reason
}

// exeReplaced reports whether process pid runs another file than path now names (an
// upgrade replaced the binary).
func exeReplaced(pid int, path string) bool {
	a, err := os.Stat("/proc/" + strconv.Itoa(pid) + "/exe")
	if err != nil {
		return false
	}
	b, err := os.Stat(path)
	return err == nil && !os.SameFile(a, b)
}
