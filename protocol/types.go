package protocol

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// NodeState is a node's lifecycle state.
type NodeState string

// Node states, as upstream enumerates them.
const (
	NodeStarting NodeState = "starting"
	NodeRunning  NodeState = "running"
	NodeLameduck NodeState = "lameduck"
	NodeStopping NodeState = "stopping"
	NodeError    NodeState = "error"
)

// Lifecycle is a workload lifecycle.
type Lifecycle string

// Workload lifecycles.
const (
	LifecycleService  Lifecycle = "service"
	LifecycleJob      Lifecycle = "job"
	LifecycleFunction Lifecycle = "function"
)

// Valid reports whether l is one of the lifecycles upstream accepts.
func (l Lifecycle) Valid() bool {
	return l == LifecycleService || l == LifecycleJob || l == LifecycleFunction
}

// WorkloadState is a workload's state as reported by its nexlet. Only these values
// decode on upstream clients, so nexd never sends any other.
type WorkloadState string

// Workload states.
const (
	WorkloadStarting WorkloadState = "starting"
	WorkloadRunning  WorkloadState = "running"
	WorkloadWarm     WorkloadState = "warm"
	WorkloadStopping WorkloadState = "stopping"
	WorkloadStopped  WorkloadState = "stopped"
	WorkloadError    WorkloadState = "error"
)

// Generic error texts that clients match on.
const (
	ErrTextWorkloadNotFound  = "workload not found"
	ErrTextNamespaceNotFound = "namespace not found"
	// ErrTextStateUnreadable is the description (Nats-Service-Error) of a nexd node's
	// 503 refusal of a nexlet's registration while it cannot read its state store:
	// the nexlet is to register again.
	ErrTextStateUnreadable = "node state unreadable; register again"
)

// NatsConnectionData is how a nexlet or workload reaches NATS. Every key is always sent.
type NatsConnectionData struct {
	ConnName         string   `json:"conn_name"`
	NatsServers      []string `json:"nats_servers"`
	NatsUserJWT      string   `json:"nats_user_jwt"`
	NatsUserName     string   `json:"nats_user_name"`
	NatsUserNkey     string   `json:"nats_user_nkey"`
	NatsUserPassword string   `json:"nats_user_password"`
	NatsUserSeed     string   `json:"nats_user_seed"`
	TLSCA            string   `json:"tls_ca"`
	TLSCert          string   `json:"tls_cert"`
	TLSFirst         bool     `json:"tls_first"`
	TLSKey           string   `json:"tls_key"`

	// InboxPrefix is a nexd extension: the only inbox prefix the user may subscribe
	// to (nats.CustomInboxPrefix). Empty: the default _INBOX.
	InboxPrefix string `json:"nexd_inbox_prefix,omitempty"`
}

// EncEnv is an environment sealed with nkeys curve (xkey) encryption for one recipient.
type EncEnv struct {
	Base64EncryptedEnv string `json:"base64_encrypted_env"`
	EncryptedBy        string `json:"encrypted_by"`
}

// ---- control plane ----

// NodePingRequest pings nodes; every filter tag must match for a node to answer.
type NodePingRequest struct {
	Filter map[string]string `json:"filter"`
}

// NodePingResponse is one node's answer to a ping.
type NodePingResponse struct {
	AgentCount int               `json:"agent_count"`
	NodeID     string            `json:"node_id"`
	StartTime  time.Time         `json:"start_time"`
	State      NodeState         `json:"state"`
	Tags       map[string]string `json:"tags"`
	Version    string            `json:"version"`
	XKey       string            `json:"xkey"`
}

// NodeInfoRequest is empty on the wire ({}).
type NodeInfoRequest map[string]any

