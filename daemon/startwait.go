package daemon

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/state"
)

// startTick is how often a start-up wait refreshes STATUS and systemd's start timeout.
const startTick = 2 * time.Second

// waitingFor marks a start-up step that waits for something outside nexd (NATS,
// JetStream): while it lasts, STATUS says what nexd waits for and since when, and the
// start timeout is extended, so systemd neither kills a patient start nor hears
// nothing. Once the start-up bound (startup_timeout after nexd started) has passed,
// nexd sends READY=1 with a degraded STATUS instead of letting the unit fail, and
// pings the watchdog from this loop while it keeps waiting. The returned func ends
// the wait.
func (d *daemon) waitingFor(what string) (done func()) {
	since := time.Now()
	bound := d.started.Add(d.cfg().Node.StartupTimeout)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(startTick)
		defer t.Stop()
		for {
			waited := time.Since(since).Round(time.Second)
			switch {
			case time.Now().Before(bound):
				status := fmt.Sprintf("starting: waiting for %s (%s)", what, waited)
				d.update(func(s *snapshot) { s.waiting = status })
				d.notify.Status(status)
				d.notify.ExtendTimeout(3 * startTick)
			default:
				status := fmt.Sprintf("degraded: waiting for %s (%s); not bidding yet", what, waited)
				d.update(func(s *snapshot) { s.waiting = status })
				if d.degraded.CompareAndSwap(false, true) {
					d.log.Warn("start-up bound reached; ready in a degraded state while waiting", "for", what,
						"startup_timeout", d.cfg().Node.StartupTimeout.String())
					d.notify.Ready(status)
				} else {
					d.notify.Status(status)
				}
				d.notify.Watchdog()
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	})
	return func() {
		close(stop)
		wg.Wait()
		d.update(func(s *snapshot) { s.waiting = "" })
	}
}

// bridgeWatchdog keeps the watchdog fed after a degraded READY=1, from the end of the
// wait that sent it until serve's health-gated watchdog takes over: systemd expects
// pings from READY on, and the rest of start-up (nexlets registering or being adopted,
// replay: each bounded by startup_timeout) went unpinged for longer than WatchdogSec,
// so systemd aborted a node that had waited out a JetStream outage (seen in the nspawn
// suite with WatchdogSec=10s). It pings for at most twice startup_timeout plus a
// minute, so a start-up that hangs still ends in a watchdog abort. Build calls it from
// its one goroutine, after each wait.
func (s *server) bridgeWatchdog() {
	if !s.degraded.Load() {
		return
	}
	s.feedWatchdogUntilServed()
}

// feedWatchdogUntilServed pings the watchdog from now until serve's health-gated
// watchdog takes over, for at most twice startup_timeout plus a minute: after a
// degraded READY (bridgeWatchdog), and from the start of an image that a re-exec
// started. systemd keeps the watchdog armed across the re-exec (the same pid, a reload),
// and the old image's last ping, its stop, the exec and this image's start-up up to
// serve went unpinged: a slow guest (the qemu suite at host load 12-24: 10 s from the
// exec to "nexd starting", 13 s more to the node serving) had the upgrade aborted by
// the watchdog (30 s), and systemd 252 could not start nexd again (219/CGROUP, the
// controllers still on). Build calls it from its one goroutine.
func (s *server) feedWatchdogUntilServed() {
	if s.bridging {
		return
	}
	s.bridging = true
	bound := 2*s.cfg().Node.StartupTimeout + time.Minute
	every := startTick
	if wd, ok := s.notify.WatchdogInterval(); ok && wd/2 < every {
		every = wd / 2
	}
	s.own.goFn(func() {
		t := time.NewTicker(every)
		defer t.Stop()
		end := time.NewTimer(bound)
		defer end.Stop()
		for {
			s.notify.Watchdog()
			select {
			case <-s.watchdogTaken:
				return
			case <-s.ctx.Done():
				return
			case <-end.C:
				s.log.Error("start-up did not finish; no more watchdog pings until the node serves", "waited", bound.String())
				return
			case <-t.C:
			}
		}
	})
}

// openKVPatiently opens the node's state bucket, retrying while JetStream does not
// answer or cannot place the bucket yet (patiently), until ctx ends. Start-up waits for
// it: STATUS says so.
func (d *daemon) openKVPatiently(ctx context.Context, open func(context.Context) (*state.KV, error)) (*state.KV, error) {
	done := d.waitingFor("JetStream (workload state bucket)")
	defer done()
	var kv *state.KV
	err := d.patiently(ctx, "the state bucket", func(ctx context.Context) error {
		var err error
		kv, err = open(ctx)
		return err
	})
	return kv, err
}

