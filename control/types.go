// Package control is nexd's local control API: HTTP+JSON under /v1/ on a Unix socket,
// each connection authorised from its peer credentials (SO_PEERCRED). The daemon serves
// it through a Backend; nexctl talks to it through Client.
package control

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// APIVersion is the path prefix every route lives under.
const APIVersion = "v1"

// MaxBodyBytes bounds a request body.
const MaxBodyBytes = 1 << 20

// Backend is what the daemon implements to serve the control API.
type Backend interface {
	Status(ctx context.Context) (Status, error)
	// Reload validates and applies the config on disk by the same path as SIGHUP.
	Reload(ctx context.Context) (ReloadResult, error)
	Lameduck(ctx context.Context, delay time.Duration) (LameduckResult, error)
	Nexlets(ctx context.Context) ([]Nexlet, error)
	// RestartNexlet resets a nexlet; an unknown name should wrap ErrNotFound.
	RestartNexlet(ctx context.Context, name string) error
	// Workloads may return a *PartialList error beside the list it has.
	Workloads(ctx context.Context) ([]Workload, error)
	// Logs returns recent lines matching q.
	Logs(ctx context.Context, q LogQuery) ([]LogLine, error)
	// FollowLogs streams lines matching q until ctx ends or the channel is closed.
	FollowLogs(ctx context.Context, q LogQuery) (<-chan LogLine, error)
	// Config returns the resolved config with secrets redacted.
	Config(ctx context.Context) (json.RawMessage, error)
	// Secrets may return nil when the node has no secret store.
	Secrets() SecretStore
	// Metrics may return nil when metrics are disabled.
	Metrics() http.Handler
	// NATSAccess tells a local admin how to reach the node's NATS system, so nexctl on
	// the node's host needs no configuration of its own.
	// ttl asks for a credential of that lifetime (an admin handing one to a remote
	// operator); 0 is the node's short default.
	NATSAccess(ctx context.Context, ttl time.Duration) (NATSAccess, error)
	// Reexec asks nexd to re-execute its installed binary in place (same pid, workloads
	// kept); it returns once the request is accepted, before the exec.
	Reexec(ctx context.Context) error
}

// SecretStore holds workload secrets by namespace. Values never leave the node through
// the control API: only names are listed.
type SecretStore interface {
	Set(ns, key string, value []byte) error
	List(ns string) ([]string, error)
	// Delete removes a secret; a missing one should wrap ErrNotFound.
	Delete(ns, key string) error
}

// Errors a Backend can wrap to choose the HTTP status of its failure.
var (
	ErrNotFound = errors.New("not found")         // 404
	ErrInvalid  = errors.New("invalid request")   // 400
	ErrConflict = errors.New("conflicting state") // 409
)

// NodeState is the node's lifecycle phase, reported in Status.State.
type NodeState string

// Node states.
const (
	StateStarting NodeState = "starting"
	StateRunning  NodeState = "running"
	StateLameduck NodeState = "lameduck"
	StateStopping NodeState = "stopping"
)

// NexletState is a nexlet's process state, reported in Nexlet.State: the supervisor's
// states for local nexlets, NexletRemote for those registered from elsewhere.
type NexletState string

// Nexlet states.
const (
	NexletStarting NexletState = "starting"
	NexletRunning  NexletState = "running"
	NexletBackoff  NexletState = "backoff" // waiting to restart
	NexletFailed   NexletState = "failed"  // past the restart limit, until reset
	NexletStopping NexletState = "stopping"
	NexletStopped  NexletState = "stopped"
	NexletRemote   NexletState = "remote" // no process here
)

// Duration is a time.Duration that travels as a Go duration string ("1m30s") and
// also accepts a number of nanoseconds.
type Duration time.Duration

// MarshalJSON encodes d as a duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(time.Duration(d).String()) }

// UnmarshalJSON accepts "1m30s" or a number of nanoseconds.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err == nil {
		v, err := time.ParseDuration(s)
		if err != nil {
			return fmt.Errorf("duration %q: %w", s, err)
		}
		*d = Duration(v)
		return nil
	}
	n, err := strconv.ParseInt(string(b), 10, 64)
	if err != nil {
		return fmt.Errorf("duration must be a string like \"2m\" or integer nanoseconds, got %s", b)
	}
	*d = Duration(n)
	return nil
}

// Std returns d as a time.Duration.
func (d Duration) Std() time.Duration { return time.Duration(d) }

