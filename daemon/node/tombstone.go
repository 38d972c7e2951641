package node

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/internal/privfile"
	"github.com/nexd-project/nexd/protocol"
)

// ErrRemovalPending says a workload's removal from node state failed, and a tombstone kept
// on local disk stands in for it until a later removal succeeds. The workload is not
// replayed meanwhile.
var ErrRemovalPending = errors.New("removal from node state pending")

// Tombstones wraps a Store whose removals can fail (a KV bucket whose JetStream is down
// or cut off) so that a removed workload stays removed: a Delete that fails after a
// bounded retry leaves a tombstone file in dir, ByType leaves tombstoned workloads out
// (no replay brings them back), and an owned goroutine retries the removal until it
// succeeds, then drops the tombstone. A Put of the same id drops its tombstone first.
type Tombstones struct {
	inner Store
	dir   string
	log   *slog.Logger
	// Retry bounds a Delete's retries before it falls back to a tombstone; Every is the
	// background retry's first interval (doubling up to 30 s).
	retry, every time.Duration

	mu sync.Mutex // held over a tombstone's check, the store call and its change
	// mem stands in for the tombstones that could not be written (the state directory's
	// file system full too), keyed like the files: retried the same way while this
	// nexd runs, but not kept across its restart.
	mem    map[string]Tombstone
	kick   chan struct{}
	cancel context.CancelFunc
	done   chan struct{}
}

// NewTombstones keeps tombstones in dir (made 0700) and starts retrying any left there
// by an earlier run. Close stops the retries.
func NewTombstones(inner Store, dir string, log *slog.Logger) (*Tombstones, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("node state tombstones: %w", err)
	}
	removeWriteLeftovers(dir, log)
	ctx, cancel := context.WithCancel(context.Background())
	t := &Tombstones{inner: inner, dir: dir, log: log, retry: 2 * time.Second, every: time.Second,
		mem: map[string]Tombstone{}, kick: make(chan struct{}, 1), cancel: cancel, done: make(chan struct{})}
	go t.loop(ctx)
	t.wake()
	return t, nil
}

// removeWriteLeftovers removes what writes cut short left in dir: a nexd killed between
// a tombstone's temporary file (".<key>", write) and its rename. Nothing reads them, and
// before they stayed for good (e2e TestStopWithStateStoreDownStaysStopped found one in 1
// of 5 runs: nexd killed during a second write of a stopped workload's tombstone). Only
// the nexd holding the state directory's lock gets here.
func removeWriteLeftovers(dir string, log *slog.Logger) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return // keys() says so
	}
	for _, e := range ents {
		if e.Type().IsRegular() && strings.HasPrefix(e.Name(), ".") {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil {
				log.Warn("failed to remove a node state tombstone's unfinished write", "file", e.Name(), "err", err)
				continue
			}
			log.Info("removed a node state tombstone's unfinished write", "file", e.Name())
		}
	}
}

// Close stops the background retries and waits for them; tombstones left stay on disk
// for the next start.
func (t *Tombstones) Close() {
	t.cancel()
	<-t.done
	// Removals kept in memory die with this nexd, and the next would replay their
	// workloads: room for their tombstones may have come since (space freed, then a
	// restart), so they are written now.
	t.mu.Lock()
	mem := make([]Tombstone, 0, len(t.mem))
	for _, m := range t.mem {
		mem = append(mem, m)
	}
	t.mu.Unlock()
	for _, m := range mem {
		key, err := state.Key(m.Type, m.ID)
		if err != nil {
			continue
		}
		if err := t.write(key, m.Namespace); err != nil {
			t.log.Error("a stopped workload's removal from node state is lost with this nexd: the next one may run it again", "workload_id", m.ID, "err", err)
			continue
		}
		t.mu.Lock()
		delete(t.mem, key)
		t.mu.Unlock()
	}
}

// Put implements Store. A tombstone of the same workload goes first, so the retry does
// not remove the new record.
func (t *Tombstones) Put(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	t.mu.Lock()
	if key, err := state.Key(workloadType, workloadID); err == nil {
		delete(t.mem, key)
		if err := os.Remove(filepath.Join(t.dir, key)); err != nil && !errors.Is(err, os.ErrNotExist) {
			t.mu.Unlock()
			return fmt.Errorf("node state: drop the tombstone of workload %s: %w", workloadID, err)
		}
	}
	t.mu.Unlock()
	return t.inner.Put(ctx, workloadType, workloadID, req)
}

