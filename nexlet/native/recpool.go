package native

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// DefaultRecordPool is how many record directories the nexlet keeps ready.
const DefaultRecordPool = 2

// recordPoolPrefix names the ready record directories; workload ids have no dot.
const recordPoolPrefix = ".ready-"

// exitReserveName is a ready record directory's reserve of its first run's exit record
// (procid.MakeReserve), moved to nexd's exits directory at the launch (reserveExit).
const exitReserveName = "exit.reserve"

// pidRecordSize is the size pid.tmp is made with in a ready record directory: more
// than any pid record, which writeReadyPID writes into it in place, padded.
const pidRecordSize = 64

// recordPool keeps a few record directories ready (<runtime>/procs/.ready-<pid>-<start>-<n>),
// each with its two output FIFOs made and open, a pid.tmp for the pid record
// (writeReadyPID) and, with nexd's exits directory, the space of the first run's exit
// record (exitReserveName), each written already so that their space is taken ahead
// (a full runtime directory does not keep the launch from recording its pid, nor nexd
// from recording the exit of a run whose nexlet died), so that a deploy renames one to
// the workload's id instead of making the directory, the FIFOs and files on its way (per FIFO a mkfifo, two opens and a
// pipe size change: 0.2-0.3 ms of a deploy). What a workload
// finds is the same either way: the FIFOs are new, and the rename happens before its
// fork, so a nexlet that dies after it finds the record where it always was. A nexlet
// that dies leaves its ready directories behind; the next one removes them (no
// workload ever held their FIFOs).
type recordPool struct {
	dir  string // <runtime>/procs
	self string // readyPrefix of this process
	// exits: each ready directory holds an exit record's reserve (nexd's exits
	// directory is known).
	exits bool
	log   *slog.Logger
	seq   int // the filler's
	pool  chan *readyRecord
	kick  chan struct{}
	stop  chan struct{}
	done  chan struct{}
}

// readyRecord is one record directory with both FIFOs open: the nexlet's read ends
// and the workload's ends (see newFIFO).
type readyRecord struct {
	dir        string
	outR, errR int
	outW, errW *os.File
}

func (r *readyRecord) close() {
	unix.Close(r.outR)
	unix.Close(r.errR)
	r.outW.Close()
	r.errW.Close()
}

// newRecordPool removes the ready directories of nexlets that are gone and starts the
// filler; stopRecordPool waits for it. Nil (no pool: deploys make their own) when this
// process cannot name its own ready directories.
func newRecordPool(dir string, size int, exits bool, begin <-chan struct{}, log *slog.Logger) *recordPool {
	self, err := readyPrefix()
	if err != nil {
		log.Warn("no workload record directories made ahead", "err", err)
		return nil
	}
	removeStaleReady(dir)
	p := &recordPool{dir: dir, self: self, exits: exits, log: log, pool: make(chan *readyRecord, size),
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run(begin)
	return p
}

// readyPrefix starts the names of this process's ready directories:
// .ready-<pid>-<start time>-. A pid alone is not enough: a dead nexlet's pid reused by
// another process would keep its directories forever, among them homes owned by pooled
// uids that a later workload given that uid could enter (uidPool).
func readyPrefix() (string, error) {
	self, err := procid.Of(os.Getpid())
	if err != nil {
		return "", err
	}
	return recordPoolPrefix + self.String() + "-", nil
}

// readyOwner is the process that made a ready directory, from the rest of its name
// after recordPoolPrefix (<pid>-<start time>-<n>); false when the name is not of that
// form.
func readyOwner(rest string) (procid.ID, bool) {
	f := strings.Split(rest, "-")
	if len(f) != 3 || f[2] == "" {
		return procid.ID{}, false
	}
	id, err := procid.Parse(f[0] + " " + f[1])
	return id, err == nil
}

// removeStaleReady removes the ready directories whose nexlet no longer runs: no
// process runs with the pid and start time in the name (a live one's, during a
// hand-over, stay with it). Ones of this process are removed too: a pool starts with
// none of its own, so they were left by an earlier pool of this process. Malformed
// names (including the pid-only form of older nexlets) are removed as well: only
// nexlets make names with this prefix (workload ids have no dot), and keeping one
// whose owner cannot be proven to run could keep a pooled uid's home forever; a
// still-running older nexlet whose directory goes only makes its deploy its own.
func removeStaleReady(dir string) {
	self, _ := procid.Of(os.Getpid())
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), recordPoolPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		if id, ok := readyOwner(rest); ok && id != self && id.Alive() {
			continue
		}
		_ = os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

func (p *recordPool) run(begin <-chan struct{}) {
	defer close(p.done)
	if begin != nil {
		select {
		case <-begin:
		case <-p.stop:
			p.drain()
			return
		}
	}
	for {
		for len(p.pool) < cap(p.pool) {
			select {
			case <-p.stop:
				p.drain()
				return
			default:
			}
			r, err := p.make()
			if err != nil {
				p.log.Warn("no workload record directory made ahead; deploys make their own", "err", err)
				break
			}
			p.pool <- r // only the filler adds: never blocks
		}
		select {
		case <-p.kick:
		case <-p.stop:
			p.drain()
			return
		}
	}
}

func (p *recordPool) make() (*readyRecord, error) {
	p.seq++
	r := &readyRecord{dir: filepath.Join(p.dir, p.self+strconv.Itoa(p.seq))}
	var err error
	if r.outR, r.outW, err = newFIFO(r.dir, "stdout"); err != nil {
		_ = os.RemoveAll(r.dir)
		return nil, err
	}
	if r.errR, r.errW, err = newFIFO(r.dir, "stderr"); err != nil {
		unix.Close(r.outR)
		r.outW.Close()
		_ = os.RemoveAll(r.dir)
		return nil, err
	}
	// The pid record's file, its space taken, for the launch to write into
	// (writeReadyPID).
	f, err := os.OpenFile(filepath.Join(r.dir, "pid.tmp"), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err == nil {
		_, err = f.Write(bytes.Repeat([]byte{'\n'}, pidRecordSize))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
	}
	if err == nil && p.exits {
		err = procid.MakeReserve(filepath.Join(r.dir, exitReserveName))
	}
	if err != nil {
		r.close()
		_ = os.RemoveAll(r.dir)
		return nil, err
	}
	return r, nil
}

// take renames a ready directory to dst (which must not exist) and returns it; nil
// when none is ready or the rename failed: the caller then makes its own.
func (p *recordPool) take(dst string) *readyRecord {
	if p == nil {
		return nil
	}
	var r *readyRecord
	select {
	case r = <-p.pool:
	default:
		return nil
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
	if err := os.Rename(r.dir, dst); err != nil {
		r.close()
		_ = os.RemoveAll(r.dir)
		return nil
	}
	r.dir = dst
	return r
}

// drain closes and removes what is still ready.
func (p *recordPool) drain() {
	for {
		select {
		case r := <-p.pool:
			r.close()
			_ = os.RemoveAll(r.dir)
		default:
			return
		}
	}
}

// stopRecordPool ends the filler and removes the ready directories; safe on nil.
func (p *recordPool) stopRecordPool() {
	if p == nil {
		return
	}
	select {
	case <-p.stop:
	default:
		close(p.stop)
	}
	<-p.done
}