// NodeInfoResponse describes one node and its nexlets.
type NodeInfoResponse struct {
	NodeAgentSummaries []NodeAgentSummary `json:"node_agent_summaries,omitempty"`
	NodeID             string             `json:"node_id"`
	Tags               map[string]string  `json:"tags"`
	Uptime             string             `json:"uptime"`
	Version            string             `json:"version"`
	XKey               string             `json:"xkey"`

	// nexd extension: the auctions the node did not bid on since it started, by reason
	// (draining, tags, no_nexlet, …; see nexd_auctions_not_bid_total).
	AuctionsNotBid map[string]uint64 `json:"nexd_auctions_not_bid,omitempty"`
	// nexd extension: the stopped workloads whose removal from node state is pending
	// (a tombstone on the node keeps each out of replays until a retry removes it),
	// oldest first, at most MaxInfoTombstones; TombstoneCount counts them all. Both
	// absent when there are none.
	Tombstones     []Tombstone `json:"nexd_tombstones,omitempty"`
	TombstoneCount int         `json:"nexd_tombstone_count,omitempty"`
	// nexd extension: the outcome of the node's last lame duck drain, kept in its state
	// directory until its next lame duck (absent before any, and while one is under way).
	LastDrain *LastDrain `json:"nexd_last_drain,omitempty"`
}

// LastDrain is how a node's last lame duck drain ended (DrainDrained or DrainFailed,
// with the reason), and when.
type LastDrain struct {
	State  string    `json:"state"`
	Reason string    `json:"reason,omitempty"`
	At     time.Time `json:"at"`
}

// MaxInfoTombstones bounds the tombstones a node lists in its INFO answer.
const MaxInfoTombstones = 100

// Tombstone is a stopped workload whose removal from node state is pending.
type Tombstone struct {
	ID        string    `json:"id"`
	Type      string    `json:"type"`
	Namespace string    `json:"namespace,omitempty"` // "" when not known (an older nexd's tombstone)
	Since     time.Time `json:"since"`               // when its removal first failed
}

// Agent health values and their stoplights.
const (
	HealthHealthy      = "healthy"
	HealthDegraded     = "degraded"
	HealthShuttingDown = "shutting down"
	HealthOffline      = "offline"
	HealthUnknown      = "unknown"
)

// Stoplight returns upstream's stoplight glyph for a health value.
func Stoplight(health string) string {
	switch health {
	case HealthHealthy:
		return "🟢"
	case HealthDegraded:
		return "🟡"
	case HealthShuttingDown:
		return "🟠"
	case HealthOffline:
		return "🔴"
	default:
		return "⚪️"
	}
}

// NodeAgentSummary is one nexlet in a node info response. The trailing fields are nexd
// extensions that upstream clients ignore.
type NodeAgentSummary struct {
	AgentHealth            string       `json:"agent_health"`
	AgentHealthStoplight   string       `json:"agent_health_stoplight"`
	AgentID                string       `json:"agent_id"`
	AgentLastHeartbeatTime time.Time    `json:"agent_last_heartbeat_time"`
	AgentSummary           AgentSummary `json:"agent_summary"`

	// nexd extensions.
	Restarts int    `json:"nexd_restarts,omitempty"`
	LastExit string `json:"nexd_last_exit,omitempty"`
	// MaxWorkloads is the nexlet's max_workloads (absent: no bound); with
	// AgentSummary.WorkloadCount it tells a client why the node withholds its bids.
	MaxWorkloads int `json:"nexd_max_workloads,omitempty"`
	// EndsUnheard is set while the node does not hear the nexlet's workload ends: a
	// nexlet on upstream's SDK whose list rounds are not whole.
	EndsUnheard *EndsUnheard `json:"nexd_ends_unheard,omitempty"`
}

// EndsUnheard says since when a node has not heard a nexlet's workload ends: its list
// rounds were not whole Rounds times in a row, the last failing Checks (comma-separated:
// answers_missing, answers_extra, answer_failed, listed_twice, no_ping_answer,
// count_mismatch, ask_failed).
type EndsUnheard struct {
	Since  time.Time `json:"since"`
	Rounds int       `json:"rounds"`
	Checks string    `json:"checks"`
}

// AgentSummary is a nexlet's view of itself.
type AgentSummary struct {
	Name                string    `json:"name"`
	StartTime           time.Time `json:"start_time"`
	State               string    `json:"state"`
	SupportedLifecycles string    `json:"supported_lifecycles"`
	Type                string    `json:"type"`
	Version             string    `json:"version"`
	WorkloadCount       int       `json:"workload_count"`
}

// LameduckRequest asks a node (or its agents) to drain. Delay is a Go duration string.
type LameduckRequest struct {
	Delay string            `json:"delay"`
	Tag   map[string]string `json:"tag,omitempty"`
}

