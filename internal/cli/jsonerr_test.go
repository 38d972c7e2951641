package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestJSONErrorsGolden runs failing commands with --json: every error is one JSON
// object on stderr, nothing on stdout, and the exit code is in it.
func TestJSONErrorsGolden(t *testing.T) {
	b := &localBackend{secrets: map[string]string{}, reload: control.ReloadResult{OK: true}}
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	serveControl(t, sock, b)
	ns := testnats.Start(t, testnats.Options{NoJetStream: true})
	nats := []string{"-s", ns.ClientURL(), "--nats.timeout", "300ms"}

	cases := []struct {
		name string
		args []string
	}{
		{"unknown command", []string{"--json", "bogus"}},
		{"unknown flag", []string{"--json", "status", "--bogus"}},
		{"missing argument", []string{"--json", "nexlet", "restart"}},
		{"bad duration", []string{"--json", "lameduck", "--delay", "soon"}},
		{"no daemon", []string{"--json", "status", "--control-socket", "/nonexistent/nexd.sock"}},
		{"unknown nexlet", []string{"--json", "--control-socket", sock, "nexlet", "restart", "nope"}},
		{"secret not found", []string{"--json", "--control-socket", sock, "secret", "rm", "default", "NOPE"}},
		{"nothing to run", []string{"--json", "workload", "run", "--name", "x"}},
		{"bad lifecycle", []string{"--json", "workload", "run", "--lifecycle", "forever", "--", "/bin/true"}},
		{"workload not found", append([]string{"--json", "workload", "stop", "WNOPE"}, nats...)},
		{"node not found", append([]string{"--json", "node", "info", "NNOPE"}, nats...)},
		{"nats unreachable", []string{"--json", "node", "list", "-s", "nats://127.0.0.1:1", "--nats.timeout", "300ms"}},
		{"lameduck without target", []string{"--json", "node", "lameduck"}},
	}
	var all bytes.Buffer
	for _, tc := range cases {
		var out, errb bytes.Buffer
		code := Main(context.Background(), tc.args, IO{Stdout: &out, Stderr: &errb, Env: func(string) string { return "" }})
		if code == 0 {
			t.Errorf("%s: exit 0", tc.name)
		}
		if out.Len() != 0 {
			t.Errorf("%s: stdout %q, want nothing", tc.name, out.String())
		}
		var je jsonError
		if err := json.Unmarshal(errb.Bytes(), &je); err != nil || je.Error.ExitCode != code || je.Error.Message == "" {
			t.Errorf("%s: stderr %q is not one JSON error with exit code %d (%v)", tc.name, errb.String(), code, err)
		}
		s := strings.ReplaceAll(errb.String(), sock, "SOCKET")
		s = strings.ReplaceAll(s, strings.TrimPrefix(ns.ClientURL(), "nats://"), "NATS")
		fmt.Fprintf(&all, "# %s (exit %d)\n%s", tc.name, code, s)
	}
	golden(t, "json_errors", all.Bytes())
}