// Status describes the local node.
type Status struct {
	NodeID    string    `json:"node_id"`
	Name      string    `json:"name"`
	Nexus     string    `json:"nexus"`
	Version   string    `json:"version"`
	Commit    string    `json:"commit"`
	StartTime time.Time `json:"start_time"`
	Uptime    Duration  `json:"uptime"`
	State     NodeState `json:"state"`
	// Detail says, during start-up, what the node waits for (as systemd's STATUS):
	// "starting: waiting for NATS (12s)", "degraded: waiting for JetStream …".
	Detail string `json:"detail,omitempty"`
	// LameduckUntil is when workloads stop, set while in lame duck mode.
	LameduckUntil *time.Time   `json:"lameduck_until,omitempty"`
	NATS          NATSStatus   `json:"nats"`
	Cgroup        CgroupStatus `json:"cgroup"`
	// WorkloadUsers says who the native nexlet's workloads run as.
	WorkloadUsers string         `json:"workload_users,omitempty"`
	Nexlets       []Nexlet       `json:"nexlets"`
	Workloads     map[string]int `json:"workloads"` // count by state
	// WorkloadsAsOf is set while NATS is down: the nexlets cannot be asked, so
	// Workloads is the last listing taken while connected, from this time.
	WorkloadsAsOf *time.Time `json:"workloads_as_of,omitempty"`
	// AuctionsNotBid counts the auctions the node did not bid on since it started, by
	// reason (nexd_auctions_not_bid_total).
	AuctionsNotBid map[string]uint64 `json:"auctions_not_bid,omitempty"`
	// NexletDrops counts the nexlets' calls the node dropped or refused since it
	// started, past its bounds of what one nexlet may cost it.
	NexletDrops *NexletDrops `json:"nexlet_drops,omitempty"`
	// Tombstones are the stopped workloads whose removal from node state failed and is
	// retried: a tombstone on local disk keeps each out of every replay meanwhile.
	Tombstones []Tombstone `json:"tombstones,omitempty"`
	// LocalState is whether the node's state and runtime directories can be written
	// (each has 4 MiB free and takes a write): the node does not bid while they cannot.
	LocalState *LocalStateStatus `json:"local_state,omitempty"`
	// LastDrain is how the node's last lame duck drain ended, kept in its state
	// directory until its next lame duck (INFO's nexd_last_drain).
	LastDrain *protocol.LastDrain `json:"last_drain,omitempty"`
	// TombstoneCount is how many tombstones there are: the public view has the count
	// and not the list.
	TombstoneCount int `json:"tombstone_count,omitempty"`
	// Public marks the answer given to a local user outside group nex
	// (control_allow_others = status): see PublicView.
	Public bool `json:"public,omitempty"`
}

// NexletDrops are the nexlets' calls the node dropped unanswered or refused past its
// bounds, each kind counted in a metric of the same name. Any count is a nexlet gone
// wrong or rogue, or (list answers) a flood of lists.
type NexletDrops struct {
	// WorkloadRenewals: renewals of workloads' credentials past the nexlet's rate
	// (nexd_nexlet_workload_renewals_dropped_total).
	WorkloadRenewals uint64 `json:"workload_renewals"`
	// UserRenewals: renewals of the nexlet's own user past its bound
	// (nexd_nexlet_user_renewals_dropped_total).
	UserRenewals uint64 `json:"user_renewals"`
	// Reregistrations: registrations of a nexlet already registered, past the same
	// bound (nexd_nexlet_reregistrations_dropped_total).
	Reregistrations uint64 `json:"reregistrations"`
	// ListAnswersRefused: answers to lists refused, the node's memory for them taken
	// (nexd_nexlet_list_answers_refused_total).
	ListAnswersRefused uint64 `json:"list_answers_refused"`
}

