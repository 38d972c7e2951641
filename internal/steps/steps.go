// Package steps times the steps of one operation (a deploy in the node, a start in the
// native nexlet) for one debug log line, so where the time goes can be read from a
// running node's log (--logger.level debug). Nothing is measured unless the logger
// logs at debug level: every method of a nil *Timer does nothing.
package steps

import (
	"context"
	"log/slog"
	"strings"
	"time"
)

// Timer records the time each step took since the one before.
type Timer struct {
	start, last time.Time
	b           strings.Builder
}

// Start returns a running timer when log logs at debug level, else nil.
func Start(log *slog.Logger) *Timer {
	if log == nil || !log.Enabled(context.Background(), slog.LevelDebug) {
		return nil
	}
	now := time.Now()
	return &Timer{start: now, last: now}
}

// StartAt is Start for an operation that began at t (when a request arrived).
func StartAt(log *slog.Logger, t time.Time) *Timer {
	if t.IsZero() || log == nil || !log.Enabled(context.Background(), slog.LevelDebug) {
		return nil
	}
	return &Timer{start: t, last: t}
}

// Step ends the step called name.
func (t *Timer) Step(name string) {
	if t == nil {
		return
	}
	now := time.Now()
	if t.b.Len() > 0 {
		t.b.WriteByte(' ')
	}
	t.b.WriteString(name)
	t.b.WriteByte('=')
	t.b.WriteString(now.Sub(t.last).Round(time.Microsecond).String())
	t.last = now
}

// Log writes one debug line: msg, attrs, the total so far and the steps in order
// ("steps": "parse=30µs fork=2.1ms ...", one string, so that it reads the same when the
// node relays a nexlet's line).
func (t *Timer) Log(log *slog.Logger, msg string, attrs ...any) {
	if t == nil {
		return
	}
	attrs = append(attrs, "total", time.Since(t.start).Round(time.Microsecond).String(), "steps", t.b.String())
	log.Debug(msg, attrs...)
}
