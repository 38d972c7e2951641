// Package testhold names the crash windows an end-to-end fault test can hold a real
// nexd or native nexlet in, so that its kill -9 lands there and nowhere else: a window
// of microseconds between two writes cannot be hit by a test from outside otherwise.
//
// Env (NEXD_TEST_HOLD) lists the holds, comma-separated; nexd reads it once and passes
// it on to its native nexlets. Unset (every production start), nothing holds: each
// hold point is one comparison of an empty string.
package testhold

import (
	"strings"
	"time"
)

// Env is the environment variable that lists the holds.
const Env = "NEXD_TEST_HOLD"

// The hold points.
const (
	// StopReplied: nexd, once it answered a stop, before it forgets the workload (its
	// state record, its ownership).
	StopReplied = "stop-replied"
	// DeployRecorded: nexd, once a deploy's record is written to node state, before it
	// sends the start to the nexlet.
	DeployRecorded = "deploy-recorded"
	// DeployAnswered: nexd, once the nexlet answered a deploy's start, before the
	// node keeps the workload and replies (and marks a job's record started).
	DeployAnswered = "deploy-answered"
	// StopTidy: the native nexlet, once it answered a stop, before it removes what the
	// workload left behind (its record above all).
	StopTidy = "stop-tidy"
	// LaunchForked: the native nexlet, once a deploy's first process is forked, before
	// its pid record is written.
	LaunchForked = "launch-forked"
	// RelaunchRecorded: the native nexlet, once a restart's launch is recorded,
	// before its fork.
	RelaunchRecorded = "relaunch-recorded"
	// RelaunchForked: the native nexlet, once a restart's process is forked, before
	// its pid record is written.
	RelaunchForked = "relaunch-forked"
	// ExitReaped: the native nexlet, once it recorded a workload's exit ahead of its
	// reap and reaped it, before the end's own record.
	ExitReaped = "exit-reaped"
	// ReplayLate: a nexlet runner (nexlet.WithTestHold), once the node accepted its
	// registration with stored workloads, waits ReplayLateBy before it takes them to
	// replay: a list asked meanwhile shows whether the nexlet answers before it knows
	// what it replays. A delay, not a hold for ever.
	ReplayLate = "replay-late"
	// ReplayAfterTidy: the native nexlet, given a replay of a workload whose stop it
	// recorded and has not finished, takes the replay only once that stop ended and
	// its tidy is over (at most ReplayAfterTidyMax): a loaded nexlet that reaches the
	// replay of a workload it was stopping when it registered that late. A delay, not
	// a hold for ever.
	ReplayAfterTidy = "replay-after-tidy"
	// HeartbeatLate: a nexlet runner, at each periodic heartbeat, publishes it
	// HeartbeatLateBy after it took it: a start the nexlet gets meanwhile is kept by
	// the node before a heartbeat that does not count it arrives, as a heartbeat and a
	// start's answer may pass each other on a loaded node. A delay, not a hold for ever.
	HeartbeatLate = "heartbeat-late"
	// HeartbeatNever: a nexlet runner registers and serves but sends no heartbeat at
	// all: a nexlet whose health stays unknown, which nexd's READY does not wait for
	// past startup_timeout.
	HeartbeatNever = "heartbeat-never"
)

// StopLate: nexd, given a stop of a workload it owns, waits StopLateBy before it
// stops it, so the "not found" of every other node comes well before its word (a
// loaded node; its nexlet's record of the stop that late). A delay, not a hold.
const (
	StopLate   = "stop-late"
	StopLateBy = 300 * time.Millisecond
)

// FinishedShort: the native nexlet forgets a finished workload FinishedShortBy after
// its end, not its FinishedRetention of an hour: the next nexd comes after the nexlet
// forgot a job. Not a hold.
const (
	FinishedShort   = "finished-short"
	FinishedShortBy = time.Second
)

// ReplayAfterTidyMax bounds ReplayAfterTidy's wait.
const ReplayAfterTidyMax = time.Minute

// StopBoundShort: nexd's stop is given StopBoundShortBy, not its bound of
// 2×stop_grace+80 s, before it exits past it: a test's stuck step meets the bound in
// seconds. Not a hold.
const (
	StopBoundShort   = "stop-bound-short"
	StopBoundShortBy = 3 * time.Second
)

// HeartbeatLateBy is HeartbeatLate's delay: time for a deploy to be kept in it, and
// under the node's 5 s allowance for such a heartbeat (node.staleBeatLag).
const HeartbeatLateBy = 4 * time.Second

// ReplayLateBy is ReplayLate's delay: under the half of the node's 2 s list fan-out
// that a list waits for a nexlet registered and not serving yet.
const ReplayLateBy = 300 * time.Millisecond

// Holds says whether list (Env's value) names point.
func Holds(list, point string) bool {
	if list == "" {
		return false
	}
	for p := range strings.SplitSeq(list, ",") {
		if strings.TrimSpace(p) == point {
			return true
		}
	}
	return false
}
