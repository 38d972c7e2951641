package protocol

import (
	"strings"
	"time"
)

// SystemNamespace is the administrative namespace: node-admin endpoints live only here,
// and a caller in it may act on workloads of every namespace.
const SystemNamespace = "system"

// ServiceName is the NATS micro service every node registers.
const ServiceName = "nexnode"

// Reserved tag prefix and the built-in tags every node carries.
const (
	TagPrefix   = "nex."
	TagOS       = "nex.os"
	TagArch     = "nex.arch"
	TagCPUCount = "nex.cpucount"
	TagLameduck = "nex.lameduck"
	TagNexus    = "nex.nexus"
	TagNode     = "nex.node"
)

// Log feed headers, as upstream's SDK sets them.
const (
	HeaderNamespace = "synadia.com/namespace"
	HeaderGroup     = "synadia.com/group"
)

// The log feed headers as nexd sends them: nats.go refuses '/' in header keys, so
// upstream's names go out with '-'. HeaderFeedDropped (nexd's) on a feed message says
// how many earlier messages of its subject the nexlet dropped from its full buffer.
const (
	FeedHeaderNamespace = "synadia.com-namespace"
	FeedHeaderGroup     = "synadia.com-group"
	HeaderFeedDropped   = "Nexd-Feed-Dropped"
)

// Micro error headers.
const (
	HeaderErrorCode = "Nats-Service-Error-Code"
	HeaderError     = "Nats-Service-Error"
)