// PublicView is what a local user outside group nex may see of st: counts and the
// node's health, never a workload's or a tenant's name, id or namespace, nor the
// node's paths, pids or error texts. It copies an allow-list, so a field added to
// Status later stays out of it until it is added here (TestPublicViewAllowList).
func (st Status) PublicView() Status {
	p := Status{
		NodeID: st.NodeID, Name: st.Name, Nexus: st.Nexus, Version: st.Version, Commit: st.Commit,
		StartTime: st.StartTime, Uptime: st.Uptime, State: st.State, Detail: st.Detail,
		LameduckUntil: st.LameduckUntil, WorkloadsAsOf: st.WorkloadsAsOf,
		Workloads: st.Workloads, AuctionsNotBid: st.AuctionsNotBid, NexletDrops: st.NexletDrops,
		TombstoneCount: max(st.TombstoneCount, len(st.Tombstones)),
		Public:         true,
	}
	p.NATS = NATSStatus{Server: st.NATS.Server, RTT: st.NATS.RTT, Reconnects: st.NATS.Reconnects,
		Embedded: st.NATS.Embedded, Connected: st.NATS.Connected, Leaf: st.NATS.Leaf}
	if js := st.NATS.JetStream; js != nil {
		p.NATS.JetStream = &JetStreamStatus{State: js.State, Replicas: js.Replicas, Current: js.Current, Since: js.Since, Checked: js.Checked}
	}
	p.Cgroup = CgroupStatus{Driver: st.Cgroup.Driver, Mode: st.Cgroup.Mode, Enforced: st.Cgroup.Enforced}
	if ls := st.LocalState; ls != nil {
		p.LocalState = &LocalStateStatus{State: ls.State, Since: ls.Since, Checked: ls.Checked}
	}
	if d := st.LastDrain; d != nil {
		p.LastDrain = &protocol.LastDrain{State: d.State, At: d.At}
	}
	p.Nexlets = make([]Nexlet, 0, len(st.Nexlets))
	for _, n := range st.Nexlets {
		p.Nexlets = append(p.Nexlets, Nexlet{Name: n.Name, Type: n.Type, State: n.State, Restarts: n.Restarts, Health: n.Health})
	}
	return p
}

// LocalStateStatus is whether the node's local state can be written.
type LocalStateStatus struct {
	State   string    `json:"state"` // "ok" or "unwritable"
	Detail  string    `json:"detail,omitempty"`
	Since   time.Time `json:"since,omitzero"` // when it became unwritable
	Checked time.Time `json:"checked"`        // when it was last looked at
}

// Tombstone is a stopped workload whose removal from node state is pending; INFO
// carries the same (protocol.NodeInfoResponse.Tombstones).
type Tombstone = protocol.Tombstone

// NATSStatus is the node's NATS connection.
type NATSStatus struct {
	Server     string   `json:"server"`
	RTT        Duration `json:"rtt"`
	Reconnects uint64   `json:"reconnects"`
	Embedded   bool     `json:"embedded"`
	Connected  bool     `json:"connected"`
	// JetStream is what the node last learnt about its state bucket's JetStream
	// (state "kv" only): a connected server may still have lost its cluster.
	JetStream *JetStreamStatus `json:"jetstream,omitempty"`
	// Leaf is the embedded server's leaf connections to its hub, when it has remotes
	// (nats.leaf_remote, or leafnodes.remotes in inats_config).
	Leaf *LeafStatus `json:"leaf,omitempty"`
}

// LeafStatus is the embedded server's leaf node remotes and how many are connected.
type LeafStatus struct {
	Remotes   int `json:"remotes"`
	Connected int `json:"connected"`
}

// JetStreamStatus is the health of the node's state bucket as JetStream reports it.
type JetStreamStatus struct {
	// State is "ok", "degraded" (writable, some replicas lost) or "unavailable" (no
	// answer or no leader: state cannot be written; typically a partition that cut
	// the node's server off from the cluster's quorum).
	State    string    `json:"state"`
	Detail   string    `json:"detail,omitempty"`
	Bucket   string    `json:"bucket"`
	Replicas int       `json:"replicas"`
	Current  int       `json:"current"`
	Leader   string    `json:"leader,omitempty"`
	Since    time.Time `json:"since"`   // when State last changed
	Checked  time.Time `json:"checked"` // when it was last asked
}

// CgroupStatus says how nexd isolates its children.
type CgroupStatus struct {
	// Driver is where workloads get their cgroup: "cgroupfs" (nexd's subtree, described
	// by Mode) or "systemd" (a transient scope each, nex-<id>.scope).
	Driver   string   `json:"driver,omitempty"`
	Mode     string   `json:"mode"` // "v2", "v1" or "none"
	Enforced []string `json:"enforced"`
	Reason   string   `json:"reason,omitempty"` // why limits are missing, when they are
}

// Nexlet is one supervised (or remote) nexlet.
type Nexlet struct {
	Name          string      `json:"name"`
	Type          string      `json:"type"`
	AgentID       string      `json:"agent_id"`
	PID           int         `json:"pid"`
	State         NexletState `json:"state"`
	Restarts      int         `json:"restarts"`
	Health        string      `json:"health"`
	LastHeartbeat *time.Time  `json:"last_heartbeat,omitempty"`
	LastExit      string      `json:"last_exit,omitempty"`
	MemoryBytes   uint64      `json:"memory_bytes"`
	CPU           Duration    `json:"cpu"` // CPU time consumed
	// EndsUnheard is set while the node does not hear the nexlet's workload ends (a
	// nexlet on upstream's SDK whose list rounds are not whole).
	EndsUnheard *protocol.EndsUnheard `json:"ends_unheard,omitempty"`
}