// ParseDelay returns the request's delay as a duration.
func (r LameduckRequest) ParseDelay() (time.Duration, error) {
	d, err := time.ParseDuration(r.Delay)
	if err != nil {
		return 0, fmt.Errorf("delay %q: %w", r.Delay, err)
	}
	if d < 0 {
		return 0, fmt.Errorf("delay %q: must not be negative", r.Delay)
	}
	return d, nil
}

// LameduckResponse answers a lameduck request.
type LameduckResponse struct {
	Message string `json:"message"`
	Success bool   `json:"success"`

	// Drain (nexd extension) answers HeaderDrainWait: see DrainOutcome.
	Drain *DrainOutcome `json:"nexd_drain,omitempty"`
}

// AuctionRequest asks every node that can run agent_type with the given tags to bid.
// Lifecycle is a nexd extension (upstream nodes ignore it): when set, a nexd node
// bids only with a nexlet that supports that lifecycle.
type AuctionRequest struct {
	AgentType string            `json:"agent_type"`
	AuctionID string            `json:"auction_id"`
	Tags      map[string]string `json:"tags"`

	Lifecycle Lifecycle `json:"nexd_workload_lifecycle,omitempty"`
}

// AuctionResponse is a bid. The nexd_* fields are extensions upstream clients ignore;
// they let a smarter client choose the least-loaded node.
type AuctionResponse struct {
	BidderID            string      `json:"bidder_id"`
	StartRequestSchema  string      `json:"start_request_schema"`
	SupportedLifecycles []Lifecycle `json:"supported_lifecycles"`
	XKey                string      `json:"xkey"`

	NodeID        string `json:"nexd_node_id,omitempty"`
	NodeName      string `json:"nexd_node_name,omitempty"`
	WorkloadCount int    `json:"nexd_workload_count,omitempty"`
	// Sig is the node's signature (base64 std, by its server nkey, whose public key is
	// NodeID) over BidPayload: a client seals secrets only to the xkey of a bid whose
	// signer is the node it names.
	Sig string `json:"nexd_sig,omitempty"`
}

// BidPayload is what a node signs in a bid: the auction it answers (namespace and
// auction id, so a bid cannot be replayed into another auction), the bidder id, the
// node id and the nexlet's xkey.
func BidPayload(namespace, auctionID string, b AuctionResponse) []byte {
	return []byte("nexd-bid/1\n" + namespace + "\n" + auctionID + "\n" + b.BidderID + "\n" + b.NodeID + "\n" + b.XKey)
}

// StartWorkloadRequest is what a client deploys. RunRequest is a JSON document, carried
// as a string, validated against the nexlet's start request schema.
type StartWorkloadRequest struct {
	Description       string            `json:"description"`
	Metadata          map[string]any    `json:"metadata,omitempty"`
	Name              string            `json:"name"`
	Namespace         string            `json:"namespace"`
	Reference         *string           `json:"reference,omitempty"`
	RunRequest        string            `json:"run_request"`
	Tags              map[string]string `json:"tags"`
	WorkloadLifecycle Lifecycle         `json:"workload_lifecycle"`
	WorkloadType      string            `json:"workload_type"`

	// Owner (nexd, node state only) is the nexlet instance that runs the workload, as
	// the node's record keeps it across restarts. The node sets it when it records a
	// deploy, ignores any value a client sends, and never passes it to a nexlet.
	Owner string `json:"nexd_owner,omitempty"`

	// Memory (nexd, node state only) is the memory of starts (RegisterAgentRequest.Memory)
	// of the nexlet the start was sent to, when the deploy recorded it. Set and kept
	// like Owner.
	Memory string `json:"nexd_memory,omitempty"`

	// Started (nexd, node state only) is set once the nexlet answered the start (a job's
	// record only, written after the client's reply): a stored job its nexlet does not
	// hold then ran, whatever the nexlet remembers. Set and kept like Owner.
	Started bool `json:"nexd_started,omitempty"`
}

// StartWorkloadResponse names the started workload.
type StartWorkloadResponse struct {
	ID   string `json:"id"`
	Name string `json:"name"`
}

