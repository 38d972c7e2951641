package daemon

import (
	"log/slog"
	"testing"

	"github.com/nexd-project/nexd/daemon/config"
)

// TestGoRuntimeApplyAndRestore: go_gc_percent and go_memory_limit set nexd's collector,
// and a reload back to 0 restores what nexd started with.
func TestGoRuntimeApplyAndRestore(t *testing.T) {
	base := currentGoRuntime()
	t.Cleanup(func() { base.apply(config.NodeConfig{}, slog.New(slog.DiscardHandler)) })
	log := slog.New(slog.DiscardHandler)
	base.apply(config.NodeConfig{GoGCPercent: 37, GoMemoryLimit: 48 << 20}, log)
	if now := currentGoRuntime(); now.gcPercent != 37 || now.memoryLimit != 48<<20 {
		t.Errorf("after apply: %+v, want GOGC 37 and a 48 MiB limit", now)
	}
	base.apply(config.NodeConfig{}, log)
	if now := currentGoRuntime(); now != base {
		t.Errorf("after a reload to 0: %+v, want what nexd started with, %+v", now, base)
	}
}