// nexd extensions; upstream peers neither send nor need them.
const (
	// HeaderDeployOutcome on a deploy's error reply says what became of the workload:
	// DeployNotStarted means nothing runs, so a client may try another bid; without it
	// the outcome is unknown and trying elsewhere risks two copies.
	HeaderDeployOutcome = "Nex-Deploy-Outcome"
	DeployNotStarted    = "not-started"
	// HeaderProgress on a node's start request to a nexlet gives the interval at which
	// the nexlet may report that it is still starting (a Go duration); each such report
	// is a reply carrying this header and no body, and the final answer follows. On a
	// client's UNDEPLOY it asks the node that holds the workload to say "stopping" the
	// same way before its answer.
	HeaderProgress = "Nex-Progress"
	// HeaderProgressBytes on a progress report says how far a transfer (an artifact
	// download) is, as "<done>/<total>" bytes (total 0 when unknown); see
	// FormatProgressBytes. Clients that do not know it show the text alone.
	HeaderProgressBytes = "Nex-Progress-Bytes"
	// HeaderNode on a WPING reply names the node that sent it, so a client can tell
	// which workloads run where (nexctl node lameduck --wait); on an UNDEPLOY reply
	// (the "stopping" word and the answer) and a CLONE reply too, so a client that
	// knows which node holds a workload waits for that node's answer.
	HeaderNode = "Nex-Node"
	// HeaderDrainWait on a LAMEDUCK request asks a nexd node to tell its drain's
	// outcome, signed over the header's value (a nonce): see DrainOutcome.
	HeaderDrainWait = "Nex-Drain-Wait"
	// HeaderDrainAck beside HeaderDrainWait says the client acknowledges the drain's
	// outcome (an empty reply to the outcome's reply subject): the node then sends it
	// again, every second, until it is acknowledged or DrainTellFor passed, so a NATS
	// link down as the drain ends does not lose it.
	HeaderDrainAck = "Nex-Drain-Ack"
	// HeaderResources on a WPING asks the nexd node it names (a node id, or "*" for
	// every node) to add each local workload's cgroup figures
	// (WorkloadSummary.Resources), which nexctl top --node shows; reading them costs a
	// few files per workload, so plain listings do not ask.
	HeaderResources = "Nex-Resources"
	// HeaderAlive on a client's ADEPLOY asks the node that took the bid to say it is
	// alive at that interval (a Go duration) until its answer: a body-less reply carrying
	// this header, the first as soon as the request arrives. A client that hears nothing
	// for a few intervals knows the node became unreachable mid-request (the outcome is
	// unknown: the workload may have started) instead of waiting out the deploy timeout.
	HeaderAlive = "Nex-Alive"
	// HeaderPartial on a WPING reply says the list is partial: a JSON PartialList
	// naming the nexlets whose workloads are missing from it (they did not answer the
	// node's fan-out in time, or answered with an error). Upstream clients ignore it.
	HeaderPartial = "Nex-Partial"
	// HeaderStoppedRef on a WPING asks a nexd node also for the workloads it stopped
	// lately (its stop memory, an hour) that the value names: an id, a name or an id
	// prefix, within the caller's namespace (every namespace from system). The node
	// answers in HeaderStopped; upstream nodes ignore it. nexctl workload stop asks, so
	// a repeat by name or prefix is answered "already stopped" too.
	HeaderStoppedRef = "Nex-Stopped-Ref"
	// HeaderStopped on a WPING reply: a JSON []RecentStop, newest first, at most 16.
	HeaderStopped = "Nex-Stopped"
	// HeaderAgentID names the nexlet that sent a reply: upstream's PingAgent sets it,
	// and nexd's nexlets set it on QUERYWORKLOADS replies too. Any nexlet can write any
	// name here: a nexd node tells which nexlet answered by the reply subject it asked
	// it on (QueryWorkloadsAgentSubject), and uses the header only to drop a nexd
	// nexlet's second answer on the shared subject.
	HeaderAgentID = "agentId"
	// HeaderAskedDirect on a fan-out to a node's shared agent subjects (QUERYWORKLOADS,
	// STOPWORKLOAD, GETWORKLOAD) says the node asked every nexlet that registered with
	// AnswersDirect on its own subject: such a nexlet leaves this one unanswered, so it
	// neither acts twice nor answers where its answer could not be told from another's.
	HeaderAskedDirect = "Nex-Asked-Direct"
	// HeaderListParts on a nexd node's QUERYWORKLOADS asked of one nexlet
	// (QueryWorkloadsAgentSubject) says the node takes the answer in parts: a list
	// larger than one message the server takes (max_payload) comes as several JSON
	// arrays on the reply subject, each with HeaderListPart. A list that fits is one
	// message without it, as upstream's nexlets send; asked without HeaderListParts
	// (upstream's node, an older nexd), a nexd nexlet answers a list too large with an
	// error instead of nothing.
	HeaderListParts = "Nexd-List-Parts"
	// HeaderListPart numbers one part of an answer in parts: "i/n", i from 1 to n, in
	// order; the answer is the n arrays' rows, in order.
	HeaderListPart = "Nexd-List-Part"
	// HeaderStopRecorded on a nexlet's body-less reply to a STOPWORKLOAD that asked
	// for it (StopWorkloadRequest.RecordAck) says the stop is durably recorded; the
	// answer follows once the workload is gone. On a node's "stopping" reply to a
	// client's UNDEPLOY (HeaderProgress) it names the nexlet that recorded the stop.
	HeaderStopRecorded = "Nexd-Stop-Recorded"
	// HeaderStopUnrecorded on a node's "stopping" reply to a client's UNDEPLOY says why
	// the owning nexlet did not confirm that it recorded the stop in time (it names
	// the nexlet): the stop was sent and may still complete, but a crash of nexd or of
	// that nexlet now may leave the workload running or start it again.
	HeaderStopUnrecorded = "Nexd-Stop-Unrecorded"
)

// Control-plane subjects ($NEX.SVC.<ns>.control.…).

// ControlPrefix is the prefix of namespace ns's control subjects.
func ControlPrefix(ns string) string { return "$NEX.SVC." + ns + ".control" }

// PingSubject is the nexus-wide ping (system namespace only).
func PingSubject() string { return ControlPrefix(SystemNamespace) + ".PING" }

// PingNodeSubject pings one node.
func PingNodeSubject(nodeID string) string { return PingSubject() + "." + nodeID }

// PTagsSubject asks every node for its tags.
func PTagsSubject() string { return ControlPrefix(SystemNamespace) + ".PTAGS" }

