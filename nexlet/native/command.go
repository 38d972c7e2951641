package native

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/profdump"
)

// Command runs the native nexlet as a child process of nexd (`nexd nexlet native`; args
// are what follows "nexlet") and returns the exit code: a crash in it never takes the
// node down. It logs JSON lines to stderr, which the supervisor turns into journal
// entries tagged with the nexlet's name, level and attributes kept. ahead is what a
// pre-started process built before its hand-off (nil when none), for Main.
func Command(ctx context.Context, args []string, stderr io.Writer, ahead *Ahead) int {
	defer ahead.Wait()
	if len(args) != 1 || args[0] != "native" {
		fmt.Fprintln(stderr, "usage: nexd nexlet native")
		return 2
	}
	// Started by nexd, the nexlet's output is a FIFO it holds open read-write (it may
	// outlive nexd): while no nexd reads it, a full pipe must not block the nexlet, so
	// lines that do not fit are dropped. And no write may kill it with SIGPIPE: caught,
	// not ignored, since an ignored signal stays ignored across execve, in every
	// workload (a caught one is back at its default there). Go then returns EPIPE.
	sigpipe := make(chan os.Signal, 1) // never read: a full channel drops the signal
	signal.Notify(sigpipe, syscall.SIGPIPE)
	defer signal.Stop(sigpipe)
	if stderr == os.Stderr {
		if nb, err := newDroppingWriter(int(os.Stderr.Fd())); err == nil {
			stderr = nb
		}
	}
	level := new(slog.LevelVar)
	level.Set(logLevel(os.Getenv(EnvLogLevel)))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level,
		// JSON writes durations as nanoseconds; the node log should read "6s".
		ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr {
			if a.Value.Kind() == slog.KindDuration {
				return slog.String(a.Key, a.Value.Duration().String())
			}
			return a
		}}))
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	// SIGUSR1 (supervise.SignalDetach): nexd stops with live_restore.
	detach := make(chan os.Signal, 1)
	signal.Notify(detach, syscall.SIGUSR1)
	defer signal.Stop(detach)
	// SIGHUP (supervise.SignalReattach): a new nexd adopted this nexlet.
	reattach := make(chan os.Signal, 1)
	signal.Notify(reattach, syscall.SIGHUP)
	defer signal.Stop(reattach)
	// Off unless NEXD_PROFILE_DIR is set (nexd passes its own on).
	pctx, stopProf := context.WithCancel(ctx)
	waitProf := profdump.Start(pctx, os.Getenv, "nexlet-native", log)
	defer waitProf()
	defer stopProf()
	if err := Main(ctx, os.Getenv, log, level, detach, reattach, ahead); err != nil {
		log.Error("native nexlet failed", "err", err)
		return 1
	}
	return 0
}

// droppingWriter writes to a non-blocking descriptor and drops what does not fit
// (counted, and reported with the next line that does). A line of at most PIPE_BUF
// bytes is written whole or not at all; a longer one (a workload's output line, up to
// pumpMaxLine, in the nexlet's log) only when the pipe has room for all of it: begun
// and not finished, it would hold the writer until a reader came, and with it the
// watcher that logs every workload's lines (while no nexd ran, the flood of one
// workload stopped the reading of all; the quiet one's lines waited in its pipe and
// most went over its output limit when nexd came back).
type droppingWriter struct {
	fd      int
	mu      sync.Mutex
	dropped int
	broken  bool // a line begun was left unfinished: the next starts on a line of its own
}

// finishLineMax bounds the wait for a reader to take the rest of a line begun: only a
// pipe written by another as well, or not a pipe, may take part of a line.
const finishLineMax = 100 * time.Millisecond

// pipeBuf is Linux's PIPE_BUF: a write of at most this many bytes to a pipe is whole.
const pipeBuf = 4096

func newDroppingWriter(fd int) (*droppingWriter, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	return &droppingWriter{fd: fd}, nil
}

func (w *droppingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.broken {
		if n, err := unix.Write(w.fd, []byte{'\n'}); err != nil || n != 1 {
			w.dropped++
			return len(p), nil
		}
		w.broken = false
	}
	if w.dropped > 0 {
		note := fmt.Appendf(nil, `{"level":"WARN","msg":"native nexlet log lines dropped while nobody read them","dropped":%d}`+"\n", w.dropped)
		if n, err := unix.Write(w.fd, note); err == nil && n == len(note) {
			w.dropped = 0
		}
	}
	if len(p) > pipeBuf && !w.fits(len(p)) {
		w.dropped++
		return len(p), nil
	}
	off := 0
	var giveUp time.Time
	for off < len(p) {
		n, err := unix.Write(w.fd, p[off:])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			if off == 0 {
				w.dropped++
				return len(p), nil
			}
			if errors.Is(err, unix.EAGAIN) {
				if giveUp.IsZero() {
					giveUp = time.Now().Add(finishLineMax)
				}
				if time.Now().Before(giveUp) {
					time.Sleep(time.Millisecond) // finish the line begun
					continue
				}
				w.broken, w.dropped = true, w.dropped+1
				return len(p), nil
			}
			return off, err
		}
		off += n
	}
	return len(p), nil
}

// fits reports whether the pipe has room for n bytes now (only this writer fills it,
// so the room only grows until the write); true when the descriptor is no pipe.
func (w *droppingWriter) fits(n int) bool {
	size, err := unix.FcntlInt(uintptr(w.fd), unix.F_GETPIPE_SZ, 0)
	if err != nil {
		return true
	}
	queued, err := unix.IoctlGetInt(w.fd, unix.TIOCINQ)
	if err != nil {
		return true
	}
	return size-queued >= n
}

// logLevel is the level EnvLogLevel names; INFO when it names none.
func logLevel(v string) slog.Level {
	var l slog.Level
	if v == "" || l.UnmarshalText([]byte(v)) != nil {
		return slog.LevelInfo
	}
	return l
}