// AgentStartWorkloadRequest is what a node sends a nexlet to start a workload.
type AgentStartWorkloadRequest struct {
	Request       StartWorkloadRequest `json:"request"`
	WorkloadCreds NatsConnectionData   `json:"workload_creds"`
	// ArtifactCreds, when set, is the user the nexlet fetches a nats:// artifact with
	// (nexd extension): the workload's own user has no JetStream grant.
	ArtifactCreds *NatsConnectionData `json:"nexd_artifact_creds,omitempty"`
}

// StopWorkloadRequest stops a workload in a namespace.
type StopWorkloadRequest struct {
	Namespace string `json:"namespace"`
	// Keep (nexd extension, node to nexlet): a stop at nexd's shutdown, after which the
	// workload stays in node state and is started again at the next start; the nexlet
	// keeps no record of it as a stop asked for (a recorded one is reported in
	// RegisterAgentRequest.Stopped and removed from node state).
	Keep bool `json:"nexd_keep,omitempty"`
	// RecordAck (nexd extension, node to nexlet): say once the stop is durably
	// recorded (a body-less reply carrying HeaderStopRecorded, before the answer), so
	// the node can tell a client that does not wait (nexctl workload stop --no-wait)
	// that the stop survives a crash of the nexlet or of nexd from then on. Sent only to
	// a nexlet that registered with StopAck; others ignore it.
	RecordAck bool `json:"nexd_record_ack,omitempty"`
}

// StopWorkloadResponse reports the outcome of a stop.
type StopWorkloadResponse struct {
	ID           string `json:"id"`
	Message      string `json:"message"`
	Stopped      bool   `json:"stopped"`
	WorkloadType string `json:"workload_type"`

	// nexd extension: set (RFC 3339) when the workload had stopped before this request,
	// at that time (a repeated stop); upstream clients ignore it and read stopped and
	// message ("already stopped at T ...").
	AlreadyStoppedAt string `json:"nexd_already_stopped_at,omitempty"`
	// nexd extension: set when the stopped workload could not be removed from node
	// state (the state store unreachable): StateRemovalPending (a tombstone keeps it
	// from being replayed until a retried removal succeeds) or StateRemovalFailed (no
	// tombstone either: a restart of nexd or its nexlet may start it again).
	StateRemoval string `json:"nexd_state_removal,omitempty"`
}

// StopWorkloadResponse.StateRemoval values.
const (
	StateRemovalPending = "pending"
	StateRemovalFailed  = "failed"
)

// CloneWorkloadRequest asks for a workload's start request.
type CloneWorkloadRequest struct {
	Namespace     string `json:"namespace"`
	NewTargetXKey string `json:"new_target_xkey"`

	// nexd extension: the signed bid (and its auction) whose nexlet xkey is
	// new_target_xkey. A nexd node lets a sealed environment be re-sealed only to the
	// xkey of a bid a node signed; without one, new_target_xkey is ignored.
	Bid          *AuctionResponse `json:"nexd_bid,omitempty"`
	BidAuctionID string           `json:"nexd_bid_auction_id,omitempty"`
	BidNamespace string           `json:"nexd_bid_namespace,omitempty"`
}

// AgentListWorkloadsRequest lists workloads in a namespace, optionally by id or name.
type AgentListWorkloadsRequest struct {
	Filter    []string `json:"filter"`
	Namespace string   `json:"namespace"`
}

// WorkloadSummary is one workload in a list.
type WorkloadSummary struct {
	ID                string            `json:"id"`
	Metadata          map[string]string `json:"metadata,omitempty"`
	Name              string            `json:"name"`
	Namespace         *string           `json:"namespace,omitempty"`
	Runtime           string            `json:"runtime"`
	StartTime         string            `json:"start_time"`
	Tags              map[string]string `json:"tags"`
	WorkloadLifecycle string            `json:"workload_lifecycle"`
	WorkloadState     WorkloadState     `json:"workload_state"`
	WorkloadType      string            `json:"workload_type"`
	// Resources are the workload's cgroup figures, which a nexd node adds for a client
	// that asks (HeaderResources on WPING); absent otherwise and from upstream nodes.
	Resources *WorkloadResources `json:"resources,omitempty"`
}

