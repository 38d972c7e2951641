package daemon

import (
	"log/slog"
	"math"
	"runtime/debug"
	"strconv"

	"github.com/nexd-project/nexd/daemon/config"
)

// goRuntime is what the Go runtime of nexd runs with when go_gc_percent and
// go_memory_limit are 0 (config.DefaultGoGCPercent or $GOGC, Go's limit or
// $GOMEMLIMIT), so that a reload back to 0 restores it.
type goRuntime struct {
	gcPercent   int
	memoryLimit int64
}

// currentGoRuntime reads the settings in force without changing them.
func currentGoRuntime() goRuntime {
	gc := debug.SetGCPercent(100)
	debug.SetGCPercent(gc)
	return goRuntime{gcPercent: gc, memoryLimit: debug.SetMemoryLimit(-1)}
}

// apply sets nexd's collector from the node config; 0 keeps what nexd started with.
func (base goRuntime) apply(n config.NodeConfig, log *slog.Logger) {
	gc, limit := base.gcPercent, base.memoryLimit
	if n.GoGCPercent != 0 {
		gc = n.GoGCPercent
	}
	if n.GoMemoryLimit > 0 {
		limit = n.GoMemoryLimit
	}
	debug.SetGCPercent(gc)
	debug.SetMemoryLimit(limit)
	if n.GoGCPercent != 0 || n.GoMemoryLimit > 0 {
		log.Debug("go runtime", "gc_percent", gc, "memory_limit", limitText(limit))
	}
}

func limitText(l int64) string {
	if l == math.MaxInt64 {
		return "none"
	}
	return strconv.FormatInt(l, 10)
}