// InfoSubject asks one node for its info.
func InfoSubject(nodeID string) string { return ControlPrefix(SystemNamespace) + ".INFO." + nodeID }

// LameduckSubject puts one node into lame duck mode.
func LameduckSubject(nodeID string) string {
	return ControlPrefix(SystemNamespace) + ".LAMEDUCK." + nodeID
}

// AgentIDSubject maps an agent name to its id on one node.
func AgentIDSubject(nodeID string) string {
	return ControlPrefix(SystemNamespace) + ".AGENTID." + nodeID
}

// NodeHeartbeatSubject is published by each node every 10 s.
func NodeHeartbeatSubject(nodeID string) string {
	return ControlPrefix(SystemNamespace) + ".HEARTBEAT." + nodeID
}

// AuctionSubject starts an auction in a namespace.
func AuctionSubject(ns string) string { return ControlPrefix(ns) + ".AUCTION" }

// DeploySubject deploys to the node holding bidderID.
func DeploySubject(ns, bidderID string) string { return ControlPrefix(ns) + ".ADEPLOY." + bidderID }

// UndeploySubject stops a workload.
func UndeploySubject(ns, workloadID string) string {
	return ControlPrefix(ns) + ".UNDEPLOY." + workloadID
}

// CloneSubject fetches a workload's start request for cloning.
func CloneSubject(ns, workloadID string) string { return ControlPrefix(ns) + ".CLONE." + workloadID }

// WPingSubject lists workloads in a namespace.
func WPingSubject(ns string) string { return ControlPrefix(ns) + ".WPING" }

// Agent-plane subjects ($NEX.SVC.<node>.agent.…).

// AgentPrefix is the prefix of node nodeID's agent-plane subjects.
func AgentPrefix(nodeID string) string { return "$NEX.SVC." + nodeID + ".agent" }

// RegisterSubject is where a nexlet registers with agentID.
func RegisterSubject(nodeID, agentID string) string {
	return AgentPrefix(nodeID) + ".REGISTER." + agentID
}

// ReservedAgentID reports whether id is one of the words that follow a node's agent
// prefix in subjects of its own (REGISTER.<id>, HEARTBEAT.<id>, the shared fan-outs,
// FEED.<id>.…, and those a nexlet is asked on under its id, <id>.PING, …): a nexlet
// under such an id has its subjects (AgentPrefix(node).<id>.…) among the node's own
// endpoints' and fan-outs' (one "FEED" is asked to start a workload on the feed
// relay's subject; one "HEARTBEAT" is pinged on another nexlet's heartbeat subject).
// No id a node hands out is one (randid's are 22 characters); a remote nexlet that
// chooses its own on an open bus could pick one.
func ReservedAgentID(id string) bool {
	switch id {
	case "REGISTER", "RREGISTER", "HEARTBEAT", "STARTWORKLOAD", "STOPWORKLOAD", "GETWORKLOAD",
		"QUERYWORKLOADS", "PING", "SETLAMEDUCK", "PINGWORKLOAD", "FEED", "RENEWCREDS",
		"WORKLOADENDED", "RENEWAGENT":
		return true
	}
	return false
}

// RemoteRegisterSubject is the nexus-wide remote registration bootstrap.
func RemoteRegisterSubject(nexus string) string { return AgentPrefix(nexus) + ".RREGISTER" }

// AgentHeartbeatSubject is published by a nexlet every 10 s.
func AgentHeartbeatSubject(nodeID, agentID string) string {
	return AgentPrefix(nodeID) + ".HEARTBEAT." + agentID
}

// StartWorkloadSubject asks one agent to start a workload.
func StartWorkloadSubject(nodeID, agentID, workloadID string) string {
	return AgentPrefix(nodeID) + "." + agentID + ".STARTWORKLOAD." + workloadID
}

// StopWorkloadSubject asks every agent of a node to stop a workload.
func StopWorkloadSubject(nodeID, workloadID string) string {
	return AgentPrefix(nodeID) + ".STOPWORKLOAD." + workloadID
}

