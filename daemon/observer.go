package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/nexd-project/nexd/daemon/metrics"
	"github.com/nexd-project/nexd/daemon/mint"
)

// observer is the node's node.Observer: measurements go to the metrics, and the
// credentials of workloads that ended are revoked.
type observer struct {
	metrics.Observer
	s *server
}

// revokeTimeout bounds one revocation; the stop waits for revocations in flight.
const revokeTimeout = 10 * time.Second

// WorkloadEnded revokes what can be revoked; at least the minter forgets the workload.
func (o observer) WorkloadEnded(id string) {
	r := o.s.minter
	o.s.revokes.goFn(func() {
		// Workloads end during the drain too: their revocation outlives the stop
		// request, bounded by its own timeout.
		ctx, cancel := context.WithTimeout(context.WithoutCancel(o.s.ctx), revokeTimeout)
		defer cancel()
		if err := r.RevokeWorkload(ctx, id); err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) &&
			!errors.Is(err, mint.ErrUnknownWorkload) {
			o.s.log.Warn("could not revoke an ended workload's credentials", "workload_id", id, "err", err)
		}
	})
}
