package native

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nexd-project/nexd/nexlet"
	"github.com/nexd-project/nexd/nexlet/secrets"
)

// Environment the node sets for the native nexlet, besides nexlet.ConnDataFromEnv's.
const (
	EnvCgroup       = "NEX_AGENT_CGROUP"         // cgroup spec of the nexlet's subtree
	EnvRuntimeDir   = "NEX_NATIVE_RUNTIME_DIR"   // workloads/<id> private dirs
	EnvStateDir     = "NEX_NATIVE_STATE_DIR"     // secrets/<namespace>/<key>
	EnvMaxWorkloads = "NEX_NATIVE_MAX_WORKLOADS" // optional bound on running workloads
)

// ShutdownTimeout bounds how long Main waits for workloads to stop at exit.
const ShutdownTimeout = 2 * time.Minute

// Main runs the native nexlet as a child of the node (`nexd nexlet native`): it reads
// its identity and registration credentials from env, registers, serves until ctx ends,
// then stops every workload with its grace.
func Main(ctx context.Context, env func(string) string, log *slog.Logger) error {
	creds, err := nexlet.ConnDataFromEnv(env)
	if err != nil {
		return err
	}
	nodeID, agentID, err := nexlet.IdentityFromEnv(env)
	if err != nil {
		return err
	}
	cfg := Config{Cgroup: env(EnvCgroup), Logger: log, RuntimeDir: env(EnvRuntimeDir)}
	if cfg.RuntimeDir == "" {
		cfg.RuntimeDir = filepath.Join(os.TempDir(), "nexd-native")
		if d := env("RUNTIME_DIRECTORY"); d != "" {
			cfg.RuntimeDir = filepath.Join(d, "nexlets", "native")
		}
	}
	stateDir := env(EnvStateDir)
	if stateDir == "" {
		stateDir = "/var/lib/nexd"
		if d := env("STATE_DIRECTORY"); d != "" {
			stateDir = d
		}
	}
	cfg.Secrets = secrets.FileStore{Dir: filepath.Join(stateDir, "secrets")}
	if v := env(EnvMaxWorkloads); v != "" {
		if cfg.MaxWorkloads, err = strconv.Atoi(v); err != nil || cfg.MaxWorkloads < 0 {
			return fmt.Errorf("%s=%q: want a non-negative integer", EnvMaxWorkloads, v)
		}
	}
	n, err := New(cfg)
	if err != nil {
		return err
	}
	log.Info("native nexlet starting", "node_id", nodeID, "agent_id", agentID, "isolation", n.IsolationMode(),
		"runtime_dir", cfg.RuntimeDir, "xkey", n.XKey())
	r, err := nexlet.NewRunner(ctx, nodeID, n, nexlet.WithLogger(log))
	if err != nil {
		return err
	}
	n.SetFeed(r)
	if err := r.Run(agentID, creds); err != nil {
		return err
	}
	<-ctx.Done()
	sctx, cancel := context.WithTimeout(context.Background(), ShutdownTimeout)
	defer cancel()
	return errors.Join(n.Shutdown(sctx), r.Shutdown())
}
