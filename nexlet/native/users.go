package native

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/procid"
)

// Default dynamic uid range: systemd's DynamicUser= range, so that both allocators
// avoid users and groups of the host alike.
const (
	DefaultUIDMin = 61184
	DefaultUIDMax = 65519
	// DefaultLeaseDir holds one lease file per dynamic uid in use on the host; it is
	// shared by every nexd and native nexlet of the host, like /run/systemd/dynamic-uid.
	DefaultLeaseDir = "/run/nex-dynamic-uid"
)

// UserPolicy says which users workloads may run as.
type UserPolicy struct {
	// UIDMin..UIDMax (inclusive) is the dynamic uid range (default 61184-65519).
	UIDMin, UIDMax uint32
	// Allowed are the named users a start request may ask for (`user`).
	Allowed []string
	// AllowRoot lets a start request ask for root, and for a named user in AdminGroup.
	AllowRoot bool
	// AdminGroup is the group whose members are the node's admins (DefaultAdminGroup
	// when empty): a named user in it runs only with AllowRoot.
	AdminGroup string
	// LeaseDir is where dynamic uids are leased (default DefaultLeaseDir).
	LeaseDir string
	// Pool is how many dynamic uids are leased ahead, off the deploy path (0: none).
	Pool int
	// SystemdUIDDir is systemd's dynamic uid lock directory (DefaultSystemdUIDDir, as
	// Main sets it), whose lock on each leased uid the nexlet holds (sdLocks); "": the
	// nexlet takes none.
	SystemdUIDDir string
}

// ParseUIDRange parses "MIN-MAX".
func ParseUIDRange(s string) (uint32, uint32, error) {
	a, b, ok := strings.Cut(s, "-")
	lo, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	hi, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	if !ok || err1 != nil || err2 != nil || lo == 0 || hi < lo || hi >= 1<<31 {
		return 0, 0, fmt.Errorf("uid range %q: want MIN-MAX, 0 < MIN <= MAX < 2^31 (e.g. %d-%d)", s, DefaultUIDMin, DefaultUIDMax)
	}
	return uint32(lo), uint32(hi), nil
}

// ident is the user a workload runs as.
type ident struct {
	uid, gid uint32
	groups   []uint32
	name     string // "dynamic", a user name, "root", or the nexlet's own user
	dynamic  bool   // leased from the dynamic range
	// same: the nexlet is not root and the workload runs as the nexlet's own user.
	same bool
}

func (id ident) String() string {
	if id.dynamic {
		return fmt.Sprintf("dynamic uid %d", id.uid)
	}
	return fmt.Sprintf("%s (uid %d)", id.name, id.uid)
}

// users hands out workload identities.
type users struct {
	pol  UserPolicy
	root bool // the nexlet runs as root and can switch users
	self ident
	pool *uidPool // nil: every lease walks /proc on the deploy path
	proc string   // where processes are listed: /proc (a test points it elsewhere)
	// hosts: the host's users and groups, whose ids a dynamic uid must not have.
	hosts *hostIDs
	// sd holds systemd's locks on the leased uids; nil: none are taken (sdWarn says
	// why, when it matters).
	sd     *sdLocks
	sdWarn string

	// The uids of the latest whole walk of /proc (a release's or a lease's) and when
	// it began: a lease within walkReuse of it need not walk again (leaseFreshN).
	walkMu   sync.Mutex
	lastBusy map[uint32]bool
	lastWalk time.Time
	walks    atomic.Int64 // walks of /proc begun, for tests and benchmarks

	// releasing: the uids a release is killing by and freeing now; another release
	// of one of them (a start's and a stop's of the same workload) leaves it to that
	// one: done after it freed the uid and the uid was leased again, its kill would
	// reach the new holder's processes.
	relMu     sync.Mutex
	releasing map[uint32]bool

	// short, when set, is told that a deploy found no uid leased ahead: the stopped
	// workloads' tidies held for a quiet moment (quietGate) go now, so that their
	// uids' releases are not what keeps the range short.
	short func()

	// releaseChecked, when set (tests), is called by a release once keepRetired
	// checked its uids' leases, before it walks /proc and kills.
	releaseChecked func()
	// releaseWalked, when set (tests), is called by a release after a walk of /proc
	// that listed processes of its uids, before it kills them.
	releaseWalked func()
	// removingTree, when set (tests), is called with each leftover directory moved
	// aside (by a release, a stale lease's reuse, the sweep), just before its removal.
	removingTree func(path string)

	// sweepingAside, when set (tests), is called before each entry the pool's sweep of
	// leftovers of gone nexlets removes (sweepAside).
	sweepingAside func()

	// aside removes the trees a stale lease's reuse or the sweep of stale leases moved
	// aside, off their callers' path (handAside); stopPool stops it.
	aside asideRemoval
	// asideRoots: where leftover trees go aside and the start's sweep looks for gone
	// nexlets' (nil: the host's shared directories; a test's own: ownAsideRoots).
	asideRoots asideRoots

	// log takes what goes wrong off the callers' path (handAside); nil: nowhere.
	log *slog.Logger
}

// walkReuse is how old a walk of /proc a lease may take its busy uids from instead of
// walking again (see leaseFreshN).
const walkReuse = time.Second

// noteWalk keeps busy, the uids of a whole walk begun at, as the latest walk.
func (u *users) noteWalk(busy map[uint32]bool, at time.Time) {
	u.walkMu.Lock()
	defer u.walkMu.Unlock()
	if at.After(u.lastWalk) {
		u.lastBusy, u.lastWalk = busy, at
	}
}

// recentWalk is the busy uids of a walk begun within walkReuse; nil when there is none.
// The map is shared: read only.
func (u *users) recentWalk() map[uint32]bool {
	u.walkMu.Lock()
	defer u.walkMu.Unlock()
	if u.lastBusy == nil || time.Since(u.lastWalk) > walkReuse {
		return nil
	}
	return u.lastBusy
}

// walk is procUIDs, kept as the latest walk.
func (u *users) walk() (map[uint32]bool, error) {
	at := time.Now()
	u.walks.Add(1)
	busy, err := procUIDs(u.proc)
	if err == nil {
		u.noteWalk(busy, at)
	}
	return busy, err
}

// newUsers prepares the policy; fallbackLeaseDir is used when the default lease dir
// cannot be made (a read-only /run under systemd's ProtectSystem=strict).
func newUsers(pol UserPolicy, fallbackLeaseDir string) (*users, error) {
	if pol.UIDMin == 0 {
		pol.UIDMin, pol.UIDMax = DefaultUIDMin, DefaultUIDMax
	}
	if pol.LeaseDir == "" {
		pol.LeaseDir = DefaultLeaseDir
		if os.Geteuid() == 0 && os.MkdirAll(pol.LeaseDir, 0o700) != nil && fallbackLeaseDir != "" {
			pol.LeaseDir = fallbackLeaseDir
		}
	}
	u := &users{pol: pol, root: os.Geteuid() == 0, proc: "/proc", hosts: newHostIDs(), aside: asideRemoval{stop: make(chan struct{})}}
	u.self = ident{uid: uint32(os.Geteuid()), gid: uint32(os.Getegid()), same: true, name: "uid " + strconv.Itoa(os.Geteuid())}
	if cur, err := user.Current(); err == nil {
		u.self.name = cur.Username
	}
	if u.root {
		if err := os.MkdirAll(pol.LeaseDir, 0o700); err != nil {
			return nil, fmt.Errorf("dynamic uid lease dir: %w", err)
		}
		if err := os.Chmod(pol.LeaseDir, 0o700); err != nil {
			return nil, fmt.Errorf("dynamic uid lease dir: %w", err)
		}
		if err := checkPrivateDir(pol.LeaseDir); err != nil {
			return nil, fmt.Errorf("dynamic uid lease dir: %w", err)
		}
		u.sd, u.sdWarn = openSDLocks(pol.SystemdUIDDir)
		if u.sd != nil {
			u.hosts.sdDir = ""
		} else if pol.SystemdUIDDir != "" {
			u.hosts.sdDir = pol.SystemdUIDDir
		}
	}
	return u, nil
}

