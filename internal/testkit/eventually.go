package testkit

import (
	"testing"
	"time"
)

// DefaultWait bounds Eventually. It is generous because a loaded 2-core CI machine
// running eight test binaries at once is slow; a passing condition returns as soon as
// it holds, so only a failing test pays for the bound.
const DefaultWait = time.Minute

// A condition is re-evaluated after a pause that grows from minPoll to maxPoll: a
// cheap in-process condition is seen almost at once, and one that runs a process
// (nexctl status) does not keep a loaded machine busy for a long wait.
const (
	minPoll = 5 * time.Millisecond
	maxPoll = 100 * time.Millisecond
)

// Eventually polls cond until it returns true, failing t after DefaultWait. what names
// the awaited condition in the failure message.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	EventuallyWithin(t, DefaultWait, what, cond)
}

// EventuallyWithin is Eventually with an explicit bound.
func EventuallyWithin(t testing.TB, d time.Duration, what string, cond func() bool) {
	t.Helper()
	if !WaitFor(d, cond) {
		t.Fatalf("timed out after %v waiting for %s", d, what)
	}
}

// WaitFor polls cond until it returns true or d has passed, and reports whether it
// held. For callers that must not fail from the polling goroutine, or that expect
// the condition not to become true.
func WaitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	pause := minPoll
	for {
		if cond() {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(pause)
		pause = min(pause*3/2, maxPoll)
	}
}
