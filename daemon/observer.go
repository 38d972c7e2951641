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
	d *daemon
}

// WorkloadEnded revokes what can be revoked; at least the minter forgets the workload.
func (o observer) WorkloadEnded(id string) {
	r, ok := o.d.minter.(interface {
		RevokeWorkload(context.Context, string) error
	})
	if !ok {
		return
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := r.RevokeWorkload(ctx, id); err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) &&
			!errors.Is(err, mint.ErrUnknownWorkload) {
			o.d.log.Warn("could not revoke an ended workload's credentials", "workload_id", id, "err", err)
		}
	}()
}