// Describe says who workloads run as, for status and logs.
func (u *users) Describe() string {
	if !u.root {
		return fmt.Sprintf("the nexlet's own user %s (uid %d): nexd does not run as root", u.self.name, u.self.uid)
	}
	return fmt.Sprintf("dynamic uids %d-%d", u.pol.UIDMin, u.pol.UIDMax)
}

// resolve checks a start request's user against the policy; "" means a dynamic user.
// Nothing is leased here.
func (u *users) resolve(name string) (ident, error) {
	if !u.root {
		if name == "" || name == u.self.name || name == strconv.Itoa(int(u.self.uid)) {
			return u.self, nil
		}
		return ident{}, fmt.Errorf("run_request: user %q: nexd does not run as root, so workloads run as %s only", name, u.self.name)
	}
	if name == "" {
		return ident{dynamic: true, name: "dynamic"}, nil
	}
	if name == "root" || name == "0" {
		if !u.pol.AllowRoot {
			return ident{}, errors.New("run_request: user \"root\": this node does not allow root workloads (allow_root_workloads)")
		}
		return ident{uid: 0, gid: 0, name: "root"}, nil
	}
	if !slices.Contains(u.pol.Allowed, name) {
		return ident{}, fmt.Errorf("run_request: user %q is not in this node's workload_users %q", name, u.pol.Allowed)
	}
	pw, err := user.Lookup(name)
	if err != nil {
		return ident{}, fmt.Errorf("run_request: user %q: %w", name, err)
	}
	uid, err1 := strconv.ParseUint(pw.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(pw.Gid, 10, 32)
	if err1 != nil || err2 != nil {
		return ident{}, fmt.Errorf("run_request: user %q: unusable uid/gid %s/%s", name, pw.Uid, pw.Gid)
	}
	if uid == 0 && !u.pol.AllowRoot {
		return ident{}, fmt.Errorf("run_request: user %q has uid 0 and this node does not allow root workloads (allow_root_workloads)", name)
	}
	id := ident{uid: uint32(uid), gid: uint32(gid), name: name, groups: []uint32{}}
	if gids, err := pw.GroupIds(); err == nil {
		for _, g := range gids {
			if v, err := strconv.ParseUint(g, 10, 32); err == nil && uint32(v) != id.gid {
				id.groups = append(id.groups, uint32(v))
			}
		}
	}
	if !u.pol.AllowRoot {
		if group, gid, ok := u.adminGroup(); ok && (id.gid == gid || slices.Contains(id.groups, gid)) {
			return id, &adminUserError{user: name, group: group}
		}
	}
	return id, nil
}

// adminUserError refuses a named user in the node's admin group (resolve returns the
// user's ident with it: a replay of a workload deployed so before keeps it).
type adminUserError struct{ user, group string }

func (e *adminUserError) Error() string {
	return fmt.Sprintf("run_request: user %q is in group %s, the node's admins (the control socket hands them the node's NATS admin credential, and the configuration file is theirs to read): a workload as that user could act in every namespace, so it runs only where root workloads may (allow_root_workloads)", e.user, e.group)
}

// DefaultAdminGroup is the group whose members are the node's admins: control's
// DefaultGroup (daemon's tests check they agree), which owns the packaged configuration
// file (0640 root:nex).
const DefaultAdminGroup = "nex"

// adminGroup looks the policy's admin group up; ok is false when the host has none.
func (u *users) adminGroup() (name string, gid uint32, ok bool) {
	name = u.pol.AdminGroup
	if name == "" {
		name = DefaultAdminGroup
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return name, 0, false
	}
	v, err := strconv.ParseUint(g.Gid, 10, 32)
	return name, uint32(v), err == nil
}

// acquire leases a fresh dynamic uid for owner (the workload's directory) when id is
// dynamic; other identities are returned as they are. A uid leased ahead by the pool
// is taken when there is one: the walk of /proc that proves a uid unused costs
// milliseconds per deploy on a busy host.
//
// made says owner, the workload's directory, was made ahead for the uid (uidPool) and
// is in place; otherwise the caller makes it (makeWorkloadDirs).
func (u *users) acquire(id ident, owner string) (got ident, made bool, err error) {
	if !id.dynamic {
		return id, false, nil
	}
	if u.pool != nil {
		if got, made, ok := u.pool.take(owner); ok {
			return got, made, nil
		}
	}
	// The directory exists before the lease names it: a lease naming a directory that
	// is not there is stale, and another lease (the pool's filler, another nexlet) would
	// take the uid before makeWorkloadDirs.
	if err := os.Mkdir(owner, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return ident{}, false, fmt.Errorf("directory: %w", err)
	}
	got, err = u.leaseFresh(owner)
	if err != nil {
		_ = os.Remove(owner)
		if u.short != nil {
			u.short() // the next deploy finds their uids on their way back
		}
	}
	return got, false, err
}

// leaseFresh finds a uid no process, host user or group, or lease uses and leases it
// to owner.
func (u *users) leaseFresh(owner string) (ident, error) {
	ids, err := u.leaseFreshN(owner, 1)
	if err != nil {
		return ident{}, err
	}
	return ids[0], nil
}

// leaseFreshN leases up to n free uids to owner with one walk of /proc (the walk is
// the cost: it reads every process's status, milliseconds with thousands of
// processes). It fails only when it leased none.
//
// A walk begun within walkReuse (a uid release's, after every few stops; or an earlier
// lease's) stands in for its own: the uid pool's refills then walk only when no stop
// walked lately. Such a walk is as good as one made now for every uid that goes through
// leases: a uid leased since has a lease, which the check under the lock sees, and one
// released since had no process left (its release walked after its workload ended). So
// with an earlier walk only uids with no lease at all are taken, never one whose lease
// is stale (its owner gone: a nexlet that died between its workload's end and the
// release's walk leaves such a lease, and survivors of that uid may have started after
// the earlier walk); when that finds none, it walks afresh. What no lease covers (a
// process of a uid in the range started by something else since the walk) a pooled uid
// could meet just as well while it waits in the pool.
func (u *users) leaseFreshN(owner string, n int) ([]ident, error) {
	if busy := u.recentWalk(); busy != nil {
		if out, err := u.leaseFrom(busy, false, owner, n); err == nil {
			return out, nil
		}
	}
	// The walk comes before the lock: held through it, the lock kept every deploy's
	// claim of a pooled uid waiting for the walk (tens of milliseconds with thousands of
	// processes). A uid leased meanwhile has a lease by then, which the check under the
	// lock sees; a uid released meanwhile had no process left.
	busy, err := u.walk()
	if err != nil {
		return nil, fmt.Errorf("dynamic uids: %w", err)
	}
	return u.leaseFrom(busy, true, owner, n)
}

// leaseFrom leases up to n uids that busy (a walk's uids) does not hold to owner;
// fresh: busy is a walk made for this lease, which may take a stale lease's uid.
func (u *users) leaseFrom(busy map[uint32]bool, fresh bool, owner string, n int) ([]ident, error) {
	unlock, err := u.lock()
	if err != nil {
		return nil, err
	}
	out, trees, err := u.leaseFromLocked(busy, fresh, owner, n)
	unlock()
	// A stale lease's leftover trees, moved out of its uid's reach under the lock, go
	// after it: removed under it, a tree of a tenant's workload in /tmp held every
	// deploy on the host for as long as it took (TestStaleLeaseRemovesTreesAfterTheLock),
	// and removed here, after it, the one deploy that took the uid still waited for it
	// (1.9 s for 100,000 files). The nexlet's own goroutine removes them (the same test,
	// TestStaleLeaseRemovalStopsWithThePool).
	u.handAside(trees)
	return out, err
}

// leaseFromLocked is leaseFrom under the lease lock; trees are the leftover directories
// of the stale leases' uids it took, moved aside, for removal after the lock.
func (u *users) leaseFromLocked(busy map[uint32]bool, fresh bool, owner string, n int) (out []ident, trees *leftoverTrees, err error) {
	trees = &leftoverTrees{roots: u.asideRoots}
	span := u.pol.UIDMax - u.pol.UIDMin + 1
	start := rand.Uint32N(span) // not predictable, and few collisions between nodes
	var sdErr error
	for i := uint32(0); i < span && len(out) < n; i++ {
		uid := u.pol.UIDMin + (start+i)%span
		if busy[uid] || u.hosts.uses(uid) {
			continue
		}
		free, stale := u.leaseFreeLocked(uid, fresh)
		if !free {
			continue
		}
		// systemd's lock on the uid: a uid whose lock another process holds is
		// systemd's (a DynamicUser= service's) or another nexlet's.
		if ok, err := u.sd.take(uid); err != nil || !ok {
			if err != nil {
				sdErr = err
			}
			continue
		}
		if stale {
			// A stale lease (its holder gone unreleased): its uid's leftovers go out
			// of the uid's reach (the directories into root's 0700 directory, to be
			// removed after the lock) before anyone else runs as it, or the uid is
			// not taken.
			if trees.take(u.proc, map[uint32]bool{uid: true})[uid] != nil {
				u.sd.drop(uid)
				continue
			}
		}
		if err := writeLease(u.leasePath(uid), owner); err != nil {
			u.sd.drop(uid)
			if len(out) > 0 {
				return out, trees, nil
			}
			return nil, trees, fmt.Errorf("dynamic uid %d: lease: %w", uid, err)
		}
		out = append(out, ident{uid: uid, gid: uid, groups: []uint32{}, name: "dynamic", dynamic: true})
	}
	if len(out) == 0 && sdErr != nil {
		return nil, trees, fmt.Errorf("no free dynamic uid in %d-%d (workload_uid_range): %w", u.pol.UIDMin, u.pol.UIDMax, sdErr)
	}
	if len(out) == 0 {
		return nil, trees, fmt.Errorf("no free dynamic uid in %d-%d (workload_uid_range)", u.pol.UIDMin, u.pol.UIDMax)
	}
	return out, trees, nil
}

// asideRemoval is the goroutine that removes the leftover trees stale leases' reuses
// and the sweep of stale leases moved aside (handAside): one at a time, begun when
// trees come, ended when none are left or at stop (stopAside, which waits for it).
type asideRemoval struct {
	mu      sync.Mutex
	pending []*leftoverTrees
	running bool
	stopped bool
	stop    chan struct{}
	wg      sync.WaitGroup
}

// handAside has trees, moved aside under the lease lock and out of their uids' reach
// (root's 0700 directories), removed by the nexlet's own goroutine, so that the caller
// (a deploy that took a stale lease's uid, the pool's sweep of stale leases before its
// first refill) need not wait for them. Once the removal is stopped (the nexlet
// closes) they stay where they are, under this nexlet's name: the next nexlet's start
// removes them (sweepAside), as it does what a stop cut short.
func (u *users) handAside(trees *leftoverTrees) {
	if len(trees.trees) == 0 && len(trees.aside) == 0 {
		return
	}
	a := &u.aside
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.stopped {
		return
	}
	a.pending = append(a.pending, trees)
	if !a.running {
		a.running = true
		a.wg.Go(u.removeAsideLoop)
	}
}

// removeAsideLoop is handAside's goroutine: it removes what is pending, entry by entry
// and following no symlink, until nothing is or the removal is stopped. What fails is
// logged, not returned: the uids are leased already, the trees out of their reach.
func (u *users) removeAsideLoop() {
	a := &u.aside
	for {
		a.mu.Lock()
		batch := a.pending
		a.pending = nil
		if len(batch) == 0 {
			a.running = false
			a.mu.Unlock()
			return
		}
		a.mu.Unlock()
		for _, trees := range batch {
			failed, err := trees.removeUntil(a.stop, u.removingTree)
			for uid, err := range failed {
				if u.log != nil {
					u.log.Warn("leftovers of a dynamic uid, moved out of its reach, not all removed", "uid", uid, "err", err)
				}
			}
			if err != nil { // stopped: the rest of batch stays aside too
				if u.log != nil {
					u.log.Info("removal of stale leases' leftovers, moved out of their uids' reach, stopped; the next start goes on with it", "err", err)
				}
				a.mu.Lock()
				a.pending, a.running = nil, false
				a.mu.Unlock()
				return
			}
		}
	}
}

// stopAside ends handAside's removal between two entries and waits for it; trees
// handed later stay aside for the next start.
func (u *users) stopAside() {
	u.haltAside()
	u.aside.wg.Wait()
}

// haltAside is stopAside without the wait.
func (u *users) haltAside() {
	a := &u.aside
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.stopped && a.stop != nil {
		close(a.stop)
	}
	a.stopped = true
}

// hold re-leases uid for owner (a workload adopted after a nexlet restart) and holds
// systemd's lock on it again: nexd's copy of the dead nexlet's lock, taken over, or
// (nexd kept none) the lock taken anew. The lease is written even when the lock is
// another's: the workload runs as the uid either way.
func (u *users) hold(uid uint32, owner string) error {
	u.sd.waitSynced() // nexd's copy of the dead nexlet's lock is handed over first
	unlock, err := u.lock()
	if err != nil {
		return err
	}
	defer unlock()
	if err := writeLease(u.leasePath(uid), owner); err != nil {
		return err
	}
	ok, err := u.sd.take(uid)
	if err == nil && !ok {
		err = fmt.Errorf("systemd's lock on uid %d (%s) is another process's: a DynamicUser= service started while no nexlet held it may share the workload's uid", uid, u.sd.path(uid))
	}
	return err
}

// release is releaseAll for one uid.
func (u *users) release(id ident) error {
	_, err := u.releaseCounted([]ident{id})
	return err
}

// releaseAll kills whatever still runs as the given dynamic uids (processes that left
// their workload's group or cgroup) and then frees them, with one walk of /proc per
// round: stops that come together (a drain, a busy node) share the walks. A uid with
// survivors stays leased. Only uids this nexlet retired (retire) are released: a kill by
// uid reaches every process of the host running as it, so a uid whose lease is not
// this nexlet's retired one (another workload's, a pooled one, no lease) is left
// alone, nothing killed, with an error naming it.
func (u *users) releaseAll(ids []ident) error {
	_, err := u.releaseCounted(ids)
	return err
}

// releaseCounted is releaseAll that also says how many processes it killed.
func (u *users) releaseCounted(ids []ident) (killed int, err error) {
	want := map[uint32]bool{}
	for _, id := range ids {
		if id.dynamic && id.uid != 0 {
			want[id.uid] = true
		}
	}
	if len(want) == 0 {
		return 0, nil
	}
	var errs []error
	if err := u.keepRetired(want); err != nil {
		errs = append(errs, err)
	}
	defer u.doneReleasing(maps.Clone(want)) // killRetired may drop some from want
	if len(want) == 0 {
		return 0, errors.Join(errs...)
	}
	if u.releaseChecked != nil {
		u.releaseChecked()
	}
	deadline := time.Now().Add(10 * time.Second)
	// survivors: the processes of the uids that still ran (not zombies) when the
	// last round's kill looked at them again.
	var survivors map[uint32][]int
	// sent: the processes SIGKILLed so far, each counted once. A process SIGKILLed in
	// one round may still be listed in the next (its exit under way), and a round
	// signals it again.
	sent := map[int]bool{}
	for {
		listed := map[uint32][]int{}
		busy := map[uint32]bool{} // every uid, for the leases that follow (leaseFreshN)
		at := time.Now()
		u.walks.Add(1)
		err := walkProcs(u.proc, func(pid int, uids []uint32) {
			for _, v := range uids {
				busy[v] = true
			}
			for _, v := range uids {
				if want[v] {
					listed[v] = append(listed[v], pid)
					break
				}
			}
		})
		if err != nil {
			return killed, errors.Join(append(errs, fmt.Errorf("%d dynamic uids stay leased: %w", len(want), err))...)
		}
		u.noteWalk(busy, at)
		if len(listed) == 0 {
			survivors = nil
			break
		}
		if u.releaseWalked != nil {
			u.releaseWalked()
		}
		live, n, err := u.killRetired(want, listed, sent)
		killed += n
		if err != nil {
			errs = append(errs, err)
		}
		if len(want) == 0 {
			return killed, errors.Join(errs...)
		}
		survivors = live
		if len(live) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	unlock, err := u.lock()
	if err != nil {
		return killed, errors.Join(append(errs, err)...)
	}
	// What the uids without survivors left behind goes before their leases, under the
	// lease lock and only while each lease is still this nexlet's retirement, as the
	// kills (killRetired): a lease that changed hands during the release is another
	// holder's, whose files, shared memory and IPC objects are the uid's too
	// (TestReleaseRemovesNoLeftoversOfNewHolder). The directories among them are moved
	// out of the uid's reach there and removed after the lock, which every deploy's
	// claim of a uid waits for: a workload's tree of files in /tmp held it as long as
	// it took to remove (TestReleaseRemovesTreesAfterTheLock).
	trees, ferrs := u.freeRetiredLocked(want, survivors)
	unlock()
	errs = append(errs, ferrs...)
	for uid, err := range trees.remove(u.removingTree) {
		// Out of every uid's reach already: the uid is free all the same.
		errs = append(errs, fmt.Errorf("dynamic uid %d: freed, but what it left behind, moved aside, was not all removed: %w", uid, err))
	}
	return killed, errors.Join(errs...)
}

// freeRetiredLocked, under the lease lock, frees the uids of want without survivors
// whose lease is still this nexlet's retirement, after their leftovers; it returns the
// directories among those, moved aside for removal after the lock.
func (u *users) freeRetiredLocked(want map[uint32]bool, survivors map[uint32][]int) (*leftoverTrees, []error) {
	var errs []error
	gone := map[uint32]bool{}
	for uid := range want {
		if pids, ok := survivors[uid]; ok {
			errs = append(errs, fmt.Errorf("dynamic uid %d: processes %v survive SIGKILL; the uid stays leased", uid, pids))
			continue
		}
		if b, err := os.ReadFile(u.leasePath(uid)); err != nil || !u.retiredBySelf(b) {
			// Its lease changed hands during the release (see killRetired): not ours
			// to remove, or the uid would be handed out while its holder runs as it.
			errs = append(errs, fmt.Errorf("dynamic uid %d: not freed, its leftovers not removed: its lease stopped being this nexlet's retirement during the release", uid))
			continue
		}
		gone[uid] = true
	}
	failed, trees := moveLeftovers(u.proc, u.asideRoots, gone)
	for uid := range gone {
		if err := u.freeLocked(uid, failed[uid]); err != nil {
			errs = append(errs, err)
		}
	}
	return trees, errs
}

// killRetired SIGKILLs listed (a walk's processes of the uids of want) under the lease
// lock, each uid's only while its lease is still this nexlet's retirement of it:
// keepRetired checked that before the walk, but a lease that changed hands since (the
// nexlet's own adoption of a workload of that uid rewrote it, a nexlet that cannot see
// this one's /proc entry took it as stale, a test's clean-up removed it) is another
// holder's, whose processes run as the uid too. Under the lock no lease changes, so a
// lease still retired means every process of the uid is the retired workload's. A uid
// whose lease changed leaves want with an error, nothing of it killed.
//
// Each listed pid is killed through a pidfd opened first and only once its process is
// seen, after the open, still running as the uid (procid.Pin): a listed process
// that ended since the walk may have left its number to a stranger, another uid's
// process, which the kill by the number hit (TestReleaseKillsNoRecycledPid). A zombie
// of the uid is not killed and counts as gone: it can run no code, and it is not the
// release's to reap (its parent's, or init's), so waiting for it kept the release, and
// the uid's lease, until the 10 s deadline (TestReleaseNotHeldByZombies).
//
// live are the processes that still ran as their uid when looked at (each now sent
// SIGKILL); killed counts those not in sent (signalled by an earlier round), which it
// adds.
func (u *users) killRetired(want map[uint32]bool, listed map[uint32][]int, sent map[int]bool) (live map[uint32][]int, killed int, err error) {
	unlock, err := u.lock()
	if err != nil {
		clear(want)
		return nil, 0, fmt.Errorf("dynamic uids stay leased, nothing killed: %w", err)
	}
	defer unlock()
	live = map[uint32][]int{}
	var errs []error
	for uid, pids := range listed {
		if b, err := os.ReadFile(u.leasePath(uid)); err != nil || !u.retiredBySelf(b) {
			delete(want, uid)
			errs = append(errs, fmt.Errorf("dynamic uid %d: not released, its processes %v not killed: its lease stopped being this nexlet's retirement during the release", uid, pids))
			continue
		}
		for chunk := range slices.Chunk(pids, pinAtOnce) {
			pin := procid.Pin(chunk)
			// A process the signal fails for stays live: listed again next round,
			// and named as a survivor at the deadline.
			sentNow, _ := pin.Signal(syscall.SIGKILL, func(pid int) bool {
				runs, err := runsAs(u.proc, pid, uid)
				if err != nil {
					// Not known: not killed, and the uid not freed while it may run.
					live[uid] = append(live[uid], pid)
					return false
				}
				if !runs {
					return false // gone, a zombie, or a stranger's process with the number now
				}
				live[uid] = append(live[uid], pid)
				return true
			})
			pin.Close()
			for _, p := range sentNow {
				if !sent[p] {
					sent[p] = true
					killed++
				}
			}
		}
	}
	return live, killed, errors.Join(errs...)
}

// pinAtOnce bounds the pidfds a kill holds at once (a uid's processes are pinned in
// chunks of this many).
const pinAtOnce = 256

// runsAs reports whether pid (in proc) is a process that runs (not a zombie; but one
// whose main thread alone ended runs its other threads: threadsRun), with uid
// among its real, effective, saved and fs uids: one read of its status, whose State
// and Uid lines come in its first few hundred bytes. An error says it could not tell
// (a process that is gone is not one).
func runsAs(proc string, pid int, uid uint32) (bool, error) {
	var buf [4 << 10]byte
	path := proc + "/" + strconv.Itoa(pid) + "/status"
	b, err := procid.ReadInto(path, buf[:])
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	i := bytes.Index(b, []byte("\nState:"))
	if i < 0 {
		return false, fmt.Errorf("%s: no State line", path)
	}
	st := bytes.TrimLeft(b[i+len("\nState:"):], " \t")
	if len(st) == 0 {
		return false, fmt.Errorf("%s: empty State line", path)
	}
	if (st[0] == 'Z' || st[0] == 'X') && !threadsRun(b) {
		return false, nil
	}
	var uids [4]uint32
	n := parseStatusUIDs(b, &uids)
	if n == 0 {
		return false, fmt.Errorf("%s: no Uid line", path)
	}
	return slices.Contains(uids[:n], uid), nil
}

// threadsRun says whether a zombie's status (b) counts threads besides its own: its
// main thread ended alone (exit(2), not exit_group(2)) and the others run on, as its
// uid, until a signal to the process (its pid) ends them all. A zombie whose threads
// have all ended counts itself alone (Threads: 1). Without the line, it may run.
func threadsRun(b []byte) bool {
	i := bytes.Index(b, []byte("\nThreads:"))
	if i < 0 {
		return true
	}
	v := bytes.TrimLeft(b[i+len("\nThreads:"):], " \t")
	if j := bytes.IndexByte(v, '\n'); j >= 0 {
		v = v[:j]
	}
	n, err := strconv.Atoi(string(v))
	return err != nil || n > 1
}

// keepRetired removes from want the uids whose lease is not this nexlet's retired one
// (retire): they are not its to kill by or free; the error names them. It also removes
// those another release is under way for, and marks the rest as being released
// (doneReleasing unmarks them).
func (u *users) keepRetired(want map[uint32]bool) error {
	unlock, err := u.lock()
	if err != nil {
		clear(want)
		return err
	}
	defer unlock()
	u.relMu.Lock()
	defer u.relMu.Unlock()
	if u.releasing == nil {
		u.releasing = map[uint32]bool{}
	}
	var errs []error
	for uid := range want {
		if u.releasing[uid] {
			delete(want, uid)
			continue
		}
		b, err := os.ReadFile(u.leasePath(uid))
		if err == nil && u.retiredBySelf(b) {
			continue
		}
		delete(want, uid)
		if errors.Is(err, fs.ErrNotExist) {
			continue // released already: nothing of it is this nexlet's
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("dynamic uid %d: not released, nothing killed: %w", uid, err))
			continue
		}
		errs = append(errs, fmt.Errorf("dynamic uid %d: not released, nothing killed: its lease names %q, not this nexlet's retirement", uid, leaseOwner(b)))
	}
	for uid := range want {
		u.releasing[uid] = true
	}
	return errors.Join(errs...)
}

// doneReleasing unmarks the uids keepRetired marked.
func (u *users) doneReleasing(uids map[uint32]bool) {
	u.relMu.Lock()
	defer u.relMu.Unlock()
	for uid := range uids {
		delete(u.releasing, uid)
	}
}

// freeLocked removes uid's lease and gives systemd's lock on it back (the lease lock
// held), unless left, the error of the removal of its leftovers, says it must stay
// leased.
func (u *users) freeLocked(uid uint32, left error) error {
	if left != nil {
		return fmt.Errorf("dynamic uid %d stays leased: %w", uid, left)
	}
	if err := os.Remove(u.leasePath(uid)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("dynamic uid %d: %w", uid, err)
	}
	u.sd.drop(uid)
	return nil
}

// sweepStale removes what nexlets that are gone left in the lease directory, with
// one walk of /proc: leases whose owner is gone (a pooled uid's /proc/<pid> of a nexlet
// killed, a workload directory that no longer exists) while no process runs as their
// uid, after their uid's leftovers (moved out of the uid's reach under the lease lock
// and removed after it by the nexlet's goroutine, as a stale lease's reuse has them),
// each with systemd's lock file of its uid when nobody holds that lock; and systemd's lock files of this range that
// no lease names, that nobody holds and that are empty (systemd writes its dynamic
// user's name into its own; nexd's stay empty). A lease whose owner is there (a live
// nexlet's pool or retired uid, a workload's directory, running or not) stays, as does
// a lock someone holds. Before, such leases were reclaimed only when a later lease
// happened to pick their uid, and their lock files stayed as long
// (TestKilledNexletsLeaveNoLeases).
func (u *users) sweepStale() (leases, locks int, err error) {
	u.sd.waitSynced() // nexd's copies of dead nexlets' locks are this nexlet's first
	busy, err := u.walk()
	if err != nil {
		return 0, 0, fmt.Errorf("stale leases: %w", err)
	}
	unlock, err := u.lock()
	if err != nil {
		return 0, 0, err
	}
	leases, locks, trees, err := u.sweepStaleLocked(busy)
	unlock()
	// The trees go after the lock: removed under it, a tenant's tree of files in /tmp
	// held every deploy on the host, at a nexlet's start, for as long as its removal
	// took (TestSweepStaleRemovesTreesAfterTheLock). Their uids are free already, and the
	// trees out of their reach; removed here, they held the pool's first refill, and the
	// nexlet's stop, as long. The nexlet's own goroutine removes them, as a stale lease's
	// reuse has it do (handAside).
	u.handAside(trees)
	return leases, locks, err
}

// sweepStaleLocked is sweepStale's work under the lease lock, with busy its walk's
// uids; trees are the stale uids' leftover directories, moved aside for removal after
// the lock.
func (u *users) sweepStaleLocked(busy map[uint32]bool) (leases, locks int, trees *leftoverTrees, err error) {
	trees = &leftoverTrees{roots: u.asideRoots}
	ents, err := os.ReadDir(u.pol.LeaseDir)
	if err != nil {
		return 0, 0, trees, fmt.Errorf("stale leases: %w", err)
	}
	leased := map[uint32]bool{}
	stale := map[uint32]bool{}
	for _, e := range ents {
		v, perr := strconv.ParseUint(e.Name(), 10, 32)
		if perr != nil || !e.Type().IsRegular() {
			continue
		}
		uid := uint32(v)
		leased[uid] = true
		if busy[uid] {
			continue
		}
		if free, wasStale := u.leaseFreeLocked(uid, true); free && wasStale {
			stale[uid] = true
		}
	}
	failed := trees.take(u.proc, stale)
	var errs []error
	for uid := range stale {
		if err := u.freeLocked(uid, failed[uid]); err != nil {
			errs = append(errs, err)
			continue
		}
		leases++
		delete(leased, uid)
	}
	if u.sd != nil {
		ents, _ := os.ReadDir(u.sd.dir)
		for _, e := range ents {
			v, perr := strconv.ParseUint(e.Name(), 10, 32)
			if perr != nil || !e.Type().IsRegular() {
				continue
			}
			uid := uint32(v)
			if uid < u.pol.UIDMin || uid > u.pol.UIDMax || leased[uid] {
				continue
			}
			if u.sd.sweepFree(uid, busy[uid]) {
				locks++
			}
		}
	}
	return leases, locks, trees, errors.Join(errs...)
}

// releaser batches the releases of stopped workloads' uids off the stops' path: one
// goroutine (owned by the nexlet's WaitGroup) releases whatever has queued up since
// its last round.
type releaser struct {
	u       *users
	log     *slog.Logger
	wg      *sync.WaitGroup
	gate    *startGate // its walks wait for the starts in flight
	mu      sync.Mutex
	pending []ident
	running bool
	hurried bool
	hurry   chan struct{} // closed by flush: a batch goes without its wait
	batch   time.Duration // the wait; releaseBatch
}

// flush makes what is pending, and whatever stops add from now on, go without waiting
// for others to share its walk: the nexlet closes.
func (r *releaser) flush() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.hurried {
		r.hurried = true
		close(r.hurry)
	}
}

