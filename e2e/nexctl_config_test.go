package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// TestNexctlFindsItsNATS runs the real nexctl with one source of NATS settings at a
// time (a config file, NATS_URL, a selected NATS context, and nothing at all on the
// node's host) and checks it reaches the node and says where the settings came from.
func TestNexctlFindsItsNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	url := s.ClientURL()
	n := startNode(t, nodeOpts{external: url})
	st := n.waitReady(t)

	home := func(t *testing.T, files map[string]string) string {
		h := t.TempDir()
		for p, body := range files {
			full := filepath.Join(h, p)
			if err := os.MkdirAll(filepath.Dir(full), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(full, []byte(body), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		return h
	}
	cases := []struct {
		name       string
		env        []string
		nsFrom     string
		serverFrom string // origin of nats.servers, or of nats.context when servers is unset
		ns         string
	}{
		{name: "config file", ns: "lab",
			env:    []string{"HOME=" + home(t, map[string]string{".config/nex/config.json": `{"namespace": "lab", "nats": {"servers": "` + url + `"}}`})},
			nsFrom: ".config/nex/config.json", serverFrom: ".config/nex/config.json"},
		{name: "NATS_URL", ns: "system", env: []string{"NATS_URL=" + url}, nsFrom: "default", serverFrom: "env NATS_URL"},
		{name: "selected NATS context", ns: "system",
			// natscontext finds ~/.config through the passwd entry, not $HOME.
			env: []string{"XDG_CONFIG_HOME=" + filepath.Join(home(t, map[string]string{
				".config/nats/context/nex-dev.json": `{"url": "` + url + `"}`,
				".config/nats/context.txt":          "nex-dev",
			}), ".config")},
			nsFrom: "default", serverFrom: "nats context select"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// Only fleet commands: the control socket is not given, so only NATS can answer.
			out, errOut, code := run(t, tc.env, nexctlBin(t), "node", "ls", "--json")
			if code != 0 {
				t.Fatalf("node ls: exit %d: %s", code, errOut)
			}
			var nodes []protocol.NodePingResponse
			if err := json.Unmarshal([]byte(out), &nodes); err != nil || len(nodes) != 1 || nodes[0].NodeID != st.NodeID {
				t.Fatalf("node ls = %s (%v), want node %s", out, err, st.NodeID)
			}
			out, errOut, code = run(t, tc.env, nexctlBin(t), "--check", "--json")
			if code != 0 {
				t.Fatalf("--check: exit %d: %s", code, errOut)
			}
			var chk struct {
				Settings map[string]any    `json:"settings"`
				Origins  map[string]string `json:"origins"`
			}
			if err := json.Unmarshal([]byte(out), &chk); err != nil {
				t.Fatalf("--check --json: %v: %s", err, out)
			}
			from := chk.Origins["nats.servers"]
			if tc.serverFrom == "nats context select" {
				from = chk.Origins["nats.context"]
			}
			if !strings.HasSuffix(from, tc.serverFrom) {
				t.Errorf("NATS from %q, want %q", from, tc.serverFrom)
			}
			if chk.Settings["namespace"] != tc.ns || !strings.HasSuffix(chk.Origins["namespace"], tc.nsFrom) {
				t.Errorf("namespace %v from %q, want %s from %s", chk.Settings["namespace"], chk.Origins["namespace"], tc.ns, tc.nsFrom)
			}
		})
	}

	t.Run("nothing configured on the node's host", func(t *testing.T) {
		local := startNode(t, nodeOpts{}) // embedded NATS on a free port, not 4222
		lst := local.waitReady(t)
		env := []string{"NEX_CONTROL_SOCKET=" + local.socket}
		out, errOut, code := run(t, env, nexctlBin(t), "node", "ls", "--json")
		if code != 0 {
			t.Fatalf("node ls: exit %d: %s", code, errOut)
		}
		var nodes []protocol.NodePingResponse
		if err := json.Unmarshal([]byte(out), &nodes); err != nil || len(nodes) != 1 || nodes[0].NodeID != lst.NodeID {
			t.Fatalf("node ls = %s (%v), want node %s", out, err, lst.NodeID)
		}
		out, _, _ = run(t, env, nexctlBin(t), "--check")
		if !strings.Contains(out, "local node ("+local.socket+")") || !strings.Contains(out, local.natsURL) {
			t.Errorf("--check does not name the local node as the source:\n%s", out)
		}
	})
}
