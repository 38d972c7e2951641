package metrics

import (
	"context"

	"github.com/nexd-project/nexd/daemon/node"
	"github.com/nexd-project/nexd/protocol"
)

// CountStore wraps a state store so its traffic and errors show in the metrics.
func (m *Metrics) CountStore(s node.Store) node.Store { return countingStore{Store: s, m: m} }

type countingStore struct {
	node.Store
	m *Metrics
}

func (s countingStore) Put(ctx context.Context, typ, id string, req protocol.StartWorkloadRequest) error {
	err := s.Store.Put(ctx, typ, id, req)
	if err != nil {
		s.m.kvErrors.Inc()
	} else {
		s.m.stored.Inc()
	}
	return err
}

func (s countingStore) Delete(ctx context.Context, typ, id string) error {
	err := s.Store.Delete(ctx, typ, id)
	if err != nil {
		s.m.kvErrors.Inc()
	} else {
		s.m.removed.Inc()
	}
	return err
}