func (r *releaser) add(id ident) {
	if !id.dynamic || id.uid == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.pending = append(r.pending, id)
	if !r.running {
		r.running = true
		r.wg.Go(r.loop)
	}
}

func (r *releaser) loop() {
	for {
		// Stops that follow within releaseBatch share the walk: a walk per stop was
		// the largest share of the nexlet's CPU in a deploy-and-stop loop.
		t := time.NewTimer(r.batch)
		select {
		case <-t.C:
		case <-r.hurry:
			t.Stop()
		}
		r.mu.Lock()
		batch := r.pending
		r.pending = nil
		if len(batch) == 0 {
			r.running = false
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		r.gate.yield(tidyYield)
		killed, err := r.u.releaseCounted(batch)
		if killed > 0 {
			r.log.Info("killed processes left running as stopped workloads' uids", "killed", killed, "uids", len(batch))
		}
		if err != nil {
			r.log.Warn("workload uids not released", "err", err)
		}
	}
}

// releaseBatch is how long a uid release waits for others to share its /proc walk
// (unless the nexlet closes). At 100 ms a walk served 2-6 stops of a placement loop, and
// the walks (every process's status: all of them where everything runs as root, 2-3 ms a
// walk with 100-130 processes) were the largest single share of the nexlet's CPU after
// the uid pool's refills began to take their uids (walkReuse, which still covers it).
const releaseBatch = 250 * time.Millisecond

func (u *users) leasePath(uid uint32) string {
	return filepath.Join(u.pol.LeaseDir, strconv.FormatUint(uint64(uid), 10))
}

// leaseFreeLocked: no lease, or, when stale is set, a stale one (its owner directory is
// gone; the caller walked /proc for this lease and found nothing running as the uid);
// wasStale says it was such a stale one, whose uid may have leftovers.
func (u *users) leaseFreeLocked(uid uint32, stale bool) (free, wasStale bool) {
	b, err := os.ReadFile(u.leasePath(uid))
	if errors.Is(err, fs.ErrNotExist) {
		return true, false
	}
	if err != nil || !stale {
		return false, false
	}
	owner := leaseOwner(b)
	if owner == "" || !filepath.IsAbs(owner) {
		return false, false
	}
	_, err = os.Lstat(owner)
	gone := errors.Is(err, fs.ErrNotExist)
	return gone, gone
}

// leaseOwner is the owner a lease file names: its first line. A nexlet killed while
// rewriting a lease in place (writeLease) leaves the new owner's line followed by the
// rest of a longer old one, which must still read as the new owner.
func leaseOwner(b []byte) string {
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

// retire moves the lease of a stopped workload's uid from its directory (owner) to
// this nexlet ahead of its release: the directory goes first, and a lease naming a
// directory that is gone is stale, so the uid could be leased again (by the pool's
// filler, by another nexlet) while its release is still pending, a release that would
// then kill the new holder's processes and remove its lease. false: the lease is not
// owner's (never written, or someone else's): there is nothing to release, and its
// uid's processes are not owner's to kill.
//
// The retired lease names this nexlet as its owner (while it lives the lease is held)
// and says it is retired on its second line: a pooled uid's lease names this nexlet
// too, and is not a workload's to release.
func (u *users) retire(uid uint32, owner string) bool {
	unlock, err := u.lock()
	if err != nil {
		return false
	}
	defer unlock()
	path := u.leasePath(uid)
	b, err := os.ReadFile(path)
	if err != nil {
		return false
	}
	if u.retiredBySelf(b) {
		return true
	}
	if leaseOwner(b) != owner || owner == u.selfOwner() {
		return false
	}
	return writeLease(path, u.selfOwner()+"\n"+retiredMark) == nil
}

// retiredMark is a retired lease's second line (retire).
const retiredMark = "retired"

// selfOwner is the owner this nexlet's own leases (pooled, retired) name.
func (u *users) selfOwner() string { return "/proc/" + strconv.Itoa(os.Getpid()) }

// retiredBySelf says whether lease (a lease file's content) is one this nexlet retired.
func (u *users) retiredBySelf(lease []byte) bool {
	return string(lease) == u.selfOwner()+"\n"+retiredMark+"\n"
}

// writeLease writes the lease file path naming owner. An existing lease is rewritten
// in place rather than truncated to nothing first (os.WriteFile's O_TRUNC): ext4 writes
// a file truncated to zero and written again out to disk when it is closed
// (auto_da_alloc), 0.4 ms of a deploy's claim of a pooled uid where /run is not a
// tmpfs. Every lease is read and written under the lease lock, so nobody sees one
// half written.
func writeLease(path, owner string) error {
	b := []byte(owner + "\n")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = f.WriteAt(b, 0)
	if err == nil {
		err = f.Truncate(int64(len(b)))
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		// A new lease whose write failed (a full directory) names nobody, and a lease
		// naming nobody is never stale: its uid was lost for good
		// (TestDeployOnFullLeaseDir). Under the lease lock: nobody else wrote it.
		if fi, serr := os.Lstat(path); serr == nil && fi.Mode().IsRegular() && fi.Size() == 0 {
			_ = os.Remove(path)
		}
	}
	return err
}

// lock serialises lease changes between every nexlet of the host.
func (u *users) lock() (func(), error) {
	f, err := os.OpenFile(filepath.Join(u.pol.LeaseDir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("dynamic uid lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("dynamic uid lock: %w", err)
	}
	return func() { f.Close() }, nil
}

// procUIDs is the set of real and effective uids of every process on the host (in
// proc, /proc).
func procUIDs(proc string) (map[uint32]bool, error) {
	out := map[uint32]bool{}
	err := walkProcs(proc, func(pid int, uids []uint32) {
		for _, u := range uids {
			out[u] = true
		}
	})
	return out, err
}

// uidProcs lists the processes running with uid as a real, effective, saved or fs uid.
func uidProcs(proc string, uid uint32) ([]int, error) {
	var pids []int
	err := walkProcs(proc, func(pid int, uids []uint32) {
		if slices.Contains(uids, uid) {
			pids = append(pids, pid)
		}
	})
	return pids, err
}

// walkProcs calls fn with every process's uids: its real, effective, saved and fs
// uids, or its effective uid alone where that is all it has. The kernel gives a
// process's /proc directory its effective uid (so that a stat tells it, status being
// slow), and an unprivileged process keeps the uids it started with or swaps among
// them; differing uids come from a setuid exec (workloads cannot: no_new_privs) or a
// privileged setresuid. So a directory owned by a uid other than root is one fstatat
// for a process of that uid, and only root's processes have their status read (three
// system calls and the kernel's text of some fifty lines, 20 us a process here: 100 ms
// a walk with 5,000 workloads running). Not seen: a process whose effective uid is
// neither root nor a dynamic one while its real or saved uid is one (a host user of a
// dynamic uid running a setuid program of another user).
//
// A walk that could not see every process (proc unreadable, a failed read of the
// directory or of a root-owned process's status) returns an error: "no process runs as
// this uid" from an incomplete walk would free a uid a survivor still holds.
//
// Where proc is this process's own /proc (ownProc) and the kernel has PIDFD_GET_INFO (6.13), a
// root-owned process's uids come from its pidfd (pidfd_open, one ioctl, close: about a
// fifth of the status read's cost here, which formats some fifty lines); where that is
// refused (an older kernel, a seccomp filter) or the process has exited (a zombie still
// counts as running as its uid), from its status as before.
func walkProcs(proc string, fn func(pid int, uids []uint32)) error {
	return walkProcsWith(proc, ownProc(proc), fn)
}

// ownProc reports whether proc lists this process's pid namespace, so that a pid read
// there is the one pidfd_open opens: its "self" names this process's pid. A /proc of
// another pid namespace (mounted into a container, say) names another number or none,
// and the walk then reads each status, which describes the process it lists.
func ownProc(proc string) bool {
	self, err := os.Readlink(filepath.Join(proc, "self"))
	return err == nil && self == strconv.Itoa(os.Getpid())
}

// walkProcsWith is walkProcs; pidfds: ask pidfds first (proc must then be this
// process's /proc).
func walkProcsWith(proc string, pidfds bool, fn func(pid int, uids []uint32)) error {
	// Raw calls into two buffers a walk (12 KiB: they escape to the heap through the
	// system calls) and the path's copy a call: a walk runs after every stop and per
	// four deploys, and os.ReadFile's seven calls and buffers per process made it most
	// of what the nexlet allocated (600 KB a walk of 125 processes, a collection every
	// deploy or two at GOGC 50), on a machine whose cores the deploys need.
	dfd, err := unix.Open(proc, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("list processes: %w", &os.PathError{Op: "open", Path: proc, Err: err})
	}
	defer unix.Close(dfd)
	var (
		dents  [8 << 10]byte
		status [4 << 10]byte
		path   [32]byte
		uids   [4]uint32
	)
	for {
		n, err := unix.Getdents(dfd, dents[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Errorf("list processes: %w", &os.PathError{Op: "getdents", Path: proc, Err: err})
		}
		if n <= 0 {
			return nil
		}
		for b := dents[:n]; len(b) >= 19; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				return fmt.Errorf("list processes: %s: a directory entry of %d bytes in a read of %d", proc, reclen, len(b))
			}
			name := b[19:reclen]
			b = b[reclen:]
			if i := bytes.IndexByte(name, 0); i >= 0 {
				name = name[:i]
			}
			pid, ok := parsePid(name)
			if !ok {
				continue
			}
			p := append(append(path[:0], name...), 0)
			var st unix.Stat_t
			if err := fstatat(dfd, p, &st); err != nil {
				if procGone(err) {
					continue
				}
				return fmt.Errorf("list processes: %w", &os.PathError{Op: "stat", Path: proc + "/" + string(name), Err: err})
			}
			if st.Uid != 0 {
				uids[0] = st.Uid
				fn(pid, uids[:1])
				continue
			}
			if pidfds {
				switch got, err := pidfdUIDs(pid, &uids); {
				case got:
					fn(pid, uids[:])
					continue
				case err == unix.ENOSYS || err == unix.ENOTTY || err == unix.EINVAL || err == unix.EPERM || err == unix.EACCES:
					pidfds = false // not here: status for the rest of the walk
				}
			}
			p = append(append(p[:len(name)], "/status"...), 0)
			k, err := readAt(dfd, p, status[:])
			if err != nil {
				if procGone(err) {
					continue
				}
				return fmt.Errorf("list processes: %w", &os.PathError{Op: "read", Path: proc + "/" + string(name) + "/status", Err: err})
			}
			got := parseStatusUIDs(status[:k], &uids)
			if got == 0 {
				return fmt.Errorf("list processes: %s/%s/status: no Uid line in its first %d bytes", proc, name, k)
			}
			fn(pid, uids[:got])
		}
	}
}

// pidfdInfo is the kernel's struct pidfd_info as of 6.13 (PIDFD_INFO_SIZE_VER0, 64 bytes).
type pidfdInfo struct {
	mask, cgroupID                                      uint64
	pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid uint32
	fsuid, fsgid, spare0                                uint32
}

const (
	pidfdGetInfo   = 0xC040FF0B // _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info)
	pidfdInfoCreds = 1 << 1     // PIDFD_INFO_CREDS
)

// pidfdUIDs reads pid's real, effective, saved and fs uids through a pidfd; false with
// the error when it could not (the process is gone or exited, or the kernel has no
// PIDFD_GET_INFO), in which case the caller reads its status.
func pidfdUIDs(pid int, uids *[4]uint32) (bool, error) {
	fd, err := unix.PidfdOpen(pid, 0)
	for err == unix.EINTR {
		fd, err = unix.PidfdOpen(pid, 0)
	}
	if err != nil {
		return false, err
	}
	defer unix.Close(fd)
	info := pidfdInfo{mask: pidfdInfoCreds}
	for {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), pidfdGetInfo, uintptr(unsafe.Pointer(&info)))
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return false, e
		}
		break
	}
	if info.mask&pidfdInfoCreds == 0 || int(info.tgid) != pid {
		return false, unix.EINVAL
	}
	*uids = [4]uint32{info.ruid, info.euid, info.suid, info.fsuid}
	return true, nil
}

