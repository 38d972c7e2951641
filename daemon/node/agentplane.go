package node

import (
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/micro"
	"github.com/nats-io/nuid"
	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nexd-project/nexd/protocol"
)

// noRemoteRefs refuses every external $ref: a nexlet's schema must be self-contained,
// and the node must never read a file or URL a nexlet names.
type noRemoteRefs struct{}

func (noRemoteRefs) Load(url string) (any, error) {
	return nil, fmt.Errorf("external $ref %q is not allowed in a start request schema", url)
}

// compileSchema compiles a nexlet's start_request_schema.
func compileSchema(agentID, schema string) (*jsonschema.Schema, error) {
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(schema))
	if err != nil {
		return nil, fmt.Errorf("not valid JSON: %w", err)
	}
	c := jsonschema.NewCompiler()
	c.UseLoader(noRemoteRefs{})
	loc := "urn:nexd:nexlet:" + agentID + ":start_request"
	if err := c.AddResource(loc, doc); err != nil {
		return nil, err
	}
	s, err := c.Compile(loc)
	if err != nil {
		return nil, fmt.Errorf("does not compile: %w", err)
	}
	return s, nil
}

// handleRegister serves $NEX.SVC.<node>.agent.REGISTER.<agentId>.
func (n *Node) handleRegister(r micro.Request) {
	agentID := protocol.Token(r.Subject(), 5)
	if !tokenRE.MatchString(agentID) {
		n.fail(r, 400, "bad agent id", fmt.Errorf("agent id %q in the subject must be letters, digits, - or _", agentID))
		return
	}
	if !n.ownInbox(r, agentID) {
		return
	}
	var req protocol.RegisterAgentRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad agent registration", err)
		return
	}
	if req.RegisterType == "" {
		n.fail(r, 400, "register_type is required", errors.New("invalid RegisterAgentRequest: field \"register_type\": must not be empty"))
		return
	}
	if req.MaxWorkloads < 0 {
		n.fail(r, 400, "bad agent registration", fmt.Errorf("invalid RegisterAgentRequest: field \"max_workloads\": %v must not be negative", req.MaxWorkloads))
		return
	}
	n.mu.Lock()
	_, expected := n.expected[agentID]
	_, known := n.agents[agentID]
	n.mu.Unlock()
	if !expected && !known && !n.o.AllowRemoteRegistration {
		n.fail(r, 403, "registration refused", fmt.Errorf("agent id %s was not assigned by node %s and remote registration is disabled (allow_remote_agent_registration)", agentID, n.id))
		return
	}
	schema, err := compileSchema(agentID, req.StartRequestSchema)
	if err != nil {
		n.fail(r, 400, "bad start request schema", fmt.Errorf("invalid RegisterAgentRequest: field \"start_request_schema\": %w", err))
		return
	}
	creds, err := n.o.Minter.MintAgent(agentID, n.id)
	if err != nil {
		n.fail(r, 500, "failed to mint nexlet credentials", fmt.Errorf("mint agent %s: %w", agentID, err))
		return
	}
	existing := map[string]protocol.AgentStartWorkloadRequest{}
	stored, err := n.o.Store.ByType(n.ctx, req.RegisterType)
	if err != nil {
		n.log.Warn("failed to read node state for a registering nexlet", "agent_id", agentID, "type", req.RegisterType, "err", err)
	}
	n.mu.Lock()
	for wid := range n.starting {
		// Recorded before its start: the deploy in flight starts it, not the replay.
		delete(stored, wid)
	}
	n.mu.Unlock()
	for wid, swr := range stored {
		wc, err := n.o.Minter.MintWorkload(swr.Namespace, wid)
		if err != nil {
			n.log.Warn("not replaying workload: minting its credentials failed", "workload_id", wid, "namespace", swr.Namespace, "err", err)
			continue
		}
		existing[wid] = protocol.AgentStartWorkloadRequest{Request: swr, WorkloadCreds: wc}
	}

	now := time.Now()
	n.mu.Lock()
	for wid, w := range existing {
		n.owned[wid] = w.Request.WorkloadType
	}
	n.mu.Unlock()
	reg := &registration{id: agentID, req: req, schema: schema, registeredAt: now, lastSeen: now, reported: protocol.HealthUnknown}
	var replaced []*registration
	n.mu.Lock()
	for id, old := range n.agents {
		// A restarted nexlet registers again, under its old id or a new one.
		if id == agentID || (req.Name != "" && old.req.Name == req.Name) {
			replaced = append(replaced, old)
			delete(n.agents, id)
		}
	}
	n.agents[agentID] = reg
	n.notifyLocked()
	n.mu.Unlock()
	for _, old := range replaced {
		if old.id != agentID {
			n.agentStopped(old, fmt.Sprintf("replaced by a new registration of %q as %s", req.Name, agentID))
		}
	}

	n.respondJSON(r, protocol.RegisterAgentResponse{
		ConnectionData: creds,
		ExistingState:  existing,
		Message:        fmt.Sprintf("registered %s [%s] as %s", req.Name, req.RegisterType, agentID),
		NodeID:         n.id,
		Success:        true,
	})
	n.log.Info("nexlet registered", "agent_id", agentID, "name", req.Name, "type", req.RegisterType,
		"version", req.Version, "replayed", len(existing))
	n.o.Emitter.Emit(n.id, protocol.EventAgentStarted, protocol.AgentStartedEvent{ID: agentID, Name: req.Name, RegisterType: req.RegisterType, Timestamp: now.UTC()})
}

// ownInbox reports whether a request from the child with this id may be answered on
// its reply subject: with private inboxes only the child's own prefix is, so that no
// credentials ever go to an inbox another client can read. A refusal is logged with
// the reason and not answered (the reply subject is not the child's).
func (n *Node) ownInbox(r micro.Request, id string) bool {
	if !n.o.Minter.PrivateInboxes() || strings.HasPrefix(r.Reply(), protocol.InboxPrefix(id)+".") {
		return true
	}
	n.log.Warn("request refused: the reply subject is not the sender's private inbox",
		"subject", r.Subject(), "reply", r.Reply(), "want_prefix", protocol.InboxPrefix(id)+".")
	return false
}

// handleRemoteRegister serves $NEX.SVC.<nexus>.agent.RREGISTER (queue group = nexus,
// so one node of the nexus answers).
func (n *Node) handleRemoteRegister(r micro.Request) {
	var req protocol.RegisterRemoteAgentRequest
	if err := protocol.Decode(r.Data(), &req); err != nil {
		n.fail(r, 400, "bad remote registration", err)
		return
	}
	if !n.o.Minter.CanMint() {
		n.fail(r, 403, "node cannot mint credentials", fmt.Errorf("node %s cannot mint credentials for a remote nexlet: configure issuer_signing_key and issuer_signing_key_root_account (or issuer_nkey and issuer_nkey_seed)", n.id))
		return
	}
	agentID := nuid.Next()
	creds, err := n.o.Minter.MintRegister(agentID, n.id)
	if err != nil {
		n.fail(r, 500, "failed to mint registration credentials", fmt.Errorf("mint register %s: %w", agentID, err))
		return
	}
	n.log.Info("remote nexlet assigned an id", "agent_id", agentID)
	n.respondJSON(r, protocol.RegisterRemoteAgentResponse{AssignedAgentID: agentID, RegistrationCreds: &creds, RespondTo: n.id})
}
