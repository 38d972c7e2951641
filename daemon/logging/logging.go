// Package logging builds nexd's one *slog.Logger: a fan-out over the configured
// targets (std, file, journal, nats) plus an in-memory ring of recent records for
// `nexctl logs`. Level and targets can be changed at runtime (reload) without
// replacing loggers handed out earlier.
package logging

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/coreos/go-systemd/v22/journal"
)

// Target names as --logger.target accepts them.
const (
	TargetStd     = "std"
	TargetFile    = "file"
	TargetJournal = "journal"
	TargetNATS    = "nats"
)

// JournalSocket is where journald listens for the native protocol, the one path
// go-systemd's journal package sends to.
const JournalSocket = "/run/systemd/journal/socket"

// Options configure the logger; the zero value logs INFO text to stderr (or to the
// journal when stderr is the journal).
type Options struct {
	Level     string   // debug, info, warn, error ("" = info)
	Targets   []string // std, file, journal, nats; empty = journal when stderr is the journal, else std
	Format    string   // text or json ("" = text); for std, file and nats
	WithPID   bool
	File      string // path for the file target
	NodeID    string // NEX_NODE_ID in the journal
	Namespace string // NEX_NAMESPACE in the journal unless a record names its own
	Stderr    io.Writer
	// RingSize is how many recent records Recent keeps (default 1000).
	RingSize int
	// HideWorkloadOutput keeps workload output lines (records with the message
	// WorkloadOutputMsg) off the std, file and nats targets; the journal and the
	// ring buffer behind `nexctl logs --workload` still get them.
	HideWorkloadOutput bool
}

// WorkloadOutputMsg is the message of a record that carries one line of a workload's
// stdout or stderr (the native nexlet logs them so).
const WorkloadOutputMsg = "workload output"

// Publisher is what the nats target needs; *nats.Conn satisfies it.
type Publisher interface {
	Publish(subject string, data []byte) error
}

// Logger owns the handler behind the *slog.Logger it hands out.
type Logger struct {
	core *core
	log  *slog.Logger
}

// core is shared by every handler derived from the root (With, WithGroup).
type core struct {
	level slog.LevelVar
	state atomic.Pointer[state]
	pub   atomic.Pointer[publisher]
	ring  *ring

	mu     sync.Mutex // serialises Reconfigure and Close
	closed bool
}

// state is one configuration of sinks; Reconfigure swaps it as a whole.
type state struct {
	sinks     []slog.Handler
	survivors []slog.Handler // what still works after Close: ring and stderr
	closers   []io.Closer
	targets   []string
}

// ParseLevel accepts debug, info, warn(ing), error in any case, and slog's own
// spelling with an offset such as "INFO+2".
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "info":
		return slog.LevelInfo, nil
	case "debug":
		return slog.LevelDebug, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	var l slog.Level
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return 0, fmt.Errorf("logging: level %q: want debug, info, warn or error", s)
	}
	return l, nil
}

// Validate checks opts without opening anything.
func Validate(opts Options) error {
	var errs []error
	if _, err := ParseLevel(opts.Level); err != nil {
		errs = append(errs, err)
	}
	switch opts.Format {
	case "", "text", "json":
	default:
		errs = append(errs, fmt.Errorf("logging: format %q: want text or json", opts.Format))
	}
	for _, t := range opts.Targets {
		switch t {
		case TargetStd, TargetJournal, TargetNATS:
		case TargetFile:
			if opts.File == "" {
				errs = append(errs, errors.New("logging: target file needs a log file path"))
			}
		default:
			errs = append(errs, fmt.Errorf("logging: target %q: want std, file, journal or nats", t))
		}
	}
	return errors.Join(errs...)
}

// New builds the logger for opts.
func New(opts Options) (*Logger, error) {
	size := opts.RingSize
	if size <= 0 {
		size = 1000
	}
	c := &core{ring: newRing(size)}
	if err := c.apply(opts); err != nil {
		return nil, err
	}
	return &Logger{core: c, log: slog.New(&fanout{core: c})}, nil
}

