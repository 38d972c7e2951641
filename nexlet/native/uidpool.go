package native

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultUIDPool is how many dynamic uids the nexlet leases ahead (refilled, with one
// walk of /proc, once half of them are taken).
const DefaultUIDPool = 8

// uidPool keeps a few dynamic uids leased ahead, so a deploy takes one instead of
// walking /proc. Pooled leases name /proc/<nexlet pid> as their owner: they are held
// while this nexlet lives and stale (free for anyone) once it is gone, so a crash
// leaks nothing. Taking one re-checks the host's users and groups and rewrites the
// lease to the workload's directory under the lease lock.
//
// Each pooled uid comes with its workload directory made ahead
// (<workloads>/.ready-<pid>-<start>-<uid>, as makeWorkloadDirs makes it for that uid), which a
// deploy renames to the workload's id: the directory, its identity file and home with
// their owners and modes cost 0.1-0.4 ms of a deploy. It is renamed into place before
// the lease names it, so the lease never names a directory that is not there.
type uidPool struct {
	u     *users
	log   *slog.Logger
	owner string
	wdir  string         // where the directories are made ahead; "" for none
	self  string         // readyPrefix of this process
	ch    chan pooledUID // cap: the most it ever holds (poolGrowth times its size)
	kick  chan struct{}
	stop  chan struct{}
	done  chan struct{}
	// shared: wdir is a directory of /run/nex-workloads (see startPool)
	shared bool

	// want is how many it keeps leased ahead: its size, doubled (up to cap(ch)) each
	// time a deploy found it empty, so that concurrent deploys share the filler's
	// walks instead of each walking /proc on its path.
	want  atomic.Int32
	begun atomic.Bool // the filler runs (it may wait for the nexlet's start-up)
	dry   atomic.Bool // its last refill leased nothing (the range is used up)
}

// poolGrowth bounds how far a pool grows beyond its size under concurrent deploys.
const poolGrowth = 8

// poolWait bounds how long a deploy that found the pool empty waits for its refill
// before it leases a uid itself.
const poolWait = time.Second

// pooledUID is a uid leased ahead and the workload directory made for it ("": none).
type pooledUID struct {
	id  ident
	dir string
}

// startPool starts the pool's filler goroutine; stopPool waits for it. Directories
// made ahead by a nexlet that is gone are removed first.
//
// shared says wdir is one of /run/nex-workloads/<hash>: once the nexlet registered, the
// filler also removes those of that base that no live nexlet holds and that hold
// nothing but what dead nexlets left (sweepWorkloadDirs).
func (u *users) startPool(size int, wdir string, shared bool, begin <-chan struct{}, log *slog.Logger) {
	self, err := readyPrefix()
	if err != nil && wdir != "" {
		log.Warn("no workload directories made ahead", "err", err)
		wdir = ""
	}
	if wdir != "" {
		removeStaleReady(wdir)
	}
	p := &uidPool{u: u, log: log, owner: "/proc/" + strconv.Itoa(os.Getpid()), wdir: wdir, shared: shared, self: self,
		ch: make(chan pooledUID, poolGrowth*size), kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	p.want.Store(int32(size))
	u.pool = p
	go p.run(begin)
}

// prepare makes the workload directory of a pooled uid; "" when it could not (the
// deploy then makes its own).
func (p *uidPool) prepare(id ident) string {
	if p.wdir == "" {
		return ""
	}
	dir := filepath.Join(p.wdir, p.self+strconv.FormatUint(uint64(id.uid), 10))
	_ = os.RemoveAll(dir)
	if err := makeWorkloadDirs(dir, id); err != nil {
		p.log.Debug("workload directory not made ahead", "dir", dir, "err", err)
		_ = os.RemoveAll(dir)
		return ""
	}
	return dir
}

func (p *uidPool) run(begin <-chan struct{}) {
	defer close(p.done)
	if begin != nil {
		select {
		case <-begin:
		case <-p.stop:
			p.drain()
			return
		}
	}
	p.begun.Store(true)
	// What nexlets killed before this one left (leases of their pooled uids, lock
	// files): its walk of /proc serves the first refill too (walkReuse).
	if leases, locks, err := p.u.sweepStale(); err != nil {
		p.log.Warn("stale dynamic uid leases not all removed", "leases", leases, "lock_files", locks, "err", err)
	} else if leases+locks > 0 {
		p.log.Info("removed what nexlets that are gone left of their dynamic uids", "leases", leases, "lock_files", locks)
	}
	// Leftover trees a killed nexlet's release had moved aside and not removed yet:
	// beside the refills, not before them (a tree of any size may be left), and until
	// the stop at most (waited for before done closes).
	var sweep sync.WaitGroup
	defer sweep.Wait()
	sweep.Go(func() {
		switch n, err := sweepAside(p.u.asideRoots.dirs(), p.stop, p.u.sweepingAside); {
		case errors.Is(err, errSweepStopped):
			p.log.Info("removal of leftovers of nexlets that are gone stopped; the next start goes on with it", "dirs", n)
		case err != nil:
			p.log.Warn("leftovers of nexlets that are gone not all removed", "removed", n, "err", err)
		case n > 0:
			p.log.Info("removed leftovers of nexlets that are gone", "dirs", n)
		}
	})
	if p.shared && p.wdir != "" {
		if n := sweepWorkloadDirs(filepath.Dir(p.wdir), p.wdir, p.u); n > 0 {
			p.log.Info("removed workloads directories that nexlets that are gone left", "base", filepath.Dir(p.wdir), "dirs", n)
		}
	}
	for {
		// Refilled only once half is taken, all at once: one walk of /proc per
		// want/2 deploys rather than one per deploy.
		want := int(p.want.Load())
		if missing := want - len(p.ch); missing > 0 && len(p.ch) <= want/2 {
			select {
			case <-p.stop:
				p.drain()
				return
			default:
			}
			ids, err := p.u.leaseFreshN(p.owner, missing)
			if err != nil {
				p.log.Warn("dynamic uid pool: no uid leased ahead", "err", err)
			}
			p.dry.Store(len(ids) == 0)
			for _, id := range ids {
				p.ch <- pooledUID{id: id, dir: p.prepare(id)}
			}
		}
		select {
		case <-p.kick:
		case <-p.stop:
			p.drain()
			return
		}
	}
}

// take hands out a pooled uid, leased to owner (the workload's directory) from now on;
// made says the directory was made ahead and is now in place at owner.
func (p *uidPool) take(owner string) (id ident, made, ok bool) {
	defer func() {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}()
	for {
		var e pooledUID
		select {
		case e = <-p.ch:
		default:
			if p.u.short != nil {
				p.u.short()
			}
			if e, ok = p.await(); !ok {
				return ident{}, false, false
			}
		}
		made, ok, err := p.claim(e, owner)
		if err != nil {
			return ident{}, false, false
		}
		if ok {
			return e.id, made, true
		}
	}
}

// claim moves the lease of a pooled uid to owner and puts the directory made for it
// in place (made), or an empty one; false when the uid became a host user or group, or
// the lease is no longer the pool's, since it was leased. Under the lease lock, the
// lease is rewritten before the directory is renamed: a nexlet killed in between
// leaves a lease naming a directory that is not there (stale, the uid free again) and
// its ready directory (removed by the next nexlet), never a workload directory with the
// uid's identity whose lease is not its own (whose cleanup would release a uid another
// workload may hold by then).
func (p *uidPool) claim(e pooledUID, owner string) (made, ok bool, err error) {
	unlock, err := p.u.lock()
	if err != nil {
		if e.dir != "" {
			_ = os.RemoveAll(e.dir)
		}
		return false, false, err
	}
	defer unlock()
	path := p.u.leasePath(e.id.uid)
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		p.u.sd.drop(e.id.uid) // nobody leases it now
		err = nil
	case err != nil || leaseOwner(b) != p.owner || p.u.retiredBySelf(b): // a retired lease is a workload's
		err = nil
	case p.u.hosts.uses(e.id.uid):
		_ = os.Remove(path)
		p.u.sd.drop(e.id.uid)
	default:
		if err = writeLease(path, owner); err != nil {
			break
		}
		if e.dir != "" && os.Rename(e.dir, owner) == nil {
			return true, true, nil
		}
		if merr := os.Mkdir(owner, 0o700); merr != nil && !errors.Is(merr, fs.ErrExist) {
			_ = os.Remove(path)
			p.u.sd.drop(e.id.uid)
			err = fmt.Errorf("directory: %w", merr)
			break
		}
		ok = true
	}
	if e.dir != "" {
		_ = os.RemoveAll(e.dir)
	}
	return false, ok, err
}

// await is take's wait for a refill of an empty pool, which it makes larger: false
// when none came within poolWait, or none will (the filler has not begun, its last
// refill found no free uid, or it stops).
func (p *uidPool) await() (pooledUID, bool) {
	if !p.begun.Load() || p.dry.Load() {
		return pooledUID{}, false
	}
	if w := p.want.Load(); int(w) < cap(p.ch) {
		p.want.CompareAndSwap(w, min(2*w, int32(cap(p.ch))))
	}
	select {
	case p.kick <- struct{}{}:
	default:
	}
	t := time.NewTimer(poolWait)
	defer t.Stop()
	select {
	case e := <-p.ch:
		return e, true
	case <-t.C:
	case <-p.stop:
	}
	return pooledUID{}, false
}

// drain gives back the leases still pooled.
func (p *uidPool) drain() {
	for {
		select {
		case e := <-p.ch:
			id := e.id
			if e.dir != "" {
				_ = os.RemoveAll(e.dir)
			}
			if unlock, err := p.u.lock(); err == nil {
				if b, err := os.ReadFile(p.u.leasePath(id.uid)); err == nil && leaseOwner(b) == p.owner && !p.u.retiredBySelf(b) {
					_ = os.Remove(p.u.leasePath(id.uid))
					p.u.sd.drop(id.uid)
				}
				unlock()
			}
		default:
			return
		}
	}
}

// stopPool ends the filler and frees the pooled leases, and ends the removal of the
// leftover trees stale leases' reuses and sweeps moved aside (stopAside), both at
// once; safe without a pool.
func (u *users) stopPool() {
	u.haltAside()
	defer u.stopAside()
	if u.pool == nil {
		return
	}
	select {
	case <-u.pool.stop:
	default:
		close(u.pool.stop)
	}
	<-u.pool.done
}