// Delete implements Store. It retries a failing removal for up to t.retry (once while
// other tombstones wait: the store is known to be failing); then it keeps a tombstone
// and returns an error wrapping ErrRemovalPending, or, when no tombstone could be
// written either, the removal's error alone: the workload may then be replayed by the
// next nexd; this one keeps it out of its replays and retries its removal.
func (t *Tombstones) Delete(ctx context.Context, workloadType, workloadID string) error {
	key, err := state.Key(workloadType, workloadID)
	if err != nil {
		return t.inner.Delete(ctx, workloadType, workloadID)
	}
	deadline := time.Now().Add(t.retry)
	if t.pending() > 0 {
		deadline = time.Now()
	}
	wait := 100 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, max(time.Until(deadline), time.Second))
		err = t.inner.Delete(actx, workloadType, workloadID)
		cancel()
		if err == nil {
			t.mu.Lock()
			t.drop(key)
			t.mu.Unlock()
			return nil
		}
		if ctx.Err() != nil || time.Now().Add(wait).After(deadline) {
			break
		}
		select {
		case <-ctx.Done():
		case <-time.After(wait):
		}
		wait *= 2
	}
	if terr := t.write(key, namespaceOf(ctx)); terr != nil {
		t.mu.Lock()
		t.mem[key] = Tombstone{Type: workloadType, ID: workloadID, Namespace: namespaceOf(ctx), Since: time.Now().UTC()}
		t.mu.Unlock()
		t.wake()
		return fmt.Errorf("%w; no tombstone kept either (its removal is retried while this nexd runs): %w", err, terr)
	}
	t.wake()
	return fmt.Errorf("%w: %w", ErrRemovalPending, err)
}

// MarkStarted implements Store. A tombstoned workload's record may be marked too: the
// removal that is retried takes it all the same.
func (t *Tombstones) MarkStarted(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	return t.inner.MarkStarted(ctx, workloadType, workloadID, req)
}

// ByType implements Store: tombstoned workloads are left out, those tombstoned when
// the read began too: the retry may remove one from the store and drop its tombstone
// after the read got it (TestTombstoneReadWhileRetried). Only a deploy Puts, with an
// id of its own, so no workload is tombstoned before the read and stored anew since.
func (t *Tombstones) ByType(ctx context.Context, workloadType string) (map[string]protocol.StartWorkloadRequest, error) {
	before := t.Pending()
	out, err := t.inner.ByType(ctx, workloadType)
	if err != nil {
		return out, err
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, key := range append(before, t.keys()...) {
		if typ, id, ok := state.SplitKey(key); ok && typ == workloadType {
			if _, ok := out[id]; ok {
				t.log.Info("not replaying a stopped workload whose removal from node state is pending", "workload_id", id, "type", typ)
				delete(out, id)
			}
		}
	}
	return out, nil
}

// All implements Store: every stored workload, the tombstoned ones too (the node
// reads it for the namespaces of what it holds, not to replay).
func (t *Tombstones) All(ctx context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	return t.inner.All(ctx)
}

// Pending returns the keys (<type>_<id>) of the tombstoned workloads.
func (t *Tombstones) Pending() []string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.keys()
}

func (t *Tombstones) pending() int { return len(t.Pending()) }

// Tombstone is a stopped workload whose removal from node state is pending (INFO's
// nexd_tombstones).
type Tombstone = protocol.Tombstone

// List returns the tombstones, oldest first.
func (t *Tombstones) List() []Tombstone {
	t.mu.Lock()
	defer t.mu.Unlock()
	var out []Tombstone
	for _, key := range t.keys() {
		typ, id, ok := state.SplitKey(key)
		if !ok {
			continue
		}
		if m, ok := t.mem[key]; ok {
			out = append(out, m)
			continue
		}
		ts := Tombstone{ID: id, Type: typ}
		path := filepath.Join(t.dir, key)
		// Small: a time and a namespace (older files: the time only).
		if b, err := os.ReadFile(path); err == nil {
			at, ns, _ := strings.Cut(string(b), "\n")
			ts.Since, _ = time.Parse(time.RFC3339, at)
			ts.Namespace = strings.TrimSpace(ns)
		}
		if fi, err := os.Stat(path); ts.Since.IsZero() && err == nil {
			ts.Since = fi.ModTime().UTC()
		}
		out = append(out, ts)
	}
	slices.SortFunc(out, func(a, b Tombstone) int { return a.Since.Compare(b.Since) })
	return out
}