// Slog returns the logger to pass down. It stays valid across Reconfigure.
func (l *Logger) Slog() *slog.Logger { return l.log }

// Level is the current minimum level.
func (l *Logger) Level() slog.Level { return l.core.level.Level() }

// Targets are the targets in effect (after the auto choice).
func (l *Logger) Targets() []string { return slices.Clone(l.core.state.Load().targets) }

// Reconfigure applies new options (reload). On error the old configuration stays.
// The file target is reopened, which also serves log rotation on SIGHUP.
func (l *Logger) Reconfigure(opts Options) error {
	return l.core.apply(opts)
}

// AttachNATS enables the nats target (when configured) once the node is connected:
// records go to $NEX.FEED.system.logs.<nodeID>.stdout, or .stderr from WARN up.
// Publishing is asynchronous through a bounded queue; a nil p detaches.
func (l *Logger) AttachNATS(p Publisher, nodeID string) {
	c := l.core
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	var next *publisher
	if p != nil {
		next = startPublisher(p, nodeID)
	}
	c.pub.Swap(next).halt()
}

// Close closes the file and journal sinks and ends every Follow channel. Records
// logged afterwards still reach std and the ring.
func (l *Logger) Close() error {
	c := l.core
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	c.pub.Swap(nil).halt()
	old := c.state.Load()
	c.state.Store(&state{sinks: old.survivors, survivors: old.survivors, targets: old.targets})
	c.ring.closeFollowers()
	return closeAll(old.closers)
}

func (c *core) apply(opts Options) error {
	if err := Validate(opts); err != nil {
		return err
	}
	level, _ := ParseLevel(opts.Level)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("logging: reconfigure after close")
	}
	st, err := c.build(opts)
	if err != nil {
		return err
	}
	old := c.state.Swap(st)
	c.level.Set(level)
	if old != nil {
		// A record racing the swap may still write to an old sink and lose its line;
		// that is the price of never blocking logging on a reload.
		return closeAll(old.closers)
	}
	return nil
}

