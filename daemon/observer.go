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

// revokeTimeout bounds one revocation attempt; the stop waits for revocations in
// flight.
const revokeTimeout = 10 * time.Second

// WorkloadEnded revokes what can be revoked, again with backoff while it fails, until
// the workload's users have expired or the node stops; at least the minter forgets
// the workload.
func (o observer) WorkloadEnded(id string) {
	r := o.s.minter
	until := time.Now().Add(o.s.daemon.cfg().Node.WorkloadCredsTTL) // its newest user expires by then
	o.s.revokes.goFn(func() {
		// Workloads end during the drain too: their attempts outlive the stop request,
		// each bounded by its own timeout; the retries end where the stop waits for them.
		err := mint.RetryRevocation(o.s.revokeRetries, revokeTimeout, until, func(ctx context.Context) error {
			return r.RevokeWorkload(ctx, id)
		})
		if err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) && !errors.Is(err, mint.ErrUnknownWorkload) {
			o.s.log.Warn("gave up revoking an ended workload's credentials", "workload_id", id, "err", err)
		}
	})
}
