package native

import (
	"log/slog"
	"os"
	"strconv"
	"strings"
)

// DefaultUIDPool is how many dynamic uids the nexlet leases ahead (refilled, with one
// walk of /proc, once half of them are taken).
const DefaultUIDPool = 8

// uidPool keeps a few dynamic uids leased ahead, so a deploy takes one instead of
// walking /proc. Pooled leases name /proc/<nexlet pid> as their owner: they are held
// while this nexlet lives and stale (free for anyone) once it is gone, so a crash
// leaks nothing. Taking one re-checks the host's users and groups and rewrites the
// lease to the workload's directory under the lease lock.
type uidPool struct {
	u     *users
	log   *slog.Logger
	owner string
	ch    chan ident
	kick  chan struct{}
	stop  chan struct{}
	done  chan struct{}
}

// startPool starts the pool's filler goroutine; stopPool waits for it.
func (u *users) startPool(size int, log *slog.Logger) {
	p := &uidPool{u: u, log: log, owner: "/proc/" + strconv.Itoa(os.Getpid()),
		ch: make(chan ident, size), kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	u.pool = p
	go p.run()
}

func (p *uidPool) run() {
	defer close(p.done)
	for {
		// Refilled only once half is taken, all at once: one walk of /proc per
		// cap/2 deploys rather than one per deploy.
		if missing := cap(p.ch) - len(p.ch); missing > 0 && len(p.ch) <= cap(p.ch)/2 {
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
			for _, id := range ids {
				p.ch <- id
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

// take hands out a pooled uid, leased to owner from now on.
func (p *uidPool) take(owner string) (ident, bool) {
	defer func() {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}()
	for {
		var id ident
		select {
		case id = <-p.ch:
		default:
			return ident{}, false
		}
		ok, err := p.claim(id, owner)
		if err != nil {
			return ident{}, false
		}
		if ok {
			return id, true
		}
	}
}

// claim moves the lease of a pooled uid to owner; false when the uid became a host
// user or group, or the lease is no longer the pool's, since it was leased.
func (p *uidPool) claim(id ident, owner string) (bool, error) {
	unlock, err := p.u.lock()
	if err != nil {
		return false, err
	}
	defer unlock()
	path := p.u.leasePath(id.uid)
	b, err := os.ReadFile(path)
	if err != nil || strings.TrimSpace(string(b)) != p.owner {
		return false, nil
	}
	if hostUses(id.uid) {
		_ = os.Remove(path)
		return false, nil
	}
	if err := os.WriteFile(path, []byte(owner+"\n"), 0o600); err != nil {
		return false, err
	}
	return true, nil
}

// drain gives back the leases still pooled.
func (p *uidPool) drain() {
	for {
		select {
		case id := <-p.ch:
			if unlock, err := p.u.lock(); err == nil {
				if b, err := os.ReadFile(p.u.leasePath(id.uid)); err == nil && strings.TrimSpace(string(b)) == p.owner {
					_ = os.Remove(p.u.leasePath(id.uid))
				}
				unlock()
			}
		default:
			return
		}
	}
}

// stopPool ends the filler and frees the pooled leases; safe without a pool.
func (u *users) stopPool() {
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
