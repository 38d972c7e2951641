// Package nexlet is the SDK for writing nexlets: runtime adapters that register with a
// Nex node over NATS and run workloads for it. Its Agent interface mirrors upstream's
// sdk/go/agent contract so that upstream nexlets port with few changes; the Runner speaks
// the agent plane of the $NEX protocol (register, heartbeat, workload endpoints, logs and
// events) on the nexlet's behalf.
package nexlet

import (
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// Agent is what a nexlet implements; the Runner calls it from its NATS handlers.
type Agent interface {
	// Register describes the nexlet; it is sent to the node once per Run.
	Register() (*protocol.RegisterAgentRequest, error)
	// Heartbeat is published at once after registration and then periodically.
	Heartbeat() (*protocol.AgentHeartbeat, error)
	// StartWorkload starts workloadID. existing is true when the node replays its
	// stored state after a restart: the workload may still be running.
	StartWorkload(workloadID string, req *protocol.AgentStartWorkloadRequest, existing bool) (*protocol.StartWorkloadResponse, error)
	// StopWorkload stops workloadID; it returns an error when the nexlet does not hold it.
	StopWorkload(workloadID string, req *protocol.StopWorkloadRequest) error
	// GetWorkload returns the start request of workloadID; an error whose text is
	// protocol.ErrTextWorkloadNotFound makes the Runner stay silent.
	GetWorkload(workloadID, targetXKey string) (*protocol.StartWorkloadRequest, error)
	// QueryWorkloads lists workloads of namespace (every namespace for "system"),
	// filtered by id or name when filter is non-empty.
	QueryWorkloads(namespace string, filter []string) ([]protocol.WorkloadSummary, error)
	// SetLameduck asks the nexlet to stop its workloads once before has elapsed.
	SetLameduck(before time.Duration) error
	// Ping returns the nexlet's summary.
	Ping() (*protocol.AgentSummary, error)
}

// StopReporter is optionally implemented by an Agent that can say how a stopped
// workload ended ("exited after SIGTERM (exit code 0)", "killed after a stop grace of
// 10s"). The Runner calls it instead of StopWorkload and puts the text in the reply's
// message; like StopWorkload it returns once the workload is gone.
type StopReporter interface {
	StopWorkloadReport(workloadID string, req *protocol.StopWorkloadRequest) (string, error)
}

// StopRecorder is optionally implemented by an Agent that records a stop durably before
// it begins it (a StopRememberer whose memory outlives its crash). The Runner calls it
// instead of StopWorkloadReport when the node asks to hear that the stop is recorded
// (StopWorkloadRequest.RecordAck; the Runner registers with StopAck), and tells the node
// when the agent calls recorded (at most once, from any goroutine, only once the record
// is written: a node's "stopping" to a client that does not wait rests on it). Like
// StopWorkloadReport it returns once the workload is gone.
type StopRecorder interface {
	StopWorkloadRecorded(workloadID string, req *protocol.StopWorkloadRequest, recorded func()) (string, error)
}

// StopRecaller is optionally implemented by an Agent that remembers the workloads it
// stopped lately. When a stop finds no such workload, the Runner asks it, and for one
// stopped at at (visible from namespace: system sees all) answers stopped with the
// message "already stopped at <at> (<how>)" and nexd_already_stopped_at, instead of
// "workload not found": a repeated stop (an operator retrying after a timeout) is told
// the truth. Keep the memory bounded.
type StopRecaller interface {
	StoppedBefore(workloadID, namespace string) (at time.Time, how string, ok bool)
}

// ProgressStarter is optionally implemented by an Agent whose starts can take a while
// (an artifact download). The Runner calls it instead of StartWorkload for new starts
// (replays still go to StartWorkload) and passes each report to a node that asked for
// progress (protocol.HeaderProgress): the first and a finished transfer at once, others
// at most every ProgressEvery; report is safe from any goroutine and cheap.
type ProgressStarter interface {
	StartWorkloadProgress(workloadID string, req *protocol.AgentStartWorkloadRequest, report func(protocol.Progress)) (*protocol.StartWorkloadResponse, error)
}

// StartReplier is optionally implemented by an Agent with work for right after a new
// start's reply is sent (the Runner calls it then, on the start's goroutine, for a start
// that succeeded; not for replays, which have no reply): work the client need not wait
// for, but that should not wait for another goroutine's wake-up either.
type StartReplier interface {
	StartReplied(workloadID string)
}

// ProgressEvery is the least time between two byte-count reports of one start.
const ProgressEvery = 100 * time.Millisecond

// ReplayAware is optionally implemented by an Agent that wants to know when the replay of
// the node's existing state is over, for instance to clean up workloads the node no
// longer knows. ids are the workloads the node asked to (re)start; it is called once per
// Run, also when there was nothing to replay.
type ReplayAware interface {
	ReplayDone(ids []string)
}

// WorkloadHolder is optionally implemented by an Agent that can say, each time it
// registers (also again), which workloads it holds: running, or ended with a record of
// how (a nexd extension, RegisterAgentRequest.Workloads). The node then removes a stored
// job the nexlet does not hold, which ran before, instead of starting it again.
type WorkloadHolder interface {
	HeldWorkloads() []string
}

// MemoryKeeper is optionally implemented by a WorkloadHolder whose memory of the starts
// it took outlives its process (records on disk): StartsMemory names that memory
// (RegisterAgentRequest.Memory), the same for as long as every start it took since is
// held, remembered as stopped or removed by the node, a new name once such records
// were lost or dropped. With it the node starts a stored job whose start it never saw
// confirmed and that this memory does not hold: its nexd died before it sent the start.
type MemoryKeeper interface {
	StartsMemory() string
}

// EndConfirmer is optionally implemented by a MemoryKeeper that forgets ended
// workloads after a while: the runner calls EndConfirmed once a node acknowledged a
// workload's end with it out of node state (WorkloadEndedAck.Removed, or its removal
// pending behind a tombstone, which keeps it from every replay). Only such an end may
// be forgotten: a record the node keeps of any other (its deploy's node killed before
// it marked the start, or before it removed a job that ended during its deploy) may
// be unmarked, and a job its nexlet does not hold, recorded under the memory it still
// has, is taken for one whose start never reached it, and started.
type EndConfirmer interface {
	EndConfirmed(workloadID string)
}

// StopRememberer is optionally implemented by an Agent that remembers the workloads
// it stopped at the node's request (RegisterAgentRequest.Stopped): the node removes a
// stored one instead of starting it again when the node that asked for the stop died
// before it removed it.
type StopRememberer interface {
	RecentlyStopped() []string
}

// ReplayGuard is optionally implemented by a StopRememberer that numbers its stops. A
// replay answers a registration, and the node made it from its state as it was then:
// a workload whose stop was under way when the nexlet registered (the node that asked
// for it died before it removed it), or that was stopped since, is in the replay, and
// a replay that reaches the agent once that stop is over must not start it again. The
// Runner takes StopsMark as the registration's Stopped list and hands each replay of
// the node's answer to StartReplayed with that mark instead of StartWorkload.
type ReplayGuard interface {
	// StopsMark is RecentlyStopped and, taken at once with it, a mark of the stops so
	// far.
	StopsMark() (stopped []string, mark uint64)
	// StartReplayed is StartWorkload(workloadID, req, true) for a replay answering a
	// registration made at mark: a workload stopped at a request after mark is not
	// started again.
	StartReplayed(workloadID string, req *protocol.AgentStartWorkloadRequest, mark uint64) (*protocol.StartWorkloadResponse, error)
}