// patiently runs try (5 s each) until it succeeds, retrying with jittered backoff (250 ms
// doubling to 10 s) while JetStream does not answer (not enabled yet, no responders, a
// timeout) or cannot place what is made yet (a cluster still forming: retryableJS),
// until ctx ends. Errors that waiting cannot fix are returned at once. what names what
// try makes, for the log lines.
func (d *daemon) patiently(ctx context.Context, what string, try func(context.Context) error) error {
	delay := 250 * time.Millisecond
	for attempt := 1; ; attempt++ {
		actx, cancel := context.WithTimeout(ctx, 5*time.Second)
		err := try(actx)
		cancel()
		if err == nil {
			if attempt > 1 {
				d.log.Info("JetStream available; "+what+" ready", "attempts", attempt)
			}
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("%w (gave up waiting: %w)", err, ctx.Err())
		}
		retry, hint := retryableJS(err)
		if !retry {
			return err
		}
		wait := delay/2 + rand.N(delay/2+1) // jitter, so a fleet does not retry in step
		if hint != "" {
			d.log.Warn("JetStream cannot place "+what+" yet, retrying", "err", err, "hint", hint,
				"attempt", attempt, "retry_in", wait.Round(time.Millisecond))
		} else {
			d.log.Warn("JetStream not available yet for "+what+", retrying", "err", err, "attempt", attempt, "retry_in", wait.Round(time.Millisecond))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (gave up waiting: %w)", err, ctx.Err())
		case <-time.After(wait):
		}
		delay = min(2*delay, 10*time.Second)
	}
}

// placementHint is what nexd logs while JetStream cannot place the state bucket's
// replicas: the same error is a cluster still forming at boot or one that will never
// have enough JetStream servers, and only the second is worth an operator's time.
const placementHint = "the JetStream cluster may still be forming (servers starting, peers not yet known), " +
	"or it has fewer JetStream servers than the bucket's replicas (state_replicas), " +
	"or its servers are at their max_ha_assets (\"miscellaneous issue\"); nexd waits"

// retryableJS says whether a state store error may heal by waiting: JetStream not
// (yet) enabled or answering, a timeout, a connection that is reconnecting, any
// JetStream API error with code 503 (temporarily unavailable: 10008 cluster not
// available, 10023 insufficient resources) but 10077, of which only the store
// directory race heals (permission denied or a read-only file system do not), a stream
// leader not elected yet (10009), or replicas JetStream cannot place yet (10005, see
// placementPending). hint, when set, says what an operator should check if it lasts.
func retryableJS(err error) (retry bool, hint string) {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		switch {
		case placementPending(apiErr):
			return true, placementHint
		case apiErr.ErrorCode == jsStreamStoreFailed:
			// Sent with code 503 whatever the cause, so it is decided before the 503s:
			// a store that cannot be written for want of permission, or on a read-only
			// file system, stays so.
			return storeDirRace(apiErr), ""
		case apiErr.Code == 503, apiErr.ErrorCode == jsClusterNotLeader:
			return true, ""
		}
	}
	return errors.Is(err, jetstream.ErrJetStreamNotEnabled) ||
		errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoHeartbeat) ||
		errors.Is(err, nats.ErrTimeout) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected), ""
}

// nats-server's JetStream error codes (server/errors.json) that waiting may heal and
// that are not 503s.
const (
	jsClusterNoPeers   = 10005 // JSClusterNoPeersErrF: "no suitable peers for placement[, reasons]"
	jsClusterNotLeader = 10009 // JSClusterNotLeaderErr: "JetStream cluster can not handle request"
	// jsStreamStoreFailed is JSStreamStoreFailedF (10077, "{err}", code 503): the stream's
	// store could not be made, for whatever reason the file system gave.
	jsStreamStoreFailed = 10077
)

// placementPending is nats-server's "no suitable peers for placement" (10005) when the
// only reasons it gives are ones a forming cluster has: no peers known yet (no reason),
// known peers offline or not yet heard from ("peer offline"), no JetStream peers yet
// ("jetstream not enabled in cluster"), or a peer whose info has not arrived
// ("miscellaneous issue", which nats-server also gives for peers at their
// max_ha_assets: a limit that lasts until assets are freed, so placementHint names
// it). Reasons of configuration (insufficient storage, placement tags, unique tags)
// are not pending: waiting cannot fix them. Seen at machine boot
// (make fleet-test-ci): the meta leader was up before the third server was known, and
// an R3 create failed.
func placementPending(e *jetstream.APIError) bool {
	const head = "no suitable peers for placement"
	if e.ErrorCode != jsClusterNoPeers || !strings.HasPrefix(e.Description, head) {
		return false
	}
	for reason := range strings.SplitSeq(strings.TrimPrefix(e.Description, head), ",") {
		switch strings.TrimSpace(reason) {
		case "", "peer offline", "jetstream not enabled in cluster", "miscellaneous issue":
		default:
			return false
		}
	}
	return true
}

// storeDirRace is nats-server's "could not create storage directory ... no such file or
// directory" (10077) while it (re-)enables the account's JetStream: it makes the streams
// directory, checks it is writable and removes it again, so a bucket created at that
// moment fails. Seen when the embedded server's leaf connection comes up during
// start-up (make fleet-test); a retry a moment later succeeds.
func storeDirRace(e *jetstream.APIError) bool {
	return e.ErrorCode == jsStreamStoreFailed && strings.Contains(e.Description, "could not create storage directory") &&
		strings.Contains(e.Description, "no such file or directory")
}