// GetWorkloadSubject asks every agent of a node for a workload's start request.
func GetWorkloadSubject(nodeID, workloadID string) string {
	return AgentPrefix(nodeID) + ".GETWORKLOAD." + workloadID
}

// QueryWorkloadsSubject asks every agent of a node for its workloads.
func QueryWorkloadsSubject(nodeID string) string { return AgentPrefix(nodeID) + ".QUERYWORKLOADS" }

// QueryWorkloadsAgentSubject asks one nexlet for its workloads. It, StopWorkloadAgentSubject
// and GetWorkloadAgentSubject are a nexd extension: the node asks each nexlet that registered with AnswersDirect on
// subjects under its own agent id, which only that nexlet's user may subscribe to, and
// gives each its own reply subject, which only the recipient may then publish to
// (response permission): a reply there proves its sender. On the shared subjects every
// nexlet hears every request, so a rogue one could answer in another's name.
func QueryWorkloadsAgentSubject(nodeID, agentID string) string {
	return AgentPrefix(nodeID) + "." + agentID + ".QUERYWORKLOADS"
}

// StopWorkloadAgentSubject asks one nexlet to stop a workload (see QueryWorkloadsAgentSubject).
func StopWorkloadAgentSubject(nodeID, agentID, workloadID string) string {
	return AgentPrefix(nodeID) + "." + agentID + ".STOPWORKLOAD." + workloadID
}

// GetWorkloadAgentSubject asks one nexlet for a workload's start request (see
// QueryWorkloadsAgentSubject).
func GetWorkloadAgentSubject(nodeID, agentID, workloadID string) string {
	return AgentPrefix(nodeID) + "." + agentID + ".GETWORKLOAD." + workloadID
}

// PingAgentSubject pings one agent.
func PingAgentSubject(nodeID, agentID string) string {
	return AgentPrefix(nodeID) + "." + agentID + ".PING"
}

// PingAllAgentsSubject pings every agent of a node.
func PingAllAgentsSubject(nodeID string) string { return AgentPrefix(nodeID) + ".PING" }

// SetLameduckAgentsSubject tells every agent of a node to enter lame duck mode.
func SetLameduckAgentsSubject(nodeID string) string { return AgentPrefix(nodeID) + ".SETLAMEDUCK" }

// PingWorkloadSubject is ingress workload discovery.
func PingWorkloadSubject(nexus, workloadID string) string {
	return AgentPrefix(nexus) + ".PINGWORKLOAD." + workloadID
}

// Feeds.

// LogSubject is a workload's stdout or stderr feed; stream is "stdout" or "stderr".
func LogSubject(ns, workloadID, stream string) string {
	return "$NEX.FEED." + ns + ".logs." + workloadID + "." + stream
}

// LogsWildcard matches every log feed of a workload.
func LogsWildcard(ns, workloadID string) string {
	return "$NEX.FEED." + ns + ".logs." + workloadID + ".*"
}

// MetricsSubject is a workload's metrics feed.
func MetricsSubject(ns, workloadID string) string {
	return "$NEX.FEED." + ns + ".metrics." + workloadID
}

// FeedRelaySubject is where nexlet agentID publishes the feed message of subject
// feed ($NEX.FEED.<rest>) for its node to pass on: <agent prefix>.FEED.<agentID>.<rest>.
// Only that nexlet's user may publish there, and the node passes on only the feeds of
// workloads it placed on it, so no nexlet speaks in another's workloads' feeds. A nexd
// extension (RegisterAgentResponse.NexdFeedRelay); feed ">" gives the nexlet's grant.
func FeedRelaySubject(nodeID, agentID, feed string) string {
	return AgentPrefix(nodeID) + ".FEED." + agentID + "." + strings.TrimPrefix(feed, "$NEX.FEED.")
}

// FeedWildcard matches namespace ns's feeds of kind ("logs", "metrics", "events"),
// or all of them when kind is "": $NEX.FEED.<ns>[.<kind>].>. ns may be "*".
func FeedWildcard(ns, kind string) string {
	if kind == "" {
		return "$NEX.FEED." + ns + ".>"
	}
	return "$NEX.FEED." + ns + "." + kind + ".>"
}

