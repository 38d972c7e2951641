package mint

import (
	"context"
	"errors"
	"time"
)

// Waits between revocation attempts (RetryRevocation): from the first, doubling to the
// longest.
const (
	RetryFirstWait   = time.Second
	RetryLongestWait = 30 * time.Second
)

// RetryRevocation calls revoke, each call bounded by attempt, until it succeeds, the
// time until comes (the users it revokes have expired: nothing is left to revoke) or
// ctx ends, waiting RetryFirstWait, doubling to RetryLongestWait, between calls. A
// revocation that failed or timed out once (the system account's connection down, the
// server busy) was not tried again, and the user stayed valid to its expiry. It
// returns nil, the last error when it gave up, or at once ErrRevocationUnsupported and
// ErrUnknownWorkload, which no retry changes. The first call is made even if ctx has
// ended (a workload ending in the drain still gets one).
func RetryRevocation(ctx context.Context, attempt time.Duration, until time.Time, revoke func(context.Context) error) error {
	wait := RetryFirstWait
	for {
		actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), attempt)
		err := revoke(actx)
		cancel()
		if err == nil || errors.Is(err, ErrRevocationUnsupported) || errors.Is(err, ErrUnknownWorkload) ||
			!time.Now().Add(wait).Before(until) {
			return err
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		wait = min(2*wait, RetryLongestWait)
	}
}