func (c *core) build(opts Options) (*state, error) {
	stderr := opts.Stderr
	if stderr == nil {
		stderr = os.Stderr
	}
	var pidAttrs []slog.Attr
	if opts.WithPID {
		pidAttrs = []slog.Attr{slog.Int("pid", os.Getpid())}
	}
	targets := slices.Compact(slices.Sorted(slices.Values(opts.Targets)))
	if len(targets) == 0 {
		targets = []string{TargetStd}
		if JournalStreamIsStderr() {
			targets = []string{TargetJournal}
			auto := opts
			auto.Targets = targets
			st, err := c.build(auto)
			if err == nil {
				return st, nil
			}
			// stderr is the journal anyway: no native socket only costs the fields.
			fmt.Fprintf(stderr, "nexd: logging: %v; logging to stderr instead\n", err)
			targets = []string{TargetStd}
		}
	}
	st := &state{targets: targets}
	st.sinks = append(st.sinks, &ringHandler{ring: c.ring})
	st.survivors = append(st.survivors, st.sinks[0])
	if !slices.Contains(targets, TargetStd) {
		// After Close, the last lines (e.g. why nexd exits) still go somewhere.
		st.survivors = append(st.survivors, lineHandler(stderr, opts.Format).WithAttrs(pidAttrs))
	}
	for _, t := range targets {
		switch t {
		case TargetStd:
			h := lineHandler(stderr, opts.Format).WithAttrs(pidAttrs)
			st.sinks = append(st.sinks, hideOutput(h, opts.HideWorkloadOutput))
			st.survivors = append(st.survivors, h)
		case TargetFile:
			f, err := os.OpenFile(opts.File, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
			if err != nil {
				closeAll(st.closers)
				return nil, fmt.Errorf("logging: open log file: %w", err)
			}
			h := lineHandler(f, opts.Format).WithAttrs(pidAttrs)
			st.sinks = append(st.sinks, hideOutput(h, opts.HideWorkloadOutput))
			st.closers = append(st.closers, f)
		case TargetJournal:
			if err := journalReachable(); err != nil {
				closeAll(st.closers)
				return nil, err
			}
			st.sinks = append(st.sinks, newJournalHandler(opts.NodeID, opts.Namespace, opts.WithPID))
		case TargetNATS:
			st.sinks = append(st.sinks, hideOutput(newNATSHandler(&c.pub, opts.Format, pidAttrs), opts.HideWorkloadOutput))
		}
	}
	return st, nil
}

// lineHandler formats one record per line; level gating happens in the fan-out.
func lineHandler(w io.Writer, format string) slog.Handler {
	ho := &slog.HandlerOptions{Level: slog.Level(math.MinInt)}
	if format == "json" {
		return slog.NewJSONHandler(w, ho)
	}
	return slog.NewTextHandler(w, ho)
}

func closeAll(cs []io.Closer) error {
	var errs []error
	for _, c := range cs {
		if err := c.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// JournalStreamIsStderr reports whether fd 2 is the journal stream systemd set up
// ($JOURNAL_STREAM is "device:inode" of that stream), so logging natively to
// journald loses nothing and gains structured fields. A malformed JOURNAL_STREAM
// counts as no.
func JournalStreamIsStderr() bool {
	ok, err := journal.StderrIsJournalStream()
	return err == nil && ok
}

// fanout is the one slog.Handler behind every logger this package hands out. It
// reads the current state on each record, so a reload reaches loggers created
// before it, and replays its own With/WithGroup calls onto the new sinks.
type fanout struct {
	core  *core
	ops   []op
	cache atomic.Pointer[derived]
}

type op struct {
	group string
	attrs []slog.Attr
}

type derived struct {
	st *state
	hs []slog.Handler
}

func (h *fanout) Enabled(_ context.Context, l slog.Level) bool {
	return l >= h.core.level.Level()
}

func (h *fanout) Handle(ctx context.Context, r slog.Record) error {
	var errs []error
	for _, s := range h.handlers() {
		if err := s.Handle(ctx, r); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func (h *fanout) handlers() []slog.Handler {
	st := h.core.state.Load()
	if d := h.cache.Load(); d != nil && d.st == st {
		return d.hs
	}
	hs := make([]slog.Handler, len(st.sinks))
	for i, s := range st.sinks {
		for _, o := range h.ops {
			if o.group != "" {
				s = s.WithGroup(o.group)
			} else {
				s = s.WithAttrs(o.attrs)
			}
		}
		hs[i] = s
	}
	h.cache.Store(&derived{st: st, hs: hs})
	return hs
}

func (h *fanout) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	return &fanout{core: h.core, ops: append(slices.Clip(h.ops), op{attrs: slices.Clone(attrs)})}
}

func (h *fanout) WithGroup(name string) slog.Handler {
	if name == "" {
		return h
	}
	return &fanout{core: h.core, ops: append(slices.Clip(h.ops), op{group: name})}
}

// hideOutput drops workload output records from h when hide is set.
func hideOutput(h slog.Handler, hide bool) slog.Handler {
	if !hide {
		return h
	}
	return outputFilter{h}
}

type outputFilter struct{ slog.Handler }

func (f outputFilter) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == WorkloadOutputMsg {
		return nil
	}
	return f.Handler.Handle(ctx, r)
}

func (f outputFilter) WithAttrs(attrs []slog.Attr) slog.Handler {
	return outputFilter{f.Handler.WithAttrs(attrs)}
}

func (f outputFilter) WithGroup(name string) slog.Handler {
	return outputFilter{f.Handler.WithGroup(name)}
}
