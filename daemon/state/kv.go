// Package state persists the start requests of running workloads in the NATS KV bucket
// nex-<node_id>, so a restarted node can hand them back to its nexlets.
package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/nexd-project/nexd/protocol"
)

// Bucket settings for new buckets. An existing bucket is opened as it is, and its own
// value limit is the one enforced (upstream created them with 10 000 bytes).
const (
	BucketPrefix = "nex-"
	MaxValueSize = 64 * 1024
	MaxBytes     = 100_000_000 // as upstream, so accounts sized for it still fit
)

// ErrValueTooLarge matches (errors.Is) the error every node.Store's Put returns for a start request larger
// than the bucket's value limit; errors.As gives the *ValueTooLargeError with the sizes.
var ErrValueTooLarge = errors.New("start request too large for the state store")

// ValueTooLargeError reports a start request the bucket cannot hold.
type ValueTooLargeError struct {
	Size, Limit int
	Bucket      string
}

func (e *ValueTooLargeError) Error() string {
	if e.Bucket == "" {
		return fmt.Sprintf("start request of %d bytes exceeds the state store's limit of %d bytes", e.Size, e.Limit)
	}
	return fmt.Sprintf("start request of %d bytes exceeds the state store's limit of %d bytes (KV bucket %s)", e.Size, e.Limit, e.Bucket)
}

// Is makes errors.Is(err, ErrValueTooLarge) true.
func (e *ValueTooLargeError) Is(target error) bool { return target == ErrValueTooLarge }

// BucketName is the state bucket of a node.
func BucketName(nodeID string) string { return BucketPrefix + nodeID }

