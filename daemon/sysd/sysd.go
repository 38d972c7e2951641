// Package sysd speaks the systemd service protocol: sd_notify state changes (READY,
// RELOADING with MONOTONIC_USEC, STOPPING, STATUS, EXTEND_TIMEOUT_USEC) and the
// watchdog. Everything is a no-op when the process is not run by systemd.
package sysd

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Notifier sends sd_notify datagrams to $NOTIFY_SOCKET. The zero value, and a
// Notifier built without NOTIFY_SOCKET, does nothing and returns nil.
type Notifier struct {
	socket      string // as given in NOTIFY_SOCKET; "" = disabled
	watchdogUS  string
	watchdogPID string
	log         *slog.Logger

	mu   sync.Mutex // serialises sends so multi-line messages never interleave
	conn *net.UnixConn
}

// NewNotifier reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID through env
// (os.Getenv in production) so tests can supply their own environment.
func NewNotifier(env func(string) string, log *slog.Logger) *Notifier {
	if env == nil {
		env = os.Getenv
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Notifier{
		socket:      env("NOTIFY_SOCKET"),
		watchdogUS:  env("WATCHDOG_USEC"),
		watchdogPID: env("WATCHDOG_PID"),
		log:         log,
	}
}

// Enabled reports whether notifications are sent anywhere.
func (n *Notifier) Enabled() bool { return n != nil && n.socket != "" }

// Ready tells systemd that start-up (or a reload) has finished.
func (n *Notifier) Ready(status string) error {
	return n.send(withStatus("READY=1", status))
}

// Status updates the one-line status `systemctl status` shows.
func (n *Notifier) Status(status string) error {
	return n.send("STATUS=" + oneLine(status))
}

// Reloading starts a reload cycle. MONOTONIC_USEC is required by Type=notify-reload
// to tell reload cycles apart; without it `systemctl reload` waits for the timeout.
func (n *Notifier) Reloading() error {
	us, err := monotonicUsec()
	if err != nil {
		return err
	}
	return n.send("RELOADING=1\nMONOTONIC_USEC=" + strconv.FormatUint(us, 10))
}

// Stopping tells systemd that the service is shutting down.
func (n *Notifier) Stopping(status string) error {
	return n.send(withStatus("STOPPING=1", status))
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
	if n == nil || n.watchdogUS == "" {
		return 0, false
	}
	us, err := strconv.ParseUint(n.watchdogUS, 10, 64)
	if err != nil || us == 0 {
		n.log.Warn("ignoring invalid WATCHDOG_USEC", "value", n.watchdogUS)
		return 0, false
	}
	if n.watchdogPID != "" {
		pid, err := strconv.Atoi(n.watchdogPID)
		if err != nil || pid != os.Getpid() {
			return 0, false
		}
	}
	return time.Duration(us) * time.Microsecond, true
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
			if err := n.send("WATCHDOG=1"); err != nil {
				n.log.Warn("watchdog ping failed", "error", err)
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

// Close releases the notification socket.
func (n *Notifier) Close() error {
	if n == nil {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		return nil
	}
	err := n.conn.Close()
	n.conn = nil
	return err
}

func (n *Notifier) send(msg string) error {
	if !n.Enabled() {
		return nil
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.conn == nil {
		addr, err := socketAddr(n.socket)
		if err != nil {
			return err
		}
		c, err := net.DialUnix("unixgram", nil, addr)
		if err != nil {
			return fmt.Errorf("sysd: connect to NOTIFY_SOCKET %q: %w", n.socket, err)
		}
		n.conn = c
	}
	if _, err := n.conn.Write([]byte(msg)); err != nil {
		// Drop the connection so the next send redials (systemd may have been re-executed).
		n.conn.Close()
		n.conn = nil
		return fmt.Errorf("sysd: send %q to NOTIFY_SOCKET %q: %w", firstLine(msg), n.socket, err)
	}
	return nil
}

// socketAddr maps NOTIFY_SOCKET to an address: a path, or "@name" for the abstract
// namespace (Go spells that with a leading NUL, which net does for a leading '@').
func socketAddr(s string) (*net.UnixAddr, error) {
	switch {
	case strings.HasPrefix(s, "/"), strings.HasPrefix(s, "@"):
		return &net.UnixAddr{Name: s, Net: "unixgram"}, nil
	case strings.HasPrefix(s, "vsock:"):
		return nil, fmt.Errorf("sysd: NOTIFY_SOCKET %q: vsock notification sockets are not supported", s)
	default:
		return nil, fmt.Errorf("sysd: NOTIFY_SOCKET %q: not an absolute path or abstract socket", s)
	}
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

func monotonicUsec() (uint64, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0, fmt.Errorf("sysd: read CLOCK_MONOTONIC for MONOTONIC_USEC: %w", err)
	}
	return uint64(ts.Sec)*1e6 + uint64(ts.Nsec)/1e3, nil
}
