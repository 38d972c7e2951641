// Package sysd speaks the systemd service protocol: sd_notify state changes (READY,
// RELOADING with MONOTONIC_USEC, STOPPING, STATUS, EXTEND_TIMEOUT_USEC) and the
// watchdog, on go-systemd's daemon package. What it adds is a small interface the
// daemon can be tested through and the health-gated watchdog loop. Everything is a
// no-op when the process is not run by systemd.
package sysd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// Notifier sends sd_notify datagrams to $NOTIFY_SOCKET. The zero value, and a
// Notifier built without NOTIFY_SOCKET, does nothing and returns nil.
type Notifier struct {
	socket string // NOTIFY_SOCKET when built, for Enabled and errors; "" = disabled
	log    *slog.Logger
}

// NewNotifier reads NOTIFY_SOCKET from the process environment, as go-systemd
// does on every send. nexd's children never inherit it (see supervise).
func NewNotifier(log *slog.Logger) *Notifier {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Notifier{socket: os.Getenv("NOTIFY_SOCKET"), log: log}
}

// Enabled reports whether notifications are sent anywhere.
func (n *Notifier) Enabled() bool { return n != nil && n.socket != "" }

// Ready tells systemd that start-up (or a reload) has finished.
func (n *Notifier) Ready(status string) error {
	return n.send(withStatus(daemon.SdNotifyReady, status))
}

// Status updates the one-line status `systemctl status` shows.
func (n *Notifier) Status(status string) error {
	return n.send("STATUS=" + oneLine(status))
}

// Reloading starts a reload cycle. MONOTONIC_USEC is required by Type=notify-reload
// to tell reload cycles apart; without it `systemctl reload` waits for the timeout.
func (n *Notifier) Reloading() error {
	us := strings.TrimSuffix(daemon.SdNotifyMonotonicUsec(), "\n")
	if us == "" {
		return errors.New("sysd: reloading: CLOCK_MONOTONIC unavailable for MONOTONIC_USEC")
	}
	return n.send(daemon.SdNotifyReloading + "\n" + us)
}

// Stopping tells systemd that the service is shutting down.
func (n *Notifier) Stopping(status string) error {
	return n.send(withStatus(daemon.SdNotifyStopping, status))
}

// ExtendTimeout asks systemd for d more time in the current start, stop or reload
// phase; send it again before d runs out to keep extending.
func (n *Notifier) ExtendTimeout(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("sysd: extend timeout: duration must be positive, got %s", d)
	}
	return n.send("EXTEND_TIMEOUT_USEC=" + strconv.FormatInt(d.Microseconds(), 10))
}

// WatchdogInterval returns the watchdog timeout systemd expects pings within, and
// whether the watchdog is enabled for this process (WATCHDOG_PID, when set, must be
// our pid, so a child that inherited the environment does not ping for us).
func (n *Notifier) WatchdogInterval() (time.Duration, bool) {
	if n == nil {
		return 0, false
	}
	d, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("ignoring invalid watchdog settings", "err", err,
			"WATCHDOG_USEC", os.Getenv("WATCHDOG_USEC"), "WATCHDOG_PID", os.Getenv("WATCHDOG_PID"))
		return 0, false
	}
	return d, d > 0
}

// RunWatchdog pings WATCHDOG=1 at half the watchdog interval until ctx ends, but
// only while healthy() returns true: a ping must prove the node works, so an
// unhealthy node lets systemd's watchdog fire. It returns at once when the
// watchdog is not enabled.
func (n *Notifier) RunWatchdog(ctx context.Context, healthy func() bool) {
	interval, ok := n.WatchdogInterval()
	if !ok || !n.Enabled() {
		return
	}
	t := time.NewTicker(interval / 2)
	defer t.Stop()
	wasHealthy := true
	for {
		if healthy() {
			if !wasHealthy {
				n.log.Info("health check passes again, resuming watchdog pings")
			}
			wasHealthy = true
			if err := n.send(daemon.SdNotifyWatchdog); err != nil {
				n.log.Warn("watchdog ping failed", "err", err)
			}
		} else if wasHealthy {
			n.log.Error("health check failing, withholding watchdog pings", "watchdog", interval)
			wasHealthy = false
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Watchdog sends one WATCHDOG=1. The caller proves liveness; RunWatchdog is the
// usual way to send these.
func (n *Notifier) Watchdog() error { return n.send(daemon.SdNotifyWatchdog) }

// send dials NOTIFY_SOCKET afresh for each message (go-systemd's way), which also
// survives systemd being re-executed.
func (n *Notifier) send(msg string) error {
	if !n.Enabled() {
		return nil
	}
	if _, err := daemon.SdNotify(false, msg); err != nil {
		return fmt.Errorf("sysd: send %q to NOTIFY_SOCKET %q: %w", firstLine(msg), n.socket, err)
	}
	return nil
}

func withStatus(state, status string) string {
	if status == "" {
		return state
	}
	return state + "\nSTATUS=" + oneLine(status)
}

// oneLine keeps STATUS= a single assignment: a newline would start a new field.
func oneLine(s string) string {
	return strings.ReplaceAll(strings.TrimRight(s, "\n"), "\n", " ")
}

func firstLine(s string) string {
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		return s[:i]
	}
	return s
}
