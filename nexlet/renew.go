package nexlet

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/nexd-project/nexd/protocol"
)

// ErrNotRegistered is returned by RenewWorkloadCreds before Run succeeded.
var ErrNotRegistered = errors.New("nexlet runner is not registered with its node")

// RenewWorkloadCreds asks the node for fresh credentials of a workload this nexlet runs
// (a nexd extension: $NEX.SVC.<node>.agent.RENEWCREDS.<agent id>.<workload id>). An
// upstream node does not answer: the request then fails with ctx's deadline.
func (r *Runner) RenewWorkloadCreds(ctx context.Context, workloadID, namespace string) (protocol.NatsConnectionData, error) {
	var cd protocol.NatsConnectionData
	nc, agentID := r.NC(), r.AgentID()
	if nc == nil || agentID == "" {
		return cd, ErrNotRegistered
	}
	body, err := protocol.Marshal(protocol.RenewCredsRequest{Namespace: namespace})
	if err != nil {
		return cd, err
	}
	subj := protocol.RenewCredsSubject(r.nodeID, agentID, workloadID)
	msg, err := nc.RequestWithContext(ctx, subj, body)
	if err != nil {
		return cd, fmt.Errorf("renew credentials on %s: %w", subj, err)
	}
	if code := msg.Header.Get(protocol.HeaderErrorCode); code != "" {
		return cd, fmt.Errorf("renew credentials on %s refused: %s %s: %s", subj, code, msg.Header.Get(protocol.HeaderError), bytes.TrimSpace(msg.Data))
	}
	if err := protocol.Decode(msg.Data, &cd); err != nil {
		return cd, fmt.Errorf("renew credentials on %s: %w", subj, err)
	}
	return cd, nil
}
