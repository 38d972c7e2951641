package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestUpstreamGlobalConfigAccepted: a ~/.config/nex/config.json written for upstream's
// nex CLI (its global keys, the nested node.up layout, resource_directory, kong's tag
// syntax on the command line) passes the real nexd's --check with one notice per key.
func TestUpstreamGlobalConfigAccepted(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	home := t.TempDir()
	dir := filepath.Join(home, ".config", "nex")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	cfg := `{
  "namespace": "system",
  "json": true,
  "disable_upgrade_check": true,
  "logger": {"level": "info", "target": ["std"], "color": true, "short": true, "timefmt": "DateTime"},
  "nats": {"servers": ["nats://127.0.0.1:4222"], "timeout": "5s"},
  "node": {"up": {"node_name": "prod-node-1", "nexus": "regional-cluster", "agent_restart_limit": 5,
    "resource_directory": "/home/u/.config/nex", "tags": {"region": "lab"}}}
}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	out, errOut, code := run(t, []string{"HOME=" + home, "XDG_CONFIG_HOME=" + filepath.Join(home, ".config")}, nexdBin(t),
		"node", "up", "--check", "--tags", "arch=amd64;pool=blue")
	if code != 0 || !strings.Contains(out, "configuration is valid") {
		t.Fatalf("nexd --check: exit %d\n%s\n%s", code, out, errOut)
	}
	for _, want := range []string{"json: no effect in nexd", "disable_upgrade_check: no effect", "logger.color: no effect",
		"logger.short: no effect", "logger.timefmt: no effect", "node.up.resource_directory: no effect in nexd"} {
		if !strings.Contains(out, want) {
			t.Errorf("--check lacks the notice %q:\n%s", want, out)
		}
	}
	if !strings.Contains(out, `"arch":"amd64"`) || !strings.Contains(out, `"pool":"blue"`) {
		t.Errorf("--tags 'arch=amd64;pool=blue' not parsed as two tags:\n%s", out)
	}
}