// Workload is one workload the node runs.
type Workload struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	Namespace   string    `json:"namespace"`
	Type        string    `json:"type"`
	Lifecycle   string    `json:"lifecycle"`
	State       string    `json:"state"`
	StartTime   time.Time `json:"start_time"`
	MemoryBytes uint64    `json:"memory_bytes"`
	CPU         Duration  `json:"cpu"`
	// MemoryMax is the workload's memory limit (0: none); Restarts counts restarts by
	// its restart policy; OOMKills the kernel's OOM kills in its cgroup.
	MemoryMax uint64 `json:"memory_max,omitempty"`
	Restarts  int    `json:"restarts"`
	OOMKills  int    `json:"oom_kills,omitempty"`
}

// HeaderPartial on the answer to GET /v1/workloads says the list lacks some nexlets'
// workloads (they did not answer the node in time, or answered with an error): a JSON
// PartialList. The body is the list that came.
const HeaderPartial = "Nex-Partial"

// PartialList is what a Backend's Workloads returns as its error beside the list it
// has when some nexlets' workloads are missing from it; Client.Workloads returns it
// the same way.
type PartialList struct {
	Wait    string                   `json:"wait"` // how long the node waited for its nexlets
	Missing []protocol.MissingNexlet `json:"missing"`
}

func (p *PartialList) Error() string {
	return "the node listed only part of its workloads; missing those of " + protocol.MissingText(p.Missing)
}

// NATSAccess is the answer of GET /v1/nats (admins only): the node's NATS client URLs
// and, where the node can mint one, a short-lived credential for its NATS system.
type NATSAccess struct {
	Servers  []string `json:"servers"`
	Embedded bool     `json:"embedded"`
	// Creds is a .creds text (user JWT and seed), empty when the node hands out none.
	Creds   string     `json:"creds,omitempty"`
	Expires *time.Time `json:"expires,omitempty"`
}

// ReloadResult is the outcome of a reload; OK is false when the new config was rejected
// and Errors lists every reason.
type ReloadResult struct {
	OK      bool     `json:"ok"`
	Applied []string `json:"applied"`
	Errors  []string `json:"errors"`
}

// LameduckRequest is the body of POST /v1/lameduck.
type LameduckRequest struct {
	Delay Duration `json:"delay"`
}

// LameduckResult says when workloads will stop.
type LameduckResult struct {
	Until time.Time `json:"until"`
}

// LogLine is one node log record.
type LogLine struct {
	Time       time.Time      `json:"time"`
	Level      string         `json:"level"`
	Msg        string         `json:"msg"`
	Nexlet     string         `json:"nexlet,omitempty"`
	WorkloadID string         `json:"workload_id,omitempty"`
	Attrs      map[string]any `json:"attrs,omitempty"`
}

// LogQuery selects log lines.
type LogQuery struct {
	Nexlet   string `json:"nexlet,omitempty"`
	Workload string `json:"workload,omitempty"`
	Follow   bool   `json:"follow,omitempty"`
	Lines    int    `json:"lines,omitempty"` // 0 means the backend's default
	// History asks for a workload's past output (with Workload): from the host's
	// journal, which nexd reads for its admins, when it has the workload, else from the
	// node's log buffer; Since bounds it (zero: no bound). Older nexds ignore both and
	// answer from their buffer.
	History bool      `json:"history,omitempty"`
	Since   time.Time `json:"since,omitempty"`
}

// SecretPut is the body of PUT /v1/secrets/{ns}/{key}.
type SecretPut struct {
	Value string `json:"value"`
}

// SecretInfo names a secret; its value is never returned.
type SecretInfo struct {
	Namespace string `json:"namespace"`
	Key       string `json:"key"`
}

// ErrorBody is every error response.
type ErrorBody struct {
	Error string `json:"error"`
	Code  int    `json:"code"`
}

// APIError is a non-2xx answer from the server.
type APIError struct {
	Status  int
	Message string
}

func (e *APIError) Error() string { return fmt.Sprintf("nexd: %s (HTTP %d)", e.Message, e.Status) }

// Is lets callers match API errors against the package's sentinel errors.
func (e *APIError) Is(target error) bool {
	switch target {
	case ErrNotFound:
		return e.Status == http.StatusNotFound
	case ErrInvalid:
		return e.Status == http.StatusBadRequest
	case ErrConflict:
		return e.Status == http.StatusConflict
	}
	return false
}
