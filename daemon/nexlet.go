package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/nexd-project/nexd/nexlet/native"
)

// runNexlet runs a built-in nexlet as a child process of nexd (`nexd nexlet native`):
// a crash in it never takes the node down. It logs to stderr, which the supervisor
// turns into journal entries tagged with the nexlet's name (JSON lines carry the level
// and attributes across).
func runNexlet(ctx context.Context, args []string, stderr io.Writer) int {
	if len(args) != 1 || args[0] != "native" {
		fmt.Fprintln(stderr, "usage: nexd nexlet native")
		return ExitUsage
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
	if err := native.Main(ctx, os.Getenv, log); err != nil {
		log.Error("native nexlet failed", "err", err)
		return ExitFailure
	}
	return ExitOK
}
