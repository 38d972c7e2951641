package native

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// DefaultRecordPool is how many record directories the nexlet keeps ready.
const DefaultRecordPool = 2

// recordPoolPrefix names the ready record directories; workload ids have no dot.
const recordPoolPrefix = ".ready-"

// recordPool keeps a few record directories ready (<runtime>/procs/.ready-<pid>-<n>),
// each with its two output FIFOs made and open, so that a deploy renames one to the
// workload's id instead of making the directory and the FIFOs on its way (per FIFO a
// mkfifo, two opens and a pipe size change: 0.2-0.3 ms of a deploy). What a workload
// finds is the same either way: the FIFOs are new, and the rename happens before its
// fork, so a nexlet that dies after it finds the record where it always was. A nexlet
// that dies leaves its ready directories behind; the next one removes them (no
// workload ever held their FIFOs).
type recordPool struct {
	dir  string // <runtime>/procs
	log  *slog.Logger
	seq  int // the filler's
	pool chan *readyRecord
	kick chan struct{}
	stop chan struct{}
	done chan struct{}
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
// filler; stopRecordPool waits for it.
func newRecordPool(dir string, size int, log *slog.Logger) *recordPool {
	removeStaleReady(dir)
	p := &recordPool{dir: dir, log: log, pool: make(chan *readyRecord, size),
		kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	return p
}

// removeStaleReady removes ready directories whose nexlet no longer runs (a live one's,
// during a hand-over, stay with it).
func removeStaleReady(dir string) {
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), recordPoolPrefix)
		if !ok || !e.IsDir() {
			continue
		}
		pidText, _, _ := strings.Cut(rest, "-")
		if pid, err := strconv.Atoi(pidText); err == nil && pid != os.Getpid() && pid > 0 {
			if err := syscall.Kill(pid, 0); err == nil || errors.Is(err, syscall.EPERM) {
				continue
			}
		}
		_ = os.RemoveAll(filepath.Join(dir, e.Name()))
	}
}

func (p *recordPool) run() {
	defer close(p.done)
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
	r := &readyRecord{dir: filepath.Join(p.dir, recordPoolPrefix+strconv.Itoa(os.Getpid())+"-"+strconv.Itoa(p.seq))}
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