// PartialList is the value of HeaderPartial on a node's WPING reply: which of its
// nexlets' workloads the list lacks, and the fan-out's bound.
type PartialList struct {
	NodeName string `json:"node_name"`
	Wait     string `json:"wait"` // how long the node waited for its nexlets
	// Missing names the nexlets, for the system namespace only: a caller in another
	// namespace gets MissingCount alone (the node's nexlets are its operator's).
	Missing []MissingNexlet `json:"missing"`
	// MissingCount is how many nexlets' workloads the list lacks (len(Missing) for
	// system); 0 from nexd nodes before it was added.
	MissingCount int `json:"missing_count,omitempty"`
}

// MissingNexlet is a nexlet whose workloads a node's list lacks.
type MissingNexlet struct {
	ID     string `json:"id"`
	Name   string `json:"name"`
	Reason string `json:"reason"` // "no answer within 2s", "answered with an error: ..."
	// Maybe: one of several nexlets that do not name themselves in their replies
	// (upstream's SDK), fewer of which answered than were asked; which is not known.
	Maybe bool `json:"maybe,omitempty"`
}

// RecentStop is a workload a node stopped lately, in HeaderStopped.
type RecentStop struct {
	ID        string `json:"id"`
	Name      string `json:"name,omitempty"`
	Namespace string `json:"namespace,omitempty"` // "" when the node does not know it
	StoppedAt string `json:"stopped_at"`          // RFC 3339
}

// MissingText names missing nexlets for a message: "nexlet echo-a (AID): no answer
// within 2s; nexlet …".
func MissingText(missing []MissingNexlet) string {
	var what []string
	for _, m := range missing {
		s := fmt.Sprintf("nexlet %s (%s): %s", m.Name, m.ID, m.Reason)
		if m.Maybe {
			s += " (perhaps: some of its type answered, which is not known)"
		}
		what = append(what, s)
	}
	return strings.Join(what, "; ")
}

// WorkloadResources is what a workload's cgroup says, read when the node answered.
type WorkloadResources struct {
	CPUUsageNsec uint64 `json:"cpu_usage_nsec"` // cumulative CPU time
	MemoryBytes  uint64 `json:"memory_bytes"`
	MemoryMax    uint64 `json:"memory_max,omitempty"` // the memory limit; 0 none
	OOMKills     int    `json:"oom_kills,omitempty"`
}

// ---- agent plane ----

// RegisterAgentRequest is a nexlet's registration.
type RegisterAgentRequest struct {
	Description         string      `json:"description"`
	MaxWorkloads        float64     `json:"max_workloads"`
	Name                string      `json:"name"`
	PublicXKey          string      `json:"public_xkey"`
	RegisterType        string      `json:"register_type"`
	StartRequestSchema  string      `json:"start_request_schema"`
	SupportedLifecycles []Lifecycle `json:"supported_lifecycles,omitempty"`
	Version             string      `json:"version"`

	// ReportsEnded (nexd extension): the nexlet reports ended workloads on
	// WorkloadEndedSubject, so the node ignores WORKLOADSTOPPED events for its
	// workloads (anyone could publish those).
	ReportsEnded bool `json:"nexd_reports_ended,omitempty"`

	// AnswersDirect (nexd extension): the nexlet also serves QUERYWORKLOADS,
	// STOPWORKLOAD and GETWORKLOAD on the subjects of its own agent id
	// (QueryWorkloadsAgentSubject), where a nexd node asks it, so that its answers are
	// known to be its own.
	AnswersDirect bool `json:"nexd_answers_direct,omitempty"`

	// Workloads (nexd extension) lists the workloads this nexlet instance holds when
	// it registers: running, or ended with a record of how. The node reconciles its
	// state against it: a stored job the nexlet does not hold ran before and is
	// removed, not started again; a stored service it does not hold is started again.
	// Absent (upstream nexlets), every stored workload is replayed.
	Workloads *[]string `json:"nexd_workloads,omitempty"`

	// Memory (nexd extension) names the nexlet's memory of the starts it took, sent
	// with Workloads: the same as long as every start this nexlet instance took since is
	// held, remembered as stopped (Stopped) or was removed by the node; a new one once
	// such records were lost (its runtime directory gone: a reboot) or dropped (a
	// shutdown's stops). The node records it with each deploy, so a stored job whose
	// start was never confirmed (Started), not held and recorded under the nexlet's
	// current memory never reached it: the node started it, or was killed, before the
	// send, and it is started now. Empty: no such promise (every stored job not held is
	// taken for one that ran).
	Memory string `json:"nexd_memory,omitempty"`

	// Stopped (nexd extension) lists the workloads this nexlet instance stopped at a
	// node's request lately (its memory of stops, an hour). A stored one is removed
	// from node state, not started again: the node that asked may have died before it
	// removed it (TestNexdKilledDuringDrain).
	Stopped []string `json:"nexd_stopped,omitempty"`

	// FeedRelay (nexd extension): the nexlet publishes its feeds on FeedRelaySubject
	// when the reply says NexdFeedRelay. A signed registration without it (a nexlet on
	// an SDK older than the relay) keeps the direct $NEX.FEED grant only if it is the
	// supervised nexlet signed with its start's key; any other is relayed regardless.
	FeedRelay bool `json:"nexd_feed_relay,omitempty"`

	// StopAck (nexd extension): asked with StopWorkloadRequest.RecordAck, the nexlet
	// says on its own reply subject once it durably recorded the stop (its memory of
	// stops outlives its crash), before it answers.
	StopAck bool `json:"nexd_stop_ack,omitempty"`
}