// EventSubject is where events of type typ from `from` (node id or namespace) go.
func EventSubject(from, typ string) string { return "$NEX.FEED." + from + ".events." + typ }

// NodeLogSubject is the node's own log feed (--logger.target nats).
func NodeLogSubject(nodeID, stream string) string {
	return "$NEX.FEED." + SystemNamespace + ".logs." + nodeID + "." + stream
}

// AgentEventsSubject is the exact subject an event-listening agent subscribes to.
func AgentEventsSubject(agentID string) string { return "$NEX.FEED." + agentID + ".events" }

// Token returns the i-th (0-based) dot-separated token of subject, or "".
func Token(subject string, i int) string {
	parts := strings.Split(subject, ".")
	if i < 0 || i >= len(parts) {
		return ""
	}
	return parts[i]
}

// IsToken reports whether s is a non-empty [A-Za-z0-9_-]+: what a namespace, nexus,
// agent or workload id, node id or bucket name may be. A loop, not a package-level
// regexp: every package's init runs in nexd and in the native nexlet alike, used or not.
func IsToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '_', c == '-':
		default:
			return false
		}
	}
	return true
}

// LastToken returns the final token of subject.
func LastToken(subject string) string {
	if i := strings.LastIndexByte(subject, '.'); i >= 0 {
		return subject[i+1:]
	}
	return subject
}

// NamespaceOf returns the namespace token of a $NEX.SVC.<ns>.control.… subject.
func NamespaceOf(subject string) string { return Token(subject, 2) }

// RenewCredsSubject is a nexd extension of the agent plane: nexlet agentID asks its node
// for fresh credentials of workloadID, which it runs (body RenewCredsRequest, reply
// NatsConnectionData or a micro error). The agent id in the subject lets the node's
// permissions bind each nexlet to its own requests.
func RenewCredsSubject(nodeID, agentID, workloadID string) string {
	return AgentPrefix(nodeID) + ".RENEWCREDS." + agentID + "." + workloadID
}

// InboxPrefix is the private inbox prefix of the child (nexlet or workload) with this
// id: nexd's scoped users may subscribe to <prefix>.> and to no other inbox, so no child
// sees another's replies (nats.CustomInboxPrefix). A nexd extension.
func InboxPrefix(id string) string { return "_INBOX_" + id }

// NodeInboxRoot heads the inbox prefix of a nexd node's own connection,
// NodeInboxPrefix(token): an _INBOX_ name (nodes answer requests made with it, and no
// namespace may start with _INBOX) that no user nexd mints may publish to (workloads
// publish to _INBOX.> and their tenant's _INBOX_tenant-<ns>.>; nexlets answer only
// under their response permission), and no nexlet's (agent id "nexd" is refused). The
// node's connection names nats.go's inboxes under it, and those inboxes, a JetStream
// watcher's deliver subject among them, follow one nuid generator that every nexlet
// sees in the node's requests.
const NodeInboxRoot = "_INBOX_nexd"

// NodeInboxPrefix is the inbox prefix of a node's connection: NodeInboxRoot and a
// token (random, so that it names one connection).
func NodeInboxPrefix(token string) string { return NodeInboxRoot + "." + token }

// WorkloadInboxPrefix is the private inbox prefix of the workload with this id under a
// signing key, _INBOX.<id>: its user may subscribe there only, and another workload
// answers its requests under its plain _INBOX.> grant. Workloads get no response
// permission: it let a workload publish anywhere (a reply subject is the requester's
// to choose, and the grant outranks every deny).
func WorkloadInboxPrefix(id string) string { return "_INBOX." + id }

// ArtifactInboxPrefix is the inbox prefix of the user a nexlet fetches workload id's
// artifact with, _INBOX_<id>-artifact (a nuid has no dash).
func ArtifactInboxPrefix(id string) string { return InboxPrefix(id + "-artifact") }