// nsKey carries a removal's workload namespace to the tombstone it may leave (the
// Store interface has no place for it).
type nsKey struct{}

// withNamespace says which namespace the workload ctx's removal is about is in.
func withNamespace(ctx context.Context, ns string) context.Context {
	return context.WithValue(ctx, nsKey{}, ns)
}

func namespaceOf(ctx context.Context) string {
	ns, _ := ctx.Value(nsKey{}).(string)
	return ns
}

// keys lists the tombstones, those in memory too; t.mu held.
func (t *Tombstones) keys() []string {
	var out []string
	ents, err := os.ReadDir(t.dir)
	if err != nil {
		t.log.Warn("failed to read node state tombstones", "dir", t.dir, "err", err)
	}
	for _, e := range ents {
		if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), ".") {
			out = append(out, e.Name())
		}
	}
	for key := range t.mem {
		if !slices.Contains(out, key) {
			out = append(out, key)
		}
	}
	return out
}

// has says whether key is tombstoned, on disk or in memory; t.mu held.
func (t *Tombstones) has(key string) bool {
	if _, ok := t.mem[key]; ok {
		return true
	}
	_, err := os.Stat(filepath.Join(t.dir, key))
	return err == nil
}

// write keeps a tombstone durably: the file (when it was written and the workload's
// namespace, a line each), then its directory entry, synced.
func (t *Tombstones) write(key, ns string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if ns == "" {
		// A second removal of the same workload (its end reported after its stop)
		// may not know the namespace; the first one's stays.
		if b, err := os.ReadFile(filepath.Join(t.dir, key)); err == nil {
			_, old, _ := strings.Cut(string(b), "\n")
			ns = strings.TrimSpace(old)
		}
	}
	tmp := filepath.Join(t.dir, "."+key)
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("node state tombstone: %w", err)
	}
	_, err = f.WriteString(time.Now().UTC().Format(time.RFC3339) + "\n" + ns + "\n")
	err = errors.Join(err, f.Sync(), f.Close())
	if err == nil {
		err = os.Rename(tmp, filepath.Join(t.dir, key))
	}
	if err == nil {
		err = privfile.SyncDir(t.dir)
	}
	if err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("node state tombstone %s: %w", key, err)
	}
	return nil
}

// drop removes a tombstone once its workload is out of the store; t.mu held.
func (t *Tombstones) drop(key string) {
	if _, ok := t.mem[key]; ok {
		delete(t.mem, key)
		t.log.Info("workload removed from node state; its removal was retried from memory", "key", key)
	}
	if err := os.Remove(filepath.Join(t.dir, key)); err == nil {
		t.log.Info("workload removed from node state; its tombstone dropped", "key", key)
	} else if !errors.Is(err, os.ErrNotExist) {
		t.log.Warn("failed to drop a node state tombstone", "key", key, "err", err)
	}
}

func (t *Tombstones) wake() {
	select {
	case t.kick <- struct{}{}:
	default:
	}
}

// loop retries the tombstoned removals: at a wake, then after t.every, doubling up to
// 30 s while some fail; with none left it sleeps until the next wake.
func (t *Tombstones) loop(ctx context.Context) {
	defer close(t.done)
	every := t.every
	var retry <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.kick:
		case <-retry:
		}
		retry = nil
		if t.retryAll(ctx) {
			every = t.every
			continue
		}
		retry = time.After(every)
		every = min(2*every, 30*time.Second)
	}
}

// retryAll tries each tombstoned removal once; it reports whether none is left.
func (t *Tombstones) retryAll(ctx context.Context) bool {
	left := 0
	for _, key := range t.Pending() {
		typ, id, ok := state.SplitKey(key)
		if !ok {
			continue
		}
		t.mu.Lock()
		if !t.has(key) {
			t.mu.Unlock() // dropped meanwhile (a Put, or a Delete that succeeded)
			continue
		}
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := t.inner.Delete(actx, typ, id)
		cancel()
		if err == nil {
			t.drop(key)
		} else {
			left++
			t.log.Debug("removal from node state still failing", "workload_id", id, "type", typ, "err", err)
		}
		t.mu.Unlock()
		if ctx.Err() != nil {
			return false
		}
	}
	return left == 0
}