// RegisterAgentResponse answers a registration: the nexlet's real credentials and the
// workloads it should (re)start.
type RegisterAgentResponse struct {
	ConnectionData NatsConnectionData                   `json:"connection_data"`
	ExistingState  map[string]AgentStartWorkloadRequest `json:"existing_state"`
	Message        string                               `json:"message"`
	NodeID         string                               `json:"node_id"`
	Success        bool                                 `json:"success"`
	// NexdFeedRelay (a nexd extension): publish the feeds on FeedRelaySubject, not on
	// $NEX.FEED; the nexlet's user may not publish there. Said to nexlets that sign,
	// but to an older supervised one (RegisterAgentRequest.FeedRelay).
	NexdFeedRelay bool `json:"nexd_feed_relay,omitempty"`
}

// RegisterRemoteAgentRequest is free-form ({} on the wire).
type RegisterRemoteAgentRequest map[string]any

// RegisterRemoteAgentResponse bootstraps a remote nexlet.
type RegisterRemoteAgentResponse struct {
	AssignedAgentID   string              `json:"assigned_agent_id"`
	RegistrationCreds *NatsConnectionData `json:"registration_creds,omitempty"`
	RespondTo         string              `json:"respond_to"`
}

// AgentHeartbeat is published by a nexlet every 10 s.
type AgentHeartbeat struct {
	Data    string       `json:"data"`
	Summary AgentSummary `json:"summary"`
}

// NodeHeartbeat is published by a node every 10 s. State is an extension.
type NodeHeartbeat struct {
	Registrations string    `json:"registrations"`
	State         NodeState `json:"state,omitempty"`
}

// AgentIngressMsg is leftover ingress plumbing, kept for wire completeness.
type AgentIngressMsg struct {
	Command    string `json:"command"`
	Upstream   string `json:"upstream"`
	WorkloadID string `json:"workload_id"`
}

// ErrorBody is the body of a micro error reply from a node.
type ErrorBody struct {
	ErrorID string `json:"error_id"`
	Error   string `json:"error"`
}

// ---- events ----

// Event type names (the last token of an event subject).
const (
	EventNodeStarted      = "NODESTARTED"
	EventNodeStopped      = "NODESTOPPED"
	EventNodeLameduckSet  = "NODELAMEDUCKSET"
	EventAgentStarted     = "AGENTSTARTED"
	EventAgentStopped     = "AGENTSTOPPED"
	EventAgentLameduckSet = "AGENTLAMEDUCKSET"
	EventWorkloadStarted  = "WORKLOADSTARTED"
	EventWorkloadStopped  = "WORKLOADSTOPPED"
	// EventAgentHealthChanged is nexd's own: a nexlet's health changed.
	EventAgentHealthChanged = "AGENTHEALTHCHANGED"
)

// NodeStartedEvent is emitted once a node runs.
type NodeStartedEvent struct {
	ID    string            `json:"id"`
	Name  string            `json:"name"`
	Nexus string            `json:"nexus"`
	Tags  map[string]string `json:"tags"`
	Type  string            `json:"type"`
}

// NodeStartedEventType is the fixed type field of NodeStartedEvent.
const NodeStartedEventType = "io.synadia.nex.event.nexnode_started"