// TenantInboxPrefix is the private inbox prefix of namespace ns's tenant user,
// _INBOX_tenant-<ns>: an _INBOX_ prefix, so nodes answer requests made with it, and
// never one nexd mints for a child (_INBOX_<nuid>, and a nuid has no dash). The tenant
// connects with it (nats.CustomInboxPrefix, or inbox_prefix in its NATS context).
func TenantInboxPrefix(ns string) string { return InboxPrefix("tenant-" + ns) }

// TenantSubjects are what the NATS user of a tenant with deploy rights in namespace ns
// may publish and subscribe to: what nexctl needs to run, list, stop and clone there
// and follow its logs, metrics and events, and its application subjects. Never
// _INBOX.> (every client's replies), never $NEX.SVC.> (start requests carry workload
// credentials), never another namespace or JetStream. mint.TenantPermissions checks ns
// and makes them a user's permissions; nexctl doctor suggests them.
func TenantSubjects(ns string) (pub, sub []string) {
	return []string{ControlPrefix(ns) + ".>", ns + ".>"},
		[]string{FeedWildcard(ns, ""), TenantInboxPrefix(ns) + ".>", ns + ".>"}
}

// EnvAgentInboxPrefix and EnvWorkloadInboxPrefix hand a child its inbox prefix.
const (
	EnvAgentInboxPrefix    = "NEX_AGENT_NATS_INBOX_PREFIX"
	EnvWorkloadInboxPrefix = "NEX_WORKLOAD_NATS_INBOX_PREFIX"
)

// Bound nexlet identity (nexd extension): a nexlet signs its REGISTER request with an
// nkey, the per-start key its supervisor gave it (EnvAgentRegistrationSeed) or, for a
// remote nexlet, the key listed for it in the node's remote_nexlets. The signature
// covers the subject, the time of signing and the body (RegistrationPayload), base64
// (std) in HeaderRegistrationSig; HeaderRegistrationKey names the public key and
// HeaderRegistrationTime the time (Unix nanoseconds, decimal). The node accepts a
// signed message once, within RegistrationWindow of its clock: a copy replayed on the
// bus is refused.
const (
	HeaderRegistrationKey    = "Nexd-Registration-Key"
	HeaderRegistrationSig    = "Nexd-Registration-Sig"
	HeaderRegistrationTime   = "Nexd-Registration-Time"
	EnvAgentRegistrationSeed = "NEX_AGENT_REGISTRATION_SEED"
)

// RegistrationWindow is how far a signed registration's or renewal's time may be from
// the node's clock (a remote nexlet's clock may be off by that much).
const RegistrationWindow = 5 * time.Minute

// RegistrationPayload is what a registration signature covers; signedAt is the value
// of HeaderRegistrationTime.
func RegistrationPayload(subject, signedAt string, body []byte) []byte {
	return append([]byte(subject+"\n"+signedAt+"\n"), body...)
}

// WorkloadEndedSubject is a nexd extension of the agent plane: nexlet agentID tells its
// node, as a request, that workloadID ended (body WorkloadStoppedEvent, reply
// WorkloadEndedAck). Only that nexlet's user may publish under its agent id, so unlike
// the WORKLOADSTOPPED event nobody else can end its workloads in node state; the nexlet
// retries until the node acknowledges, so a lost message loses nothing.
func WorkloadEndedSubject(nodeID, agentID, workloadID string) string {
	return AgentPrefix(nodeID) + ".WORKLOADENDED." + agentID + "." + workloadID
}

// RenewAgentCredsSubject is a nexd extension of the agent plane: nexlet agentID asks its
// node for a fresh user of its own before its current one expires (body
// RenewAgentCredsRequest, signed like a registration with the key the nexlet
// registered with; reply NatsConnectionData holding a JWT for the public key in the
// request and no seed). Only that nexlet's user may publish under its agent id.
func RenewAgentCredsSubject(nodeID, agentID string) string {
	return AgentPrefix(nodeID) + ".RENEWAGENT." + agentID
}
