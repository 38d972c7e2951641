package native

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
)

// Command runs the native nexlet as a child process of nexd (`nexd nexlet native`; args
// are what follows "nexlet") and returns the exit code: a crash in it never takes the
// node down. It logs JSON lines to stderr, which the supervisor turns into journal
// entries tagged with the nexlet's name, level and attributes kept.
func Command(ctx context.Context, args []string, stderr io.Writer) int {
	if len(args) != 1 || args[0] != "native" {
		fmt.Fprintln(stderr, "usage: nexd nexlet native")
		return 2
	}
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo,
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
	if err := Main(ctx, os.Getenv, log, detach); err != nil {
		log.Error("native nexlet failed", "err", err)
		return 1
	}
	return 0
}
