// Package testhold names the crash windows an end-to-end fault test can hold a real
// nexd or native nexlet in, so that its kill -9 lands there and nowhere else: a window
// of microseconds between two writes cannot be hit by a test from outside otherwise.
//
// Env (NEXD_TEST_HOLD) lists the holds, comma-separated; nexd reads it once and passes
// it on to its native nexlets. Unset (every production start), nothing holds: each
// hold point is one comparison of an empty string.
package testhold

import (
	"context"
	"os"
	"path/filepath"
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
	// registration with stored workloads, waits before it takes them to replay: a list
	// asked meanwhile shows whether the nexlet answers before it knows what it replays.
	// With a release directory in the list (ReleaseIn), until the test released it (at
	// most ReplayHeldMax); without, ReplayLateBy. Bounded, not a hold for ever.
	ReplayLate = "replay-late"
	// ReplayHeld: a nexlet runner, once it took its replay set and serves, waits for the
	// test's release (at most ReplayHeldMax) before it replays any of it: a list asked
	// meanwhile is asked during the replay, every stored workload not replayed yet.
	ReplayHeld = "replay-held"
	// ReplayAfterTidy: the native nexlet, given a replay of a workload whose stop it
	// recorded and has not finished, takes the replay only once that stop ended and
	// its tidy is over (at most ReplayAfterTidyMax): a loaded nexlet that reaches the
	// replay of a workload it was stopping when it registered that late. A delay, not
	// a hold for ever.
	ReplayAfterTidy = "replay-after-tidy"
	// HeartbeatLate: a nexlet runner, given a start, takes a heartbeat before its agent
	// has the start and publishes it only once the start is answered and the test
	// released it (Released; at most HeartbeatHeldMax after the answer): the node keeps
	// the start before a heartbeat that does not count it arrives, as a heartbeat and a
	// start's answer may pass each other on a loaded node. Its periodic heartbeats wait
	// meanwhile (a nexlet publishes its heartbeats in the order it took them), and the
	// next comes a whole interval after. Bounded, not a hold for ever.
	HeartbeatLate = "heartbeat-late"
	// HeartbeatNever: a nexlet runner registers and serves but sends no heartbeat at
	// all: a nexlet whose health stays unknown, which nexd's READY does not wait for
	// past startup_timeout.
	HeartbeatNever = "heartbeat-never"
)

// StopLate: nexd, given a stop of a workload it owns, waits for the test's release
// (Released, at most StopLateMax; without a release directory it does not wait) before
// it stops it, so the "not found" of every other node comes before its word (a loaded
// node; its nexlet's record of the stop that late): the test releases it once it saw
// another node's "not found".
const (
	StopLate    = "stop-late"
	StopLateMax = 10 * time.Second
)

// StopGraceHeld: the native nexlet, at the end of a stop's grace with the workload
// still running, waits for the test's release (Released, at most StopGraceHeldMax, no
// longer once the nexlet's shutdown began; without a release directory it does not
// wait) before it kills it, and a replay of a workload whose stop is under way says so
// in its log: a test releases the stop once the next nexd's replay met it, however
// long that nexd took to start.
const (
	StopGraceHeld    = "stop-grace-held"
	StopGraceHeldMax = 30 * time.Second
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

// HeartbeatHeldMax bounds HeartbeatLate's wait for the test's release after the
// start's answer: a test that never releases it leaves the nexlet's heartbeats stopped
// no longer, well before the node's 30 s of silence that takes a nexlet offline.
const HeartbeatHeldMax = 10 * time.Second

// ReplayHeldMax bounds ReplayLate's and ReplayHeld's wait for the test's release: a
// test that never releases them has the replay go on no later.
const ReplayHeldMax = 10 * time.Second

// ReplayLateBy is ReplayLate's delay: under the half of the node's 2 s list fan-out
// that a list waits for a nexlet registered and not serving yet.
const ReplayLateBy = 300 * time.Millisecond

// releasePrefix, in Env's list, names the directory a hold waiting for its test's
// release (Released) looks in.
const releasePrefix = "release="

// ReleaseIn is the item of Env's list that names dir as the directory of releases.
func ReleaseIn(dir string) string { return releasePrefix + dir }

// Release releases a hold at point waiting in dir (ReleaseIn): the test's word, once
// it saw what the hold was kept for. A hold takes each release once.
func Release(dir, point string) error {
	return os.WriteFile(filepath.Join(dir, point), nil, 0o600)
}

// releasePoll is how often Released looks for its release.
const releasePoll = 10 * time.Millisecond

// ReleaseNamed says whether list (Env's value) names a directory of releases
// (ReleaseIn): a hold there may wait for its test's release (Released).
func ReleaseNamed(list string) bool { return releaseDir(list) != "" }

// releaseDir is the directory of releases list names, "" if none.
func releaseDir(list string) string {
	var dir string
	for p := range strings.SplitSeq(list, ",") {
		if d, ok := strings.CutPrefix(strings.TrimSpace(p), releasePrefix); ok {
			dir = d
		}
	}
	return dir
}

// Released waits until the test released point (Release, in the directory list names),
// taking the release, for at most bound. It reports false when it was not released:
// bound passed, ctx ended, or list names no directory (it then does not wait).
func Released(ctx context.Context, list, point string, bound time.Duration) bool {
	dir := releaseDir(list)
	if dir == "" {
		return false
	}
	file := filepath.Join(dir, point)
	end := time.NewTimer(bound)
	defer end.Stop()
	poll := time.NewTicker(releasePoll)
	defer poll.Stop()
	for {
		if os.Remove(file) == nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-end.C:
			return false
		case <-poll.C:
		}
	}
}

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
