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
// (counted, and reported with the next line that does).
type droppingWriter struct {
	fd      int
	mu      sync.Mutex
	dropped int
}

func newDroppingWriter(fd int) (*droppingWriter, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, err
	}
	return &droppingWriter{fd: fd}, nil
}

func (w *droppingWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.dropped > 0 {
		note := fmt.Appendf(nil, `{"level":"WARN","msg":"native nexlet log lines dropped while nobody read them","dropped":%d}`+"\n", w.dropped)
		if n, err := unix.Write(w.fd, note); err == nil && n == len(note) {
			w.dropped = 0
		}
	}
	// A line of the JSON handler is one write, far below PIPE_BUF... or not: a
	// partial write is completed, a refused one dropped.
	off := 0
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
				time.Sleep(time.Millisecond) // finish the line begun
				continue
			}
			return off, err
		}
		off += n
	}
	return len(p), nil
}

// logLevel is the level EnvLogLevel names; INFO when it names none.
func logLevel(v string) slog.Level {
	var l slog.Level
	if v == "" || l.UnmarshalText([]byte(v)) != nil {
		return slog.LevelInfo
	}
	return l
}
