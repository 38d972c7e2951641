package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestSeedWalkthrough follows "Running Nex Nodes" with its settings in one config file
// (the guide's nested layout, ./config.json) and a selected NATS context, as its
// "Using Configuration Files" promises: `nexd node up` and every nexctl command of the
// walkthrough run with no flag the file already holds (no --namespace, no
// --nats.context, no --control-socket).
func TestSeedWalkthrough(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	dir := testkit.PublicDir(t)
	// nats context add nex-dev --server ...; nats context use nex-dev
	testkit.WriteFile(t, filepath.Join(dir, ".config", "nats", "context", "nex-dev.json"), `{"url": "`+s.ClientURL()+`"}`)
	testkit.WriteFile(t, filepath.Join(dir, ".config", "nats", "context.txt"), "nex-dev")
	cfg := map[string]any{
		"namespace": "system",
		"node": map[string]any{"up": map[string]any{
			"node_name": "lab-node", "nexus": "regional-cluster", "agent_restart_limit": 5, "state": "kv",
			"allow_remote_agent_registration": true, "tags": map[string]string{"region": "lab", "arch": "amd64"},
		}},
		"nats":   map[string]any{"context": "nex-dev", "timeout": "5s"},
		"logger": map[string]any{"level": "info", "target": []string{"std"}},
		// Where this test's node keeps its state and socket (an installed node's defaults).
		"state_dir":      filepath.Join(dir, "state"),
		"control_socket": filepath.Join(dir, "nexd.sock"),
	}
	if cg := cgroupRoot(t); cg != "" {
		cfg["cgroup_root"] = cg
	}
	b, _ := json.MarshalIndent(cfg, "", "  ")
	if err := os.WriteFile(filepath.Join(dir, "config.json"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	env := []string{"XDG_CONFIG_HOME=" + filepath.Join(dir, ".config")}
	ctl := func(args ...string) string {
		t.Helper()
		out, errOut, code, err := runIn(dir, env, nexctlBin(t), args...)
		if err != nil || code != 0 {
			t.Fatalf("nexctl %s: exit %d %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, err, out, errOut)
		}
		return out
	}

	n := &node{proc: startNexd(t, nexdOpts{args: []string{"node", "up"}, dir: dir, env: env}), socket: filepath.Join(dir, "nexd.sock")}
	st := n.waitReady(t)
	if st.Name != "lab-node" {
		t.Fatalf("node name %q, want the config's lab-node", st.Name)
	}
	n.waitNative(t)

	check := ctl("--check")
	for _, key := range []string{"namespace", "control_socket", "nats.context"} {
		if !regexp.MustCompile(`(?m)^│ ` + regexp.QuoteMeta(key) + ` .*config\.json`).MatchString(check) {
			t.Errorf("nexctl --check does not take %s from config.json:\n%s", key, check)
		}
	}
	// List nodes, inspect one, run and list a workload, drain it: the guide's commands.
	if out := ctl("node", "list"); !strings.Contains(out, st.NodeID) || !strings.Contains(out, "region=lab") {
		t.Errorf("node list:\n%s", out)
	}
	if out := ctl("node", "info", "lab-node", "--full"); !strings.Contains(out, st.NodeID) || !strings.Contains(out, "native") {
		t.Errorf("node info lab-node --full:\n%s", out)
	}
	ctl("workload", "run", "--name", "web", "--", "/bin/sleep", "600")
	if out := ctl("workload", "list"); !strings.Contains(out, "web") {
		t.Errorf("workload list:\n%s", out)
	}
	if out := ctl("status"); !strings.Contains(out, st.NodeID) {
		t.Errorf("status (control socket from the config):\n%s", out)
	}
	if out := ctl("node", "lameduck", "--node-id", "lab-node", "--delay", "1s", "--wait"); !strings.Contains(out, "drained") {
		t.Errorf("node lameduck --wait:\n%s", out)
	}
	if code := n.wait(t, 60e9); code != 0 {
		t.Errorf("nexd exit %d after lame duck", code)
	}
}