// procGone: the error of a call on a /proc/<pid> entry whose process has gone.
func procGone(err error) bool { return err == unix.ENOENT || err == unix.ESRCH }

// parsePid reads a /proc entry's name as a pid.
func parsePid(name []byte) (int, bool) {
	if len(name) == 0 || len(name) > 10 {
		return 0, false
	}
	pid := 0
	for _, c := range name {
		if c < '0' || c > '9' {
			return 0, false
		}
		pid = pid*10 + int(c-'0')
	}
	return pid, true
}

// fstatat stats the NUL-terminated name below dfd without following a symlink. The
// name is viewed in place as a string (unix copies it before the call returns).
func fstatat(dfd int, name []byte, st *unix.Stat_t) error {
	for {
		err := unix.Fstatat(dfd, unsafe.String(&name[0], len(name)-1), st, unix.AT_SYMLINK_NOFOLLOW)
		if err != unix.EINTR {
			return err
		}
	}
}

// readAt reads the first len(buf) bytes of the NUL-terminated name below dfd (what a
// /proc status file holds up to its uids comes in one read) and returns their count.
// An interrupted call is made again.
func readAt(dfd int, name, buf []byte) (int, error) {
	var fd int
	var err error
	for {
		fd, err = unix.Openat(dfd, unsafe.String(&name[0], len(name)-1), unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	for {
		n, err := unix.Read(fd, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return 0, err
		}
		return n, nil
	}
}

// parseStatusUIDs parses the "Uid:" line of a /proc/<pid>/status into uids and returns how
// many it read (0: no such line in b).
func parseStatusUIDs(b []byte, uids *[4]uint32) int {
	i := bytes.Index(b, []byte("\nUid:"))
	if i < 0 {
		return 0
	}
	line := b[i+5:]
	if j := bytes.IndexByte(line, '\n'); j >= 0 {
		line = line[:j]
	} else {
		return 0 // cut off: a short read
	}
	got := 0
	for _, f := range bytes.Fields(line) {
		v, err := strconv.ParseUint(unsafe.String(&f[0], len(f)), 10, 32)
		if err != nil || got == len(uids) {
			break
		}
		uids[got] = uint32(v)
		got++
	}
	return got
}

// checkPrivateDir refuses a directory that is not ours or that others can write to.
func checkPrivateDir(dir string) error {
	var st unix.Stat_t
	if err := unix.Lstat(dir, &st); err != nil {
		return fmt.Errorf("%s: %w", dir, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return fmt.Errorf("%s is not a directory", dir)
	}
	if int(st.Uid) != os.Geteuid() || st.Mode&0o022 != 0 {
		return fmt.Errorf("%s is owned by uid %d with mode %o: want uid %d, not group/world-writable", dir, st.Uid, st.Mode&0o7777, os.Geteuid())
	}
	return nil
}

// canAccess reports whether id can reach path and has the wanted permission bits on
// it (4 read, 2 write, 1 execute), following the classic owner/group/other rules on
// every directory on the way (ACLs are not consulted).
func canAccess(id ident, path string, want uint32) error {
	if id.same {
		mode := uint32(0)
		if want&4 != 0 {
			mode |= unix.R_OK
		}
		if want&2 != 0 {
			mode |= unix.W_OK
		}
		if want&1 != 0 {
			mode |= unix.X_OK
		}
		if err := unix.Faccessat(unix.AT_FDCWD, path, mode, unix.AT_EACCESS); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return nil
	}
	if id.uid == 0 {
		return nil
	}
	real, err := resolveAs(id, path)
	if err != nil {
		return err
	}
	if !permits(id, real, want) {
		return fmt.Errorf("%s cannot be %s by %s", path, wantText(want), id)
	}
	return nil
}

// canRun is begin's check of a local program: id reaches path (every directory on the
// way searchable by it), path is a regular file with an execute bit, and id may read
// and execute it; in that order, so that what lies at path is said only once id may
// reach it (TestAttackTenantProbesRootOnlyFiles). The path is resolved once: it was
// resolved by canAccess, stat'ed by artifact.CheckExecutable and resolved by canAccess
// again (for /bin/sh about 17 system calls each). st is the program's, for its digest.
func canRun(id ident, path string) (st unix.Stat_t, err error) {
	denied := func(err error) error { return fmt.Errorf("the workload's user cannot run it: %w", err) }
	real := path
	if id.same {
		if err := canAccess(id, path, 0); err != nil {
			return st, denied(err)
		}
	} else if id.uid != 0 {
		if real, err = resolveAs(id, path); err != nil {
			return st, denied(err)
		}
	}
	if err := unix.Stat(real, &st); err != nil {
		return st, &os.PathError{Op: "stat", Path: path, Err: err}
	}
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return st, fmt.Errorf("%s is not a regular file", path)
	case st.Mode&0o111 == 0:
		return st, fmt.Errorf("%s is not executable", path)
	}
	if id.same {
		if err := canAccess(id, path, 4|1); err != nil {
			return st, denied(err)
		}
	} else if id.uid != 0 && !permitsStat(id, &st, 4|1) {
		return st, denied(fmt.Errorf("%s cannot be %s by %s", path, wantText(4|1), id))
	}
	return st, nil
}

// resolveAs resolves path as the kernel would for id, name by name, and returns
// where it leads: every directory it passes must be searchable by id, and a symlink
// is followed from where it points (at most 40), so that what lies beyond a
// directory id may not search is never looked at. Only what id could learn itself
// is said: that a name is missing in a directory it may search. The nexlet's stat is
// root's: judging a symlink by its target's own bits (before) told a tenant whether a
// target beyond a root-only directory existed (TestAttackTenantProbesRootOnlyFiles).
func resolveAs(id ident, path string) (string, error) {
	if !filepath.IsAbs(path) {
		return "", fmt.Errorf("%s: not an absolute path", path)
	}
	if len(path) >= unix.PathMax {
		// The kernel refuses it at the exec or chdir; walked here name by name first, a
		// request's megabyte of "/.." cost the nexlet over a second of syscalls
		// (TestResolveAsLongPath).
		return "", fmt.Errorf("%s...: %w", path[:64], syscall.ENAMETOOLONG)
	}
	todo := strings.Split(path, "/")
	cur, links := "/", 0
	for len(todo) > 0 {
		name := todo[0]
		todo = todo[1:]
		if name == "" || name == "." {
			continue
		}
		if onProc(cur) {
			// Before anything in it is looked at: see onProc.
			return "", fmt.Errorf("%s: a path through %s is not followed for a workload", path, cur)
		}
		if !permits(id, cur, 1) {
			return "", fmt.Errorf("%s: directory %s cannot be searched by %s", path, cur, id)
		}
		if name == ".." {
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, name)
		fi, err := os.Lstat(next)
		if err != nil {
			return "", fmt.Errorf("%s: %w", path, err) // cur is searchable: id could look
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		if links++; links > 40 {
			return "", fmt.Errorf("%s: %w", path, syscall.ELOOP)
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", fmt.Errorf("%s: %w", path, err)
		}
		if filepath.IsAbs(target) {
			cur = "/"
		}
		todo = append(strings.Split(target, "/"), todo...)
	}
	return cur, nil
}

// onProc reports whether dir is on a proc file system. Its magic links
// (/proc/<pid>/cwd, root, exe) the kernel lets a uid follow only into processes it may
// trace, and its <pid> directories hide from it (hidepid), while the nexlet reads them as
// root: followed, they told a tenant where a root process works and what lies there
// (TestAttackTenantProbesProcLinks). No workload's program or workdir is found there.
func onProc(dir string) bool {
	var st unix.Statfs_t
	return unix.Statfs(dir, &st) == nil && st.Type == unix.PROC_SUPER_MAGIC
}

func wantText(want uint32) string {
	var parts []string
	if want&4 != 0 {
		parts = append(parts, "read")
	}
	if want&2 != 0 {
		parts = append(parts, "written")
	}
	if want&1 != 0 {
		parts = append(parts, "executed")
	}
	return strings.Join(parts, " and ")
}

func permits(id ident, path string, want uint32) bool {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return false
	}
	return permitsStat(id, &st, want)
}

// permitsStat is permits for a file already stat'ed.
func permitsStat(id ident, st *unix.Stat_t, want uint32) bool {
	mode := st.Mode & 0o777
	var bits uint32
	switch {
	case st.Uid == id.uid:
		bits = (mode >> 6) & 7
	case st.Gid == id.gid || slices.Contains(id.groups, st.Gid):
		bits = (mode >> 3) & 7
	default:
		bits = mode & 7
	}
	return bits&want == want
}

// workloadsDir picks where workloads/<id> live: under runtimeDir, unless the nexlet
// switches users and some ancestor of runtimeDir cannot be searched by others (a
// workload must be able to reach its own directory: chdir happens after setuid). Then
// a directory under /run (or the temp dir) keyed by runtimeDir, so that a restarted
// nexlet finds its workloads again; hold is that directory open with its shared lock
// (holdWorkloadsDir), nil for one under runtimeDir. base, when set, is used instead of
// /run/nex-workloads (a test's own).
func workloadsDir(runtimeDir, base string, switching bool) (dir string, hold *os.File, err error) {
	dir = filepath.Join(runtimeDir, "workloads")
	mode := os.FileMode(0o700)
	if switching {
		mode = 0o711
	}
	if !switching || searchableByOthers(runtimeDir) {
		if err := os.MkdirAll(dir, mode); err != nil {
			return "", nil, fmt.Errorf("workloads dir: %w", err)
		}
		return dir, nil, os.Chmod(dir, mode)
	}
	if base == "" {
		base = "/run/nex-workloads"
		if err := os.MkdirAll(base, 0o711); err != nil {
			base = filepath.Join(os.TempDir(), "nex-workloads")
		}
	}
	sum := sha256.Sum256([]byte(filepath.Clean(runtimeDir)))
	dir = filepath.Join(base, hex.EncodeToString(sum[:8]))
	if hold, err = holdWorkloadsDir(base, dir, filepath.Clean(runtimeDir)); err != nil {
		return "", nil, fmt.Errorf("workloads dir: %w", err)
	}
	// Left for whoever looks in the runtime dir.
	_ = os.WriteFile(filepath.Join(runtimeDir, "workloads-dir"), []byte(dir+"\n"), 0o600)
	return dir, hold, nil
}

// searchableByOthers reports whether every directory from / down to dir (which is
// made when missing) has the search bit for others.
func searchableByOthers(dir string) bool {
	if err := os.MkdirAll(dir, 0o711); err != nil {
		return false
	}
	// The nexlet's own runtime dir: explicitly, whatever the umask (the unit's 0027).
	if err := os.Chmod(dir, 0o711); err != nil {
		return false
	}
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		fi, err := os.Stat(d)
		if err != nil || fi.Mode().Perm()&0o001 == 0 {
			return false
		}
		if d == "/" {
			return true
		}
	}
}

// homeDirName is the workload's private working directory inside its directory.
const homeDirName = "home"

// identFileName records, root-owned, who a workload runs as, so that a restarted
// nexlet adopting it keeps its uid leased.
const identFileName = "uid"

type identFile struct {
	UID     uint32   `json:"uid"`
	GID     uint32   `json:"gid"`
	Groups  []uint32 `json:"groups,omitempty"`
	Name    string   `json:"name"`
	Dynamic bool     `json:"dynamic,omitempty"`
	Same    bool     `json:"same,omitempty"`
}

// makeWorkloadDirs makes dir (owned by the nexlet, entered only by the workload's
// group), its identity file and dir/home (the workload's own, 0700).
func makeWorkloadDirs(dir string, id ident) error {
	// It may exist, empty, made by acquire before the lease named it.
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("directory: %w", err)
	}
	if fi, err := os.Lstat(dir); err != nil || !fi.IsDir() {
		return fmt.Errorf("directory %s: not a directory", dir)
	}
	b, _ := json.Marshal(identFile{UID: id.uid, GID: id.gid, Groups: id.groups, Name: id.name, Dynamic: id.dynamic, Same: id.same})
	if err := os.WriteFile(filepath.Join(dir, identFileName), b, 0o600); err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	home := filepath.Join(dir, homeDirName)
	if err := os.Mkdir(home, 0o700); err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	if id.same {
		return nil
	}
	if err := os.Chown(home, int(id.uid), int(id.gid)); err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	// The workload's group may enter (not list) its directory to reach home, its
	// creds file and artifact; the files in it stay the nexlet's.
	if err := os.Chown(dir, os.Geteuid(), int(id.gid)); err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	if err := os.Chmod(dir, 0o710); err != nil {
		return fmt.Errorf("directory: %w", err)
	}
	return nil
}

// readIdent reads who the workload in dir ran as; ok is false (and the zero ident has
// nothing to release) when unknown.
func readIdent(dir string) (ident, bool) {
	b, err := os.ReadFile(filepath.Join(dir, identFileName))
	if err != nil {
		return ident{}, false
	}
	var f identFile
	if json.Unmarshal(b, &f) != nil {
		return ident{}, false
	}
	return ident{uid: f.UID, gid: f.GID, groups: f.Groups, name: f.Name, dynamic: f.Dynamic, same: f.Same}, true
}