// Compiled on first use, not at init: every package's init runs in nexd and in the
// native nexlet alike, used or not. A node id and a workload type are protocol.IsToken
// (KV bucket name rules).
var validWorkloadID = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z0-9-]+$`) }) // no "_": it splits the key

// KV is a node's workload state: key <workload type>.<workload id> (StoredKey), value the
// JSON of the client's start request. The request carries no credentials (they are minted afresh on
// replay) and its environment only in the sealed form the client sent.
type KV struct {
	kv     jetstream.KeyValue
	js     jetstream.JetStream
	bucket string
	// markerAge is how old a delete marker must be before All purges it (0: none
	// purged, a read-only KV's).
	markerAge time.Duration
	// purging runs the purges of the markers All read (compact), compacting from the
	// first All on the compaction every compactEvery (compactPeriodically), both under
	// life, which Close ends before it waits for them; closed (under compactMu) starts
	// no more.
	purging      sync.WaitGroup
	compacting   sync.WaitGroup
	compactMu    sync.Mutex
	closed       bool
	periodic     bool
	compactEvery time.Duration
	life         context.Context
	endLife      context.CancelFunc
	maxValue     int
	replicas     int
	log          *slog.Logger
	// failed is the last write's failure, nil once a write succeeded after it: a
	// store that is full or failing answers JetStream's health (stream info) while it
	// refuses every write, so only a write tells.
	failed atomic.Pointer[writeFailure]
	// failing gets a token when writes begin to fail (WriteFailing).
	failing chan struct{}
	// writes numbers the writes in the order they begin (beginWrite); noted is the
	// number of the write whose outcome failed reflects. An outcome counts only if its
	// write began after that one: a slow write's late failure must not undo a later
	// write's success (a write probe that timed out across the server's restart, after
	// removals had taken, kept the node refusing deploys on a store that took writes),
	// nor a slow write's late success a later write's failure.
	writes  atomic.Uint64
	notedMu sync.Mutex
	noted   uint64
	// oldLeft: records an older nexd wrote under Key's <type>_<id> may remain, their
	// move at the open cut short by a write the bucket refused (a full store): ByType,
	// Delete and MarkStarted then look under those keys too.
	oldLeft atomic.Bool
}

// writeFailure is why writes to the bucket fail, since the first of them.
type writeFailure struct {
	err   error
	since time.Time
}

// beginWrite numbers a write about to begin, for noteWrite.
func (s *KV) beginWrite() uint64 { return s.writes.Add(1) }

// noteWrite records the outcome of write n (beginWrite's), unless a write begun after
// it was recorded already (a caller's cancellation says nothing of the store).
func (s *KV) noteWrite(n uint64, err error) {
	if errors.Is(err, context.Canceled) {
		return
	}
	s.notedMu.Lock()
	defer s.notedMu.Unlock()
	if n < s.noted {
		return
	}
	s.noted = n
	switch {
	case err == nil:
		if s.failed.Load() != nil {
			s.failed.Store(nil)
		}
	default:
		since := time.Now()
		f := s.failed.Load()
		if f != nil {
			since = f.since
		}
		s.failed.Store(&writeFailure{err: err, since: since})
		if f == nil {
			select {
			case s.failing <- struct{}{}:
			default:
			}
		}
	}
}

// WriteFailing gets a token when the bucket's writes begin to fail (the first failure
// after a success): the node's bids stop at once (WriteFailure), and its JetStream
// check probes within a second rather than at its next round, so a single failed
// write (a timeout) stops them for about a second, not up to five.
func (s *KV) WriteFailing() <-chan struct{} { return s.failing }

// WriteFailure is why the bucket's last write failed and since when writes fail; nil
// once a write (a workload's, or ProbeWrite) succeeded after it. An atomic load: it is
// asked before every bid.
func (s *KV) WriteFailure() (since time.Time, err error) {
	if f := s.failed.Load(); f != nil {
		return f.since, f.err
	}
	return time.Time{}, nil
}

// probeKey is written by ProbeWrite: three tokens keep it apart from every workload's
// key (StoredKey: two; an older nexd's: one), and it is only ever purged, so no read of
// the bucket returns it. An older nexd's probe, "nexd.write-probe", was only purged too.
const probeKey = "nexd.write-probe.0"

// ProbeWrite writes to the bucket (a purge marker of probeKey, one small message that
// replaces the last probe's) and records the outcome as a write's.
func (s *KV) ProbeWrite(ctx context.Context) error {
	n := s.beginWrite()
	err := s.kv.Purge(ctx, probeKey)
	s.noteWrite(n, err)
	if err != nil {
		return fmt.Errorf("state: write probe to bucket %s: %w", s.bucket, err)
	}
	return nil
}

func newJS(nc *nats.Conn, jsDomain string) (jetstream.JetStream, error) {
	if jsDomain != "" {
		return jetstream.NewWithDomain(nc, jsDomain)
	}
	return jetstream.New(nc)
}

// OpenKV opens the node's bucket, creating it when missing, in the JetStream domain
// jsDomain ("" for the connection's own).
func OpenKV(ctx context.Context, nc *nats.Conn, nodeID, jsDomain string, log *slog.Logger) (*KV, error) {
	return openKV(ctx, nc, nodeID, jsDomain, true, 1, log)
}

// OpenReplicatedKV is OpenKV with a replica count for a bucket it creates (0: AutoReplicas).
// An existing bucket with fewer replicas is scaled up; when that fails the error says
// so rather than running on fewer copies than asked for. Replicas reports what it got.
func OpenReplicatedKV(ctx context.Context, nc *nats.Conn, nodeID, jsDomain string, replicas int, log *slog.Logger) (*KV, error) {
	return openKV(ctx, nc, nodeID, jsDomain, true, replicas, log)
}

// AutoReplicas is the replica count state_replicas 0 stands for: 3 when the server nc is
// connected to belongs to a cluster of three or more servers (those nc knows of, its
// own and the ones the cluster advertised), else 1. The reason says how it was decided.
func AutoReplicas(nc *nats.Conn) (int, string) {
	cluster := nc.ConnectedClusterName()
	if cluster == "" {
		return 1, "the NATS server is not clustered"
	}
	n := len(nc.Servers())
	if n >= 3 {
		return 3, fmt.Sprintf("cluster %s has %d servers", cluster, n)
	}
	return 1, fmt.Sprintf("cluster %s has only %d servers", cluster, n)
}

// OpenExistingKV opens a node's bucket without creating it (for nexctl, which must not
// leave empty buckets behind); jetstream.ErrBucketNotFound is wrapped when missing.
func OpenExistingKV(ctx context.Context, nc *nats.Conn, nodeID, jsDomain string, log *slog.Logger) (*KV, error) {
	return openKV(ctx, nc, nodeID, jsDomain, false, 0, log)
}

func openKV(ctx context.Context, nc *nats.Conn, nodeID, jsDomain string, create bool, replicas int, log *slog.Logger) (*KV, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	why := "state_replicas"
	if create && replicas <= 0 {
		replicas, why = AutoReplicas(nc)
		why = "state_replicas 0 (auto): " + why
	}
	if !protocol.IsToken(nodeID) {
		return nil, fmt.Errorf("state: node id %q cannot name a KV bucket", nodeID)
	}
	js, err := newJS(nc, jsDomain)
	if err != nil {
		return nil, fmt.Errorf("state: JetStream (domain %q): %w", jsDomain, err)
	}
	bucket := BucketName(nodeID)
	kv, err := js.KeyValue(ctx, bucket)
	if create && errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:       bucket,
			Description:  "nexd workload state of node " + nodeID,
			MaxValueSize: MaxValueSize,
			MaxBytes:     MaxBytes,
			History:      1,
			Storage:      jetstream.FileStorage,
			Replicas:     replicas,
		})
		if errors.Is(err, jetstream.ErrBucketExists) {
			// Another process created it between our lookup and create.
			kv, err = js.KeyValue(ctx, bucket)
		} else if err != nil {
			err = fmt.Errorf("create with %d replicas (%s): %w", replicas, why, err)
		}
		if err == nil {
			log.Info("created workload state bucket", "bucket", bucket, "js_domain", jsDomain, "replicas", replicas)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("state: open KV bucket %s (JetStream domain %q): %w", bucket, jsDomain, err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("state: status of KV bucket %s: %w", bucket, err)
	}
	if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok && create && replicas > 0 {
		if got := bs.StreamInfo().Config.Replicas; got < replicas {
			// A bucket made before state_replicas (or with a smaller cluster) is scaled
			// up; running on fewer copies than configured must never go unnoticed.
			cfg := bs.Config()
			cfg.Replicas = replicas
			if kv, err = js.UpdateKeyValue(ctx, cfg); err != nil {
				return nil, fmt.Errorf("state: KV bucket %s has %d replicas, %s wants %d, and scaling it up failed: %w", bucket, got, why, replicas, err)
			}
			log.Info("scaled up workload state bucket", "bucket", bucket, "from", got, "replicas", replicas)
			if st, err = kv.Status(ctx); err != nil {
				return nil, fmt.Errorf("state: status of KV bucket %s: %w", bucket, err)
			}
		}
	}
	maxValue := -1 // unknown: the server still refuses, only less clearly
	got := 0
	if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok {
		if bs.Config().MaxValueSize > 0 {
			maxValue = int(bs.Config().MaxValueSize)
		}
		got = bs.StreamInfo().Config.Replicas
	}
	if create {
		log.Info("workload state bucket", "bucket", bucket, "replicas", got, "wanted", replicas, "why", why)
	}
	s := &KV{kv: kv, js: js, bucket: bucket, maxValue: maxValue, replicas: got, log: log, failing: make(chan struct{}, 1)}
	s.life, s.endLife = context.WithCancel(context.Background())
	if create {
		s.markerAge, s.compactEvery = deleteMarkerAge, compactEvery
		// Only the node moves records: nexctl reads both layouts and writes nothing.
		if err := s.moveOldKeys(ctx); err != nil {
			return nil, err
		}
	}
	return s, nil
}

// moveOldKeys moves the records an older nexd (or upstream) wrote under Key's
// <type>_<id>, one subject token, to StoredKey's <type>.<id>, where ByType finds them.
// The old keys are read alone (the filter "*": one token), so a bucket with none left
// costs one empty read. Each is created under its new key, which a move cut short
// before its purge may have left there already (kept: it may have been marked since),
// and then purged. A key that is not one a nexd makes stays where it is, skipped by
// every read as before.
//
// A read that fails fails the open (JetStream is not there yet: nexd waits and opens
// again). A write that fails does not: a full store refuses the create under the new
// key (it takes a record's room until the old one is purged), and nexd starts on a full
// store, its records read and its stops tombstoned (README). Then the move stops there,
// the records left under their old keys are read and removed there (oldLeft), and the
// next OpenKV takes the move up again.
func (s *KV) moveOldKeys(ctx context.Context) error {
	old, err := s.watch(ctx, "*", false, func(e jetstream.KeyValueEntry) bool {
		_, _, ok := splitOldKey(e.Key())
		return ok && checkKey(e.Key()) == nil
	})
	if err != nil {
		return err
	}
	for i, e := range old {
		typ, id, _ := splitOldKey(e.Key())
		err := s.moveOldKey(ctx, e, typ+"."+id)
		if err != nil && ctx.Err() != nil {
			return err // the open was given up (nexd stopping): no store's fault
		} else if err != nil {
			s.oldLeft.Store(true)
			s.log.Warn("could not move the workload records of an older nexd to the key layout <type>.<id>; "+
				"those left are read and removed under their old keys, and moved at nexd's next start",
				"bucket", s.bucket, "moved", i, "left", len(old)-i, "err", err)
			return nil
		}
	}
	if len(old) > 0 {
		s.log.Info("moved the workload records of an older nexd to the key layout <type>.<id>", "bucket", s.bucket, "records", len(old))
	}
	return nil
}

// moveOldKey moves record e to key (moveOldKeys).
func (s *KV) moveOldKey(ctx context.Context, e jetstream.KeyValueEntry, key string) error {
	if _, err := s.kv.Create(ctx, key, e.Value()); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("state: move record %s of bucket %s to %s: %w", e.Key(), s.bucket, key, err)
	}
	if err := s.kv.Purge(ctx, e.Key()); err != nil {
		return fmt.Errorf("state: remove record %s of bucket %s, moved to %s: %w", e.Key(), s.bucket, key, err)
	}
	return nil
}

// keysOf is where a workload's record may be: StoredKey's key, and while records of an
// older nexd are left unmoved (oldLeft) Key's after it.
func (s *KV) keysOf(workloadType, workloadID string) ([]string, error) {
	key, err := StoredKey(workloadType, workloadID)
	if err != nil {
		return nil, err
	}
	if s.oldLeft.Load() {
		return []string{key, workloadType + "_" + workloadID}, nil
	}
	return []string{key}, nil
}

// Replicas is the bucket's replica count when it was opened (0: unknown).
func (s *KV) Replicas() int { return s.replicas }

// Bucket is the bucket's name.
func (s *KV) Bucket() string { return s.bucket }

// Health is what JetStream says about the bucket now: its replicas and which of them
// are current. Err is set when JetStream did not answer (no quorum on this side of a
// partition, or the server's JetStream is gone).
type Health struct {
	Replicas int      // configured
	Current  int      // the leader and the replicas that are current
	Leader   string   // server holding the leader ("" when none)
	Lost     []string // replicas offline or not current
	Err      error
	// WriteErr is set while writes fail (a full or failing store, which still answers
	// stream info): the last write failed, and so did a probe write just now.
	WriteErr   error
	WriteSince time.Time // since when writes fail
}

// Health asks JetStream for the bucket's stream info (bounded by ctx) and, when the last
// write failed, writes a probe (ProbeWrite) to see whether the bucket takes writes again.
func (s *KV) Health(ctx context.Context) Health {
	h := s.streamHealth(ctx)
	if h.Err == nil {
		if _, err := s.WriteFailure(); err != nil && s.ProbeWrite(ctx) != nil {
			h.WriteSince, h.WriteErr = s.WriteFailure()
		}
	}
	return h
}

func (s *KV) streamHealth(ctx context.Context) Health {
	st, err := s.kv.Status(ctx)
	if err != nil {
		return Health{Replicas: s.replicas, Err: err}
	}
	bs, ok := st.(*jetstream.KeyValueBucketStatus)
	if !ok {
		return Health{Replicas: s.replicas, Current: s.replicas}
	}
	info := bs.StreamInfo()
	h := Health{Replicas: info.Config.Replicas}
	if info.Cluster == nil {
		h.Current = h.Replicas
		return h
	}
	h.Leader = info.Cluster.Leader
	if h.Leader != "" {
		h.Current = 1
	}
	for _, p := range info.Cluster.Replicas {
		if p.Current && !p.Offline {
			h.Current++
		} else {
			h.Lost = append(h.Lost, p.Name)
		}
	}
	return h
}

// MaxValueSize is the largest value the bucket accepts (-1: no limit).
func (s *KV) MaxValueSize() int { return s.maxValue }

// Key names a workload's record outside the bucket (All's map, the node's tombstones):
// <type>_<id>, the key an older nexd stored it under. Workload ids may not contain "_"
// so that the type is everything before the last one.
func Key(workloadType, workloadID string) (string, error) {
	if !protocol.IsToken(workloadType) {
		return "", fmt.Errorf("workload type %q cannot be part of a state key (letters, digits, - and _ only)", workloadType)
	}
	if !validWorkloadID().MatchString(workloadID) {
		return "", fmt.Errorf("workload id %q cannot be part of a state key (letters, digits and - only)", workloadID)
	}
	if len(workloadID) > MaxWorkloadIDLen {
		// The read's check (DecodeRecord) refuses it: a record put under it would be
		// skipped at the next replay.
		return "", fmt.Errorf("workload id of %d characters cannot be part of a state key (at most %d)", len(workloadID), MaxWorkloadIDLen)
	}
	return workloadType + "_" + workloadID, nil
}

// StoredKey is a workload's key in the bucket: <type>.<id>, two subject tokens (a key is
// the subject $KV.<bucket>.<key>), so that ByType asks JetStream for its type's keys
// alone (the filter <type>.*) rather than reading the whole bucket for them, as it had
// to for Key's <type>_<id>, one token no filter narrows.
func StoredKey(workloadType, workloadID string) (string, error) {
	if _, err := Key(workloadType, workloadID); err != nil {
		return "", err
	}
	return workloadType + "." + workloadID, nil
}

// SplitKey is the inverse of StoredKey and of Key (an older nexd's stored key): neither
// a type nor an id has a ".".
func SplitKey(key string) (workloadType, workloadID string, ok bool) {
	if typ, id, ok := strings.Cut(key, "."); ok {
		return typ, id, typ != "" && id != ""
	}
	return splitOldKey(key)
}

// splitOldKey is the inverse of Key.
func splitOldKey(key string) (workloadType, workloadID string, ok bool) {
	i := strings.LastIndexByte(key, '_')
	if i <= 0 || i == len(key)-1 || strings.Contains(key, ".") {
		return "", "", false
	}
	return key[:i], key[i+1:], true
}

// Put stores a workload's start request. A request larger than the bucket allows is
// refused before anything is written, so the deploy can fail with that reason.
func (s *KV) Put(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	key, err := StoredKey(workloadType, workloadID)
	if err != nil {
		return notSentError{fmt.Errorf("state: %w", err)}
	}
	value, err := json.Marshal(req)
	if err != nil {
		return notSentError{fmt.Errorf("state: encode start request of workload %s: %w", workloadID, err)}
	}
	if s.maxValue > 0 && len(value) > s.maxValue {
		return &ValueTooLargeError{Size: len(value), Limit: s.maxValue, Bucket: s.bucket}
	}
	n := s.beginWrite()
	_, err = s.kv.Put(ctx, key, value)
	s.noteWrite(n, err)
	if err != nil {
		return fmt.Errorf("state: store workload %s in bucket %s: %w", workloadID, s.bucket, err)
	}
	return nil
}

// MarkStarted stores req over a workload's record only if the record is still there
// as read (Update on its revision): a record removed meanwhile (a job that ended, a
// stop) stays removed. One that is gone is not an error. Not counted as a write the
// bids watch (WriteFailing): it is off every request's path, and a conflict is no
// failure of the store.
func (s *KV) MarkStarted(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	keys, err := s.keysOf(workloadType, workloadID)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	value, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("state: encode start request of workload %s: %w", workloadID, err)
	}
	var e jetstream.KeyValueEntry
	for _, key := range keys {
		if e, err = s.kv.Get(ctx, key); !errors.Is(err, jetstream.ErrKeyNotFound) {
			break
		}
	}
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil
	} else if err != nil {
		return fmt.Errorf("state: look up workload %s in bucket %s: %w", workloadID, s.bucket, err)
	}
	if _, err := s.kv.Update(ctx, e.Key(), value, e.Revision()); err != nil {
		var api *jetstream.APIError
		if errors.As(err, &api) && api.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence {
			return nil // removed (or written) since the read
		}
		return fmt.Errorf("state: mark workload %s started in bucket %s: %w", workloadID, s.bucket, err)
	}
	return nil
}

// notSentError is a Put's error found before anything was sent to the server.
type notSentError struct{ error }

func (e notSentError) Unwrap() error { return e.error }

// NotWritten reports whether a Put that failed with err certainly stored nothing:
// refused before it was sent (too large, a bad key), answered by JetStream with an
// error, or sent where no stream listens. Any other failure (a timeout, a cancelled
// context, a connection lost with the request out) may have stored the value: the
// server can take a write whose answer never reaches the writer.
func NotWritten(err error) bool {
	var notSent notSentError
	var api *jetstream.APIError
	return errors.Is(err, ErrValueTooLarge) || errors.As(err, &notSent) || errors.As(err, &api) ||
		errors.Is(err, jetstream.ErrNoStreamResponse) || errors.Is(err, nats.ErrNoResponders)
}

// Delete removes a workload; deleting one that is not stored is not an error.
func (s *KV) Delete(ctx context.Context, workloadType, workloadID string) error {
	keys, err := s.keysOf(workloadType, workloadID)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	for _, key := range keys {
		// Skip the marker for keys never stored (or already gone).
		if _, err := s.kv.Get(ctx, key); errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		} else if err != nil {
			return fmt.Errorf("state: look up workload %s in bucket %s: %w", workloadID, s.bucket, err)
		}
		n := s.beginWrite()
		err = s.kv.Purge(ctx, key)
		s.noteWrite(n, err)
		if err != nil {
			return fmt.Errorf("state: remove workload %s from bucket %s: %w", workloadID, s.bucket, err)
		}
	}
	return nil
}

// ByType returns the stored start requests of one workload type, by workload id. The
// type must match exactly ("native" does not return "nativeX" workloads). Only the
// type's keys are read (StoredKey); while records of an older nexd are left unmoved
// (oldLeft), the one-token keys too, the type's taken from them, a record under both
// keys (a move cut short after its create) read from its new one.
func (s *KV) ByType(ctx context.Context, workloadType string) (map[string]protocol.StartWorkloadRequest, error) {
	out := map[string]protocol.StartWorkloadRequest{}
	if !protocol.IsToken(workloadType) {
		return out, nil // no key has it; and a "*" or ">" would widen the filter
	}
	found := func(_, id string, req protocol.StartWorkloadRequest) { out[id] = req }
	if s.oldLeft.Load() {
		ofType := func(key string) bool {
			typ, _, ok := splitOldKey(key)
			return ok && typ == workloadType
		}
		if err := s.read(ctx, "*", ofType, found, nil); err != nil {
			return out, err
		}
	}
	err := s.read(ctx, workloadType+".*", nil, found, nil)
	return out, err
}

// All returns every stored start request, keyed by Key (<type>_<id>). A record that
// DecodeRecord refuses is logged (its key, the field and why) and skipped rather than
// hiding every other workload or reaching a nexlet; it stays in the bucket for the
// operator to mend or remove (nats kv).
//
// The node's KV (OpenKV) also purges the delete markers the read passes that are older
// than deleteMarkerAge: with History 1 every removed workload leaves one, for good
// otherwise. The node reads All once at its start, beside serving; before, OpenKV
// purged them (jetstream's PurgeDeletes), reading the whole bucket on the way to READY.
// The purges run after All returned (compact): the node's stops and lists wait for
// that read, and thousands of markers take seconds to purge.
func (s *KV) All(ctx context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	out := map[string]protocol.StartWorkloadRequest{}
	var old []jetstream.KeyValueEntry
	var marker func(jetstream.KeyValueEntry)
	if s.markerAge > 0 {
		marker = func(e jetstream.KeyValueEntry) {
			if time.Since(e.Created()) > s.markerAge {
				old = append(old, e)
			}
		}
	}
	err := s.read(ctx, ">", nil, func(typ, id string, req protocol.StartWorkloadRequest) { out[typ+"_"+id] = req }, marker)
	if err == nil && s.markerAge > 0 {
		s.compact(old)
	}
	return out, err
}

// compact purges markers on a goroutine of the KV's (purgeMarkers), and the first time
// starts the compaction every compactEvery; Close ends both and waits for them. None
// once Close began.
func (s *KV) compact(markers []jetstream.KeyValueEntry) {
	s.compactMu.Lock()
	defer s.compactMu.Unlock()
	if s.closed {
		return
	}
	if len(markers) > 0 {
		s.purging.Go(func() { s.purgeMarkers(s.life, markers) })
	}
	if !s.periodic && s.compactEvery > 0 {
		s.periodic = true
		s.compacting.Go(s.compactPeriodically)
	}
}

// compactEvery is how often a running node compacts its bucket's delete markers: every
// removal leaves one (128 bytes, counted against the bucket's byte limit), and a node
// with jobs coming and going would fill its bucket with them between its starts.
const compactEvery = time.Hour

// compactPeriodically purges, every compactEvery, the delete markers older than
// markerAge, found by a read of the keys' metadata alone (no values), until Close.
func (s *KV) compactPeriodically() {
	t := time.NewTicker(s.compactEvery)
	defer t.Stop()
	for {
		select {
		case <-s.life.Done():
			return
		case <-t.C:
		}
		old, err := s.watch(s.life, ">", true, func(e jetstream.KeyValueEntry) bool {
			return e.Operation() != jetstream.KeyValuePut && time.Since(e.Created()) > s.markerAge
		}, jetstream.MetaOnly())
		if err != nil {
			if s.life.Err() == nil {
				s.log.Warn("could not read the state bucket's delete markers to compact them; tried again later", "bucket", s.bucket, "err", err)
			}
			continue
		}
		s.purgeMarkers(s.life, old)
	}
}

// Close ends the compaction of delete markers under way (All's) and waits for it. The
// bucket is not touched after it; the connection is the caller's.
func (s *KV) Close() {
	s.compactMu.Lock()
	s.closed = true
	s.compactMu.Unlock()
	s.endLife()
	s.purging.Wait()
	s.compacting.Wait()
}

// deleteMarkerAge is how old a delete marker must be before the node's All purges it:
// PurgeDeletes' default, which keeps younger ones for watchers yet to see them.
const deleteMarkerAge = 30 * time.Minute

// purgeMarkers purges the delete markers of the bucket's stream up to each one's own
// revision, so a record written under its key since the read stays.
func (s *KV) purgeMarkers(ctx context.Context, markers []jetstream.KeyValueEntry) {
	if len(markers) == 0 {
		return
	}
	stream, err := s.js.Stream(ctx, "KV_"+s.bucket)
	for i, m := range markers {
		if err == nil {
			err = stream.Purge(ctx, jetstream.WithPurgeSubject("$KV."+s.bucket+"."+m.Key()), jetstream.WithPurgeSequence(m.Revision()+1))
		}
		if err != nil {
			level := slog.LevelWarn
			if ctx.Err() != nil {
				level = slog.LevelDebug // Close: nexd stopping
			}
			s.log.Log(context.Background(), level, "could not compact delete markers of the state bucket", "bucket", s.bucket, "purged", i, "of", len(markers), "err", err)
			return
		}
	}
	s.log.Debug("compacted delete markers of the state bucket", "bucket", s.bucket, "purged", len(markers))
}

// read passes each record whose key matches filter (and only, when not nil) and that
// DecodeRecord takes to found, by its type and id; it logs and skips the others. marker,
// when not nil, is given the delete markers, which are otherwise not read.
func (s *KV) read(ctx context.Context, filter string, only func(key string) bool, found func(typ, id string, req protocol.StartWorkloadRequest), marker func(jetstream.KeyValueEntry)) error {
	_, err := s.watch(ctx, filter, marker != nil, func(e jetstream.KeyValueEntry) bool {
		if e.Operation() != jetstream.KeyValuePut {
			marker(e)
			return false
		}
		if IsProbeKey(e.Key()) || (only != nil && !only(e.Key())) {
			return false // the probe: only ever purged; a value there is no workload's
		}
		req, err := CheckReadBack(s.bucket, e.Key(), e.Value(), s.maxValue)
		if err != nil {
			s.logBadRecord(err)
			return false
		}
		typ, id, _ := SplitKey(e.Key())
		found(typ, id, req)
		return false
	})
	return err
}

// watch returns the entries whose keys match filter for which keep says true; delete
// markers are read only with deletes.
func (s *KV) watch(ctx context.Context, filter string, deletes bool, keep func(jetstream.KeyValueEntry) bool, opts ...jetstream.WatchOpt) ([]jetstream.KeyValueEntry, error) {
	if !deletes {
		opts = append(opts, jetstream.IgnoreDeletes())
	}
	w, err := s.kv.Watch(ctx, filter, opts...)
	if err != nil {
		return nil, fmt.Errorf("state: read bucket %s: %w", s.bucket, err)
	}
	defer func() { _ = w.Stop() }()
	var out []jetstream.KeyValueEntry
	for {
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("state: read bucket %s: %w", s.bucket, ctx.Err())
		case e, ok := <-w.Updates():
			if !ok {
				return nil, fmt.Errorf("state: read bucket %s: watcher closed", s.bucket)
			}
			if e == nil { // initial values done
				return out, nil
			}
			if keep(e) {
				out = append(out, e)
			}
		}
	}
}

// IsProbeKey says whether key is the bucket's write probe (ProbeWrite), which is no
// workload's record: a read of the bucket passes over it.
func IsProbeKey(key string) bool { return key == probeKey }

// CheckReadBack checks a record read back from state bucket bucket, whose value limit
// is maxValue (<= 0: unknown, then the largest message a deploy may be), as the node
// checks each before it replays it (DecodeRecord); a *RecordError names the bucket, the
// key and the field. The node's reads (All) and nexctl node state's both use it, so
// what nexctl shows as bad is what the node skips.
func CheckReadBack(bucket, key string, value []byte, maxValue int) (protocol.StartWorkloadRequest, error) {
	req, err := DecodeRecord(key, value, maxValue)
	var re *RecordError
	if errors.As(err, &re) {
		re.Bucket = bucket
	}
	return req, err
}

// logBadRecord reports a record All skips.
func (s *KV) logBadRecord(err error) {
	var re *RecordError
	if errors.As(err, &re) {
		s.log.Warn("skipping a workload record of node state that cannot be replayed; mend or remove it",
			"bucket", s.bucket, "key", re.Key, "field", re.Field, "err", err)
		return
	}
	s.log.Warn("skipping a workload record of node state that cannot be replayed", "bucket", s.bucket, "err", err)
}

// ListNodeBuckets returns the node ids that have a state bucket in the domain. Only
// buckets named nex-<server public key> count: other nex-* buckets are not node state
// and must never be pruned.
func ListNodeBuckets(ctx context.Context, nc *nats.Conn, jsDomain string) ([]string, error) {
	js, err := newJS(nc, jsDomain)
	if err != nil {
		return nil, fmt.Errorf("state: JetStream (domain %q): %w", jsDomain, err)
	}
	names := js.KeyValueStoreNames(ctx)
	var ids []string
	for n := range names.Name() {
		if id, ok := strings.CutPrefix(n, BucketPrefix); ok && nkeys.IsValidPublicServerKey(id) {
			ids = append(ids, id)
		}
	}
	if err := names.Error(); err != nil {
		return nil, fmt.Errorf("state: list KV buckets (JetStream domain %q): %w", jsDomain, err)
	}
	return ids, nil
}

// PruneBuckets deletes the state buckets of nodes for which alive returns false and
// returns their node ids. It goes on past a failed delete and reports all failures.
func PruneBuckets(ctx context.Context, nc *nats.Conn, jsDomain string, alive func(nodeID string) bool) ([]string, error) {
	ids, err := ListNodeBuckets(ctx, nc, jsDomain)
	if err != nil {
		return nil, err
	}
	js, err := newJS(nc, jsDomain)
	if err != nil {
		return nil, fmt.Errorf("state: JetStream (domain %q): %w", jsDomain, err)
	}
	var removed []string
	var errs []error
	for _, id := range ids {
		if alive(id) {
			continue
		}
		if err := js.DeleteKeyValue(ctx, BucketName(id)); err != nil {
			errs = append(errs, fmt.Errorf("delete bucket %s: %w", BucketName(id), err))
			continue
		}
		removed = append(removed, id)
	}
	if len(errs) > 0 {
		return removed, fmt.Errorf("state: prune: %w", errors.Join(errs...))
	}
	return removed, nil
}

// BucketReplicas is the replica count of a node's existing bucket, read without
// changing anything; jetstream.ErrBucketNotFound is wrapped when there is none.
func BucketReplicas(ctx context.Context, nc *nats.Conn, nodeID, jsDomain string) (int, error) {
	js, err := newJS(nc, jsDomain)
	if err != nil {
		return 0, err
	}
	kv, err := js.KeyValue(ctx, BucketName(nodeID))
	if err != nil {
		return 0, fmt.Errorf("KV bucket %s: %w", BucketName(nodeID), err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return 0, fmt.Errorf("status of KV bucket %s: %w", BucketName(nodeID), err)
	}
	if bs, ok := st.(*jetstream.KeyValueBucketStatus); ok {
		return bs.StreamInfo().Config.Replicas, nil
	}
	return 0, fmt.Errorf("status of KV bucket %s: no stream info", BucketName(nodeID))
}
