package profdump

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestStartWritesProfilesOnlyWhenAsked: without the variable nothing is written; with
// it, the heap and goroutine profiles and the memory classes appear under the process's
// name and pid.
func TestStartWritesProfilesOnlyWhenAsked(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	Start(ctx, func(string) string { return "" }, "x", slog.New(slog.DiscardHandler))()
	dir := t.TempDir()
	wait := Start(ctx, func(k string) string {
		if k == EnvDir {
			return dir
		}
		return ""
	}, "x", slog.New(slog.DiscardHandler))
	base := filepath.Join(dir, "x-"+strconv.Itoa(os.Getpid()))
	for _, ext := range []string{".heap", ".goroutine", ".mem"} {
		testkit.EventuallyWithin(t, 10*time.Second, "profile "+ext, func() bool {
			fi, err := os.Stat(base + ext)
			return err == nil && fi.Size() > 0
		})
	}
	cancel()
	wait()
	mem, _ := os.ReadFile(base + ".mem")
	if !strings.Contains(string(mem), "/memory/classes/heap/stacks:bytes ") {
		t.Errorf("memory classes: %s", mem)
	}
}
