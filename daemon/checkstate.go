package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/identity"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/daemon/state"
)

// checkConnectBound bounds --check's look at the NATS system.
const checkConnectBound = 3 * time.Second

// checkStateReplicas is --check's account of the state bucket's copies (state "kv"):
// how many nexd will ask for and why, and, where it can look (an external NATS it
// reaches within checkConnectBound), how many the node's bucket has now and what start
// will do about a difference. Each line is a "# " comment; problem is set when start
// would fail for it.
func checkStateReplicas(ctx context.Context, cfg *config.Config) (lines []string, problem error) {
	if cfg.Node.State != "kv" {
		return nil, nil
	}
	say := func(format string, a ...any) { lines = append(lines, "# state bucket: "+fmt.Sprintf(format, a...)) }
	external := cfg.NATS.Context != "" || len(cfg.NATS.Servers) > 0
	if !external {
		if cfg.Node.InatsConfig != "" {
			say("replicas are decided at start from the embedded server's cluster (inats_config); the log says what it got: \"workload state bucket ... replicas=N wanted=M\"")
			return lines, nil
		}
		if cfg.Node.StateReplicas > 1 {
			return lines, fmt.Errorf("state_replicas %d: the zero-config embedded server is one server and holds one copy; set 0 or 1, or use a NATS cluster (nats.servers)", cfg.Node.StateReplicas)
		}
		say("1 replica on the embedded server (it is not clustered)")
		return lines, nil
	}
	nodeID := ""
	if cfg.Node.Seed != "" || cfg.Node.StateDir != "" && fileExists(filepath.Join(cfg.Node.StateDir, identity.NodeSeedFile)) {
		if id, err := identity.Load(cfg.Node.Seed, cfg.Node.XKeySeed, cfg.Node.StateDir); err == nil {
			nodeID = id.ID()
		}
	}
	cctx, cancel := context.WithTimeout(ctx, checkConnectBound)
	defer cancel()
	o, _ := natsOptions(cfg)
	conn, err := natsconn.Connect(cctx, o, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		say("NATS not reachable from --check within %s (%v): the count is decided at start, and the log says what it got: \"workload state bucket ... replicas=N wanted=M\"", checkConnectBound, err)
		return lines, nil
	}
	defer conn.Close(context.Background())
	wanted, why := cfg.Node.StateReplicas, fmt.Sprintf("state_replicas %d", cfg.Node.StateReplicas)
	if wanted <= 0 {
		var auto string
		wanted, auto = state.AutoReplicas(conn.NC)
		why = "state_replicas 0 (auto): " + auto
	}
	say("nexd asks for %d replicas (%s)", wanted, why)
	if n := len(conn.NC.Servers()); conn.NC.ConnectedClusterName() == "" && wanted > 1 || n < wanted {
		say("warning: the NATS system looks too small for %d replicas (cluster %q, %d servers known): start fails if JetStream cannot place them", wanted, conn.NC.ConnectedClusterName(), n)
	}
	if nodeID == "" {
		say("the node has no identity yet (first start): its bucket will be created with %d replicas", wanted)
		return lines, nil
	}
	have, err := state.BucketReplicas(cctx, conn.NC, nodeID, conn.JSDomain())
	switch {
	case errors.Is(err, jetstream.ErrBucketNotFound):
		say("%s does not exist yet: start creates it with %d replicas", state.BucketName(nodeID), wanted)
	case err != nil:
		say("%s: cannot read it (%v)", state.BucketName(nodeID), err)
	case have < wanted:
		say("%s has %d replicas, fewer than %d: start scales it up, or fails saying why (never runs on fewer quietly)", state.BucketName(nodeID), have, wanted)
	default:
		say("%s has %d replicas", state.BucketName(nodeID), have)
	}
	return lines, nil
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}
