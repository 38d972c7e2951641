package node

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/micro"

	"github.com/nexd-project/nexd/daemon/mint"

	"github.com/nexd-project/nexd/protocol"
)

// renewEndpoint is the nexd extension that lets a nexlet renew a running workload's
// expiring credentials.
func (n *Node) renewEndpoint() endpoint {
	return endpoint{name: "RenewWorkloadCreds", subject: protocol.RenewCredsSubject(n.id, "*", "*"), handle: n.handleRenewCreds}
}

// ownedBy reports whether this node deployed or replayed workloadID to nexlet agentID:
// the same nexlet instance (its stable identity), not merely one of the same type.
func (n *Node) ownedBy(agentID, workloadID string) (bool, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	a := n.agents[agentID]
	if a == nil {
		return false, fmt.Errorf("nexlet %s is not registered with node %s", agentID, n.id)
	}
	o, ok := n.owned[workloadID]
	return ok && o.owner == a.owner, nil
}

// handleRenewCreds serves $NEX.SVC.<node>.agent.RENEWCREDS.<agentId>.<workloadId>: fresh
// credentials for a workload this node gave that nexlet, minted for the namespace the
// nexlet names (a signing-key minter refuses a namespace other than the workload's).
func (n *Node) handleRenewCreds(r micro.Request) {
	agentID, workloadID := protocol.Token(r.Subject(), 5), protocol.Token(r.Subject(), 6)
	if !tokenRE.MatchString(agentID) || !tokenRE.MatchString(workloadID) {
		n.fail(r, 400, "bad renewal subject", fmt.Errorf("renew credentials: subject %q: want RENEWCREDS.<agent id>.<workload id>", r.Subject()))
		return
	}
	if !n.ownInbox(r, agentID) {
		return
	}
	var req protocol.RenewCredsRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad renewal request", err)
		return
	}
	if req.Namespace == "" {
		n.fail(r, 400, "bad renewal request", fmt.Errorf("renew credentials of workload %s: namespace is required", workloadID))
		return
	}
	owned, err := n.ownedBy(agentID, workloadID)
	if err != nil {
		n.fail(r, 403, "renewal refused", fmt.Errorf("renew credentials of workload %s: %w", workloadID, err))
		return
	}
	if !owned {
		n.fail(r, 404, "workload not found", fmt.Errorf("renew credentials: node %s did not give workload %s to nexlet %s", n.id, workloadID, agentID))
		return
	}
	creds, err := n.o.Minter.RenewWorkload(req.Namespace, workloadID)
	if err != nil {
		n.fail(r, 403, "renewal refused", fmt.Errorf("renew credentials of workload %s in namespace %s: %w", workloadID, req.Namespace, err))
		return
	}
	n.log.Debug("workload credentials renewed", "workload_id", workloadID, "namespace", req.Namespace, "agent_id", agentID)
	n.respondJSON(r, creds)
	n.revokeSuperseded(workloadID)
}

// revokeSuperseded revokes a renewed workload's older users once its nexlet had time to
// hand on the new ones (RevokeGrace): the workload's connection is then cut and it
// reconnects with its renewed creds file, and a copy of the old credentials is
// worthless from then on.
func (n *Node) revokeSuperseded(workloadID string) {
	n.afterGrace("workload_id", workloadID, func(ctx context.Context) error {
		return n.o.Minter.RevokeSuperseded(ctx, workloadID)
	})
}

// revokeAgentSuperseded revokes a nexlet's registration users and its previous starts'
// users once it registered again (after RevokeGrace, so the registration reply is out).
func (n *Node) revokeAgentSuperseded(agentID string) {
	n.afterGrace("agent_id", agentID, func(ctx context.Context) error {
		return n.o.Minter.RevokeAgentSuperseded(ctx, agentID)
	})
}

// afterGrace runs a revocation after RevokeGrace on a goroutine the node waits for.
func (n *Node) afterGrace(key, id string, revoke func(context.Context) error) {
	n.mu.Lock()
	ctx := n.ctx
	n.mu.Unlock()
	if ctx == nil {
		return
	}
	n.inflight.Add(1)
	go func() {
		defer n.inflight.Done()
		select {
		case <-ctx.Done():
			return
		case <-time.After(n.o.RevokeGrace):
		}
		rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		if err := revoke(rctx); err != nil && !errors.Is(err, mint.ErrRevocationUnsupported) {
			n.log.Warn("could not revoke superseded credentials; they expire with their TTL", key, id, "err", err)
		}
	}()
}
