package node

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"sync"

	"github.com/nexd-project/nexd/daemon/state"
	"github.com/nexd-project/nexd/protocol"
)

// Store persists the start requests of running workloads so that a nexlet that
// registers again (after a restart of it or of the node) gets them back in
// existing_state. Keys are the workload type and id, as in upstream's KV layout
// `<type>_<id>`.
type Store interface {
	// Put records a started workload. It must refuse values it cannot hold
	// (with an error matching state.ErrValueTooLarge when the value is too big)
	// rather than drop them; the node writes it before the start, so such a deploy is
	// refused with nothing running.
	Put(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error
	// Delete forgets a workload; deleting an unknown workload is not an error.
	Delete(ctx context.Context, workloadType, workloadID string) error
	// ByType returns the workloads of exactly this type (not a prefix match),
	// keyed by workload id.
	ByType(ctx context.Context, workloadType string) (map[string]protocol.StartWorkloadRequest, error)
	// MarkStarted stores req (the record as the deploy wrote it, with Started set) over
	// the workload's record only if that record is still there unchanged: a mark never
	// brings back a workload removed meanwhile (a quick job's end, a stop). Gone, it is
	// not an error.
	MarkStarted(ctx context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error
	// All returns every stored workload, keyed by <type>_<id> (state.Key): the node
	// reads it at its start to know whose each workload is before any nexlet
	// registers again (Node.loadRecorded).
	All(ctx context.Context) (map[string]protocol.StartWorkloadRequest, error)
}

// NoStore keeps nothing (--state "").
type NoStore struct{}

// Put implements Store.
func (NoStore) Put(context.Context, string, string, protocol.StartWorkloadRequest) error {
	return nil
}

// Delete implements Store.
func (NoStore) Delete(context.Context, string, string) error { return nil }

// MarkStarted implements Store.
func (NoStore) MarkStarted(context.Context, string, string, protocol.StartWorkloadRequest) error {
	return nil
}

// ByType implements Store.
func (NoStore) ByType(context.Context, string) (map[string]protocol.StartWorkloadRequest, error) {
	return map[string]protocol.StartWorkloadRequest{}, nil
}

// All implements Store.
func (NoStore) All(context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	return map[string]protocol.StartWorkloadRequest{}, nil
}

// DefaultMaxValueBytes matches upstream's KV bucket value limit.
const DefaultMaxValueBytes = 10_000

// MemStore is an in-memory Store: state for the lifetime of the process only.
type MemStore struct {
	// MaxValueBytes bounds one encoded start request; 0 means DefaultMaxValueBytes,
	// a negative value means no limit.
	MaxValueBytes int

	mu     sync.Mutex
	byType map[string]map[string]protocol.StartWorkloadRequest
}

// NewMemStore returns an empty MemStore with the default value limit.
func NewMemStore() *MemStore { return &MemStore{} }

// Put implements Store.
func (s *MemStore) Put(_ context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	if workloadType == "" || workloadID == "" {
		return fmt.Errorf("memstore: put: workload type %q and id %q must both be set", workloadType, workloadID)
	}
	b, err := json.Marshal(req)
	if err != nil {
		return fmt.Errorf("memstore: encode workload %s: %w", workloadID, err)
	}
	limit := s.MaxValueBytes
	if limit == 0 {
		limit = DefaultMaxValueBytes
	}
	if limit > 0 && len(b) > limit {
		return &state.ValueTooLargeError{Size: len(b), Limit: limit}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.byType == nil {
		s.byType = map[string]map[string]protocol.StartWorkloadRequest{}
	}
	m := s.byType[workloadType]
	if m == nil {
		m = map[string]protocol.StartWorkloadRequest{}
		s.byType[workloadType] = m
	}
	m[workloadID] = req
	return nil
}

// Delete implements Store.
func (s *MemStore) Delete(_ context.Context, workloadType, workloadID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.byType[workloadType], workloadID)
	return nil
}

// MarkStarted implements Store.
func (s *MemStore) MarkStarted(_ context.Context, workloadType, workloadID string, req protocol.StartWorkloadRequest) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.byType[workloadType][workloadID]; ok {
		s.byType[workloadType][workloadID] = req
	}
	return nil
}

// ByType implements Store.
func (s *MemStore) ByType(_ context.Context, workloadType string) (map[string]protocol.StartWorkloadRequest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := maps.Clone(s.byType[workloadType])
	if out == nil {
		out = map[string]protocol.StartWorkloadRequest{}
	}
	return out, nil
}

// All implements Store.
func (s *MemStore) All(context.Context) (map[string]protocol.StartWorkloadRequest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := map[string]protocol.StartWorkloadRequest{}
	for typ, m := range s.byType {
		for id, req := range m {
			out[typ+"_"+id] = req
		}
	}
	return out, nil
}

// Len returns how many workloads are stored, over all types.
func (s *MemStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, m := range s.byType {
		n += len(m)
	}
	return n
}