// NodeStoppedEvent is emitted as a node stops.
type NodeStoppedEvent struct {
	ID string `json:"id"`
}

// NodeLameduckSetEvent is emitted when a node enters lame duck mode.
type NodeLameduckSetEvent struct {
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
}

// AgentStartedEvent is emitted when a nexlet registers. Upstream decoders require
// register_type; timestamp is a nexd extra they ignore.
type AgentStartedEvent struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	RegisterType string    `json:"register_type"`
	Timestamp    time.Time `json:"timestamp"`
}

// AgentStoppedEvent is emitted when a nexlet stops or goes offline.
type AgentStoppedEvent struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	Reason    string    `json:"reason"`
	Timestamp time.Time `json:"timestamp"`
}

// AgentHealthChangedEvent is emitted when a nexlet's health changes (healthy,
// degraded, shutting down, offline); nexd only.
type AgentHealthChangedEvent struct {
	ID        string    `json:"id"`
	Name      string    `json:"name"`
	From      string    `json:"from"`
	To        string    `json:"to"`
	Timestamp time.Time `json:"timestamp"`
}

// AgentLameduckSetEvent is emitted when a node's nexlets enter lame duck mode.
type AgentLameduckSetEvent struct {
	Success bool `json:"success"`
}

// WorkloadStartedEvent is emitted by a nexlet when a workload starts.
type WorkloadStartedEvent struct {
	ID           string            `json:"id"`
	Namespace    string            `json:"namespace"`
	WorkloadType string            `json:"workload_type"`
	Metadata     map[string]string `json:"metadata,omitempty"`
}

// WorkloadStoppedEvent is emitted by a nexlet when a workload ends. Error.Code is the
// exit code of a job that failed.
type WorkloadStoppedEvent struct {
	ID           string            `json:"id"`
	Namespace    string            `json:"namespace"`
	WorkloadType string            `json:"workload_type"`
	Metadata     map[string]string `json:"metadata,omitempty"`
	Error        *EventError       `json:"error,omitempty"`
	// Kept (nexd extension): the workload was stopped at nexd's or its nexlet's
	// shutdown (StopWorkloadRequest.Keep); the node keeps it in its state to start it
	// again, and its end report does not remove it.
	Kept bool `json:"nexd_kept,omitempty"`
}

// EventError describes why a workload stopped. On the wire code is a JSON string
// (upstream's type; its decoders reject a number), e.g. "3" for exit code 3.
type EventError struct {
	Code    string `json:"code"`
	Message string `json:"message"`
}

// UnmarshalJSON also accepts a numeric code, as nexlets built on earlier nexd SDKs
// sent it, so their WORKLOADSTOPPED events are not dropped.
func (e *EventError) UnmarshalJSON(b []byte) error {
	var raw struct {
		Code    json.RawMessage `json:"code"`
		Message string          `json:"message"`
	}
	if err := json.Unmarshal(b, &raw); err != nil {
		return err
	}
	e.Message = raw.Message
	e.Code = ""
	code := bytes.TrimSpace(raw.Code)
	switch {
	case len(code) == 0 || bytes.Equal(code, []byte("null")):
	case code[0] == '"':
		return json.Unmarshal(code, &e.Code)
	default:
		var n json.Number
		if err := json.Unmarshal(code, &n); err != nil {
			return fmt.Errorf("event error code %s: %w", code, err)
		}
		e.Code = n.String()
	}
	return nil
}

// WorkloadTriggeredEvent is emitted after a function trigger runs.
type WorkloadTriggeredEvent struct {
	ID        string `json:"id"`
	Namespace string `json:"namespace"`
	Duration  int64  `json:"duration"`
}

// Marshal encodes v; it exists so callers never forget the error of a wire encode.
func Marshal(v any) ([]byte, error) { return json.Marshal(v) }

// WorkloadEndedAck acknowledges a WORKLOADENDED report; Removed says whether the node
// removed the workload from its state (false: it was not there, kept for a restart, or
// the removal failed). StateRemoval (nexd's) says why a removal it tried failed, as
// StopWorkloadResponse's does: StateRemovalPending (a tombstone keeps it from being
// replayed) or StateRemovalFailed.
type WorkloadEndedAck struct {
	Removed      bool   `json:"removed"`
	StateRemoval string `json:"nexd_state_removal,omitempty"`
}
