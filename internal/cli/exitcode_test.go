package cli

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// localBackend is a small in-test control.Backend; the real one is the daemon's.
type localBackend struct {
	mu      sync.Mutex
	reload  control.ReloadResult
	secrets map[string]string
}

func (b *localBackend) Status(context.Context) (control.Status, error) {
	return control.Status{NodeID: "NLOCAL", Name: "here", Nexus: "nexus", Version: "0.1.0", State: control.StateRunning,
		Uptime: control.Duration(time.Minute), Workloads: map[string]int{"running": 1},
		Nexlets: []control.Nexlet{{Name: "native", Type: "native", PID: 7, State: "running", Health: "healthy"}}}, nil
}
func (b *localBackend) Reload(context.Context) (control.ReloadResult, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.reload, nil
}
func (b *localBackend) Lameduck(_ context.Context, d time.Duration) (control.LameduckResult, error) {
	return control.LameduckResult{Until: time.Now().Add(d)}, nil
}
func (b *localBackend) Nexlets(context.Context) ([]control.Nexlet, error) {
	return []control.Nexlet{{Name: "native"}}, nil
}
func (b *localBackend) RestartNexlet(_ context.Context, name string) error {
	if name != "native" {
		return fmt.Errorf("nexlet %q: %w", name, control.ErrNotFound)
	}
	return nil
}
func (b *localBackend) Workloads(context.Context) ([]control.Workload, error) { return nil, nil }
func (b *localBackend) Logs(_ context.Context, q control.LogQuery) ([]control.LogLine, error) {
	return []control.LogLine{{Time: time.Unix(0, 0).UTC(), Level: "info", Msg: "node ready", Nexlet: q.Nexlet}}, nil
}
func (b *localBackend) FollowLogs(ctx context.Context, _ control.LogQuery) (<-chan control.LogLine, error) {
	ch := make(chan control.LogLine)
	close(ch)
	return ch, nil
}
func (b *localBackend) Config(context.Context) (json.RawMessage, error) {
	return json.RawMessage(`{"nexus":"nexus"}`), nil
}
func (b *localBackend) Secrets() control.SecretStore { return b }
func (b *localBackend) Metrics() http.Handler        { return nil }
func (b *localBackend) Set(ns, key string, v []byte) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.secrets[ns+"/"+key] = string(v)
	return nil
}
func (b *localBackend) List(ns string) ([]string, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []string
	for k := range b.secrets {
		if n, key, _ := strings.Cut(k, "/"); n == ns {
			out = append(out, key)
		}
	}
	return out, nil
}
func (b *localBackend) Delete(ns, key string) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.secrets[ns+"/"+key]; !ok {
		return control.ErrNotFound
	}
	delete(b.secrets, ns+"/"+key)
	return nil
}

// bins builds the real nexctl once for this package's tests.
var bins testkit.Binaries

func TestMain(m *testing.M) { os.Exit(bins.Run(m)) }

func buildNexctl(t *testing.T) string {
	t.Helper()
	return bins.Path(t, "github.com/nexd-project/nexd/cmd/nexctl")
}

// serveControl serves a control socket at sock over b until the test ends.
func serveControl(t *testing.T, sock string, b control.Backend) {
	t.Helper()
	srv, err := control.Listen(sock, control.ServerOptions{Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
}

type result struct {
	out, err string
	code     int
}

func runBin(t *testing.T, bin string, env []string, stdin string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = append([]string{"PATH=" + os.Getenv("PATH"), "HOME=" + t.TempDir()}, env...)
	cmd.Stdin = strings.NewReader(stdin)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run nexctl %v: %v", args, err)
	}
	return result{out.String(), errb.String(), code}
}

func TestBinaryExitCodes(t *testing.T) {
	bin := buildNexctl(t)
	b := &localBackend{secrets: map[string]string{}, reload: control.ReloadResult{OK: true, Applied: []string{"tags"}}}
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	serveControl(t, sock, b)
	env := []string{"NEX_CONTROL_SOCKET=" + sock}
	ns := testnats.Start(t, testnats.Options{NoJetStream: true})

	tests := []struct {
		name     string
		env      []string
		stdin    string
		args     []string
		code     int
		stdout   string // substring
		stderr   string // substring
		noStdout bool
	}{
		{name: "unknown command", args: []string{"bogus"}, code: 2, stderr: "unknown command", noStdout: true},
		{name: "unknown flag", args: []string{"status", "--bogus"}, code: 2, stderr: "unknown flag", noStdout: true},
		{name: "missing argument", args: []string{"nexlet", "restart"}, code: 2, stderr: "needs 1 argument(s) (NAME), got 0\nRun 'nexctl nexlet restart --help' for usage.", noStdout: true},
		{name: "unknown command help", args: []string{"bogus"}, code: 2, stderr: "Run 'nexctl --help' for usage.", noStdout: true},
		{name: "mistyped command", args: []string{"stauts"}, code: 2, stderr: `unknown command "stauts" for "nexctl"; did you mean status?`, noStdout: true},
		{name: "mistyped subcommand", args: []string{"workload", "lsit"}, code: 2, stderr: `unknown command "lsit" for "nexctl workload"; did you mean list?`, noStdout: true},
		{name: "bad duration", env: env, args: []string{"lameduck", "--delay", "soon"}, code: 2, stderr: "invalid argument", noStdout: true},
		{name: "no daemon", args: []string{"status", "--control-socket", filepath.Join(t.TempDir(), "none.sock")}, code: 1, stderr: "cannot reach nexd", noStdout: true},
		{name: "status", env: env, args: []string{"status"}, stdout: "NLOCAL"},
		{name: "status json", env: env, args: []string{"--json", "status"}, stdout: `"node_id": "NLOCAL"`},
		{name: "reload ok", env: env, args: []string{"reload"}, stdout: "applied: tags"},
		{name: "lameduck", env: env, args: []string{"lameduck", "--delay", "2m"}, stdout: "Workloads will stop at"},
		{name: "nexlets", env: env, args: []string{"nexlets"}, stdout: "native"},
		{name: "restart unknown nexlet", env: env, args: []string{"nexlet", "restart", "nope"}, code: 1, stderr: "not found", noStdout: true},
		{name: "restart nexlet", env: env, args: []string{"nexlet", "restart", "native"}, stdout: "Nexlet native restarted"},
		{name: "complete nexlet names", env: env, args: []string{"__complete", "nexlet", "restart", "na"}, stdout: "native\t"},
		{name: "complete logs --nexlet", env: env, args: []string{"__complete", "logs", "--nexlet", ""}, stdout: "native\t"},
		{name: "workloads", env: env, args: []string{"workloads"}, stdout: "No workloads found"},
		{name: "logs", env: env, args: []string{"logs", "-n", "5", "--nexlet", "native"}, stdout: "node ready"},
		{name: "logs follow ends with stream", env: env, args: []string{"logs", "-f"}, stdout: "node ready"},
		{name: "logs both filters", env: env, args: []string{"logs", "--nexlet", "a", "--workload", "b"}, code: 2, stderr: "mutually exclusive"},
		{name: "config", env: env, args: []string{"config"}, stdout: `"nexus": "nexus"`},
		{name: "secret set stdin", env: env, stdin: "hunter2\n", args: []string{"secret", "set", "default", "PW", "-"}, stdout: "Secret default/PW set"},
		{name: "secret set argv refused", env: env, args: []string{"secret", "set", "default", "ARGV", "v"}, code: 2, stderr: "--insecure-argv", noStdout: true},
		{name: "secret set no value stdin", env: env, stdin: "s2\n", args: []string{"secret", "set", "default", "PW2"}, stdout: "Secret default/PW2 set"},
		{name: "secret set empty stdin refused", env: env, stdin: "", args: []string{"secret", "set", "default", "PW"}, code: 1, stderr: "no value on stdin; nothing was set", noStdout: true},
		{name: "secret set empty stdin with dash", env: env, stdin: "", args: []string{"secret", "set", "default", "EMPTY", "-"}, stdout: "Secret default/EMPTY set"},
		{name: "secret set oversize stdin refused", env: env, stdin: strings.Repeat("x", maxSecretValue+1), args: []string{"secret", "set", "default", "PW", "-"}, code: 1, stderr: "more than 524288 bytes; nothing was set", noStdout: true},
		{name: "secret set insecure argv", env: env, args: []string{"secret", "set", "--insecure-argv", "default", "PW3", "v3"}, stdout: "Secret default/PW3 set"},
		{name: "secret list", env: env, args: []string{"secret", "list", "default"}, stdout: "PW"},
		{name: "secret rm", env: env, args: []string{"secret", "rm", "default", "PW"}, stdout: "removed"},
		{name: "secret rm again", env: env, args: []string{"secret", "rm", "default", "PW"}, code: 1, stderr: "not found"},
		{name: "node list", args: []string{"node", "list", "-s", ns.ClientURL(), "--nats.timeout", "1s"}, stdout: "No nodes found"},
		{name: "node list json", args: []string{"--json", "node", "list", "-s", ns.ClientURL(), "--nats.timeout", "1s"}, stdout: "[]"},
		{name: "nats unreachable", args: []string{"node", "list", "-s", "nats://127.0.0.1:1", "--nats.timeout", "1s"}, code: 1, stderr: "connect to NATS: no server answered at nats://127.0.0.1:1 within 1s (--nats.timeout; connection refused): is it running?", noStdout: true},
		{name: "metrics disabled", env: env, args: []string{"metrics"}, code: 1, stderr: "metrics are not enabled"},
		{name: "version", args: []string{"--version"}, stdout: "nexctl version dev"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := runBin(t, bin, tt.env, tt.stdin, tt.args...)
			if r.code != tt.code || !strings.Contains(r.out, tt.stdout) || !strings.Contains(r.err, tt.stderr) || (tt.noStdout && r.out != "") {
				t.Fatalf("nexctl %v: exit %d, stdout %q, stderr %q; want exit %d, stdout ~%q, stderr ~%q",
					tt.args, r.code, r.out, r.err, tt.code, tt.stdout, tt.stderr)
			}
		})
		if tt.name == "secret set insecure argv" {
			// The control server's handler goroutines may still be finishing the request.
			b.mu.Lock()
			got := maps.Clone(b.secrets)
			b.mu.Unlock()
			if empty, ok := got["default/EMPTY"]; got["default/PW"] != "hunter2" || got["default/PW2"] != "s2" || got["default/PW3"] != "v3" || !ok || empty != "" {
				for k, v := range got {
					if len(v) > 20 {
						got[k] = fmt.Sprintf("%s... (%d bytes)", v[:20], len(v))
					}
				}
				t.Fatalf("secrets from stdin, stdin without '-' and --insecure-argv stored as %q (the refused empty and oversize values must leave PW as it was)", got)
			}
			if _, ok := got["default/ARGV"]; ok {
				t.Fatalf("a refused value in the command line was stored")
			}
		}
	}

	// A rejected reload exits 1 and lists every error on stderr.
	b.mu.Lock()
	b.reload = control.ReloadResult{OK: false, Errors: []string{"nexus: changes need a restart", "tags: key nex.x is reserved"}}
	b.mu.Unlock()
	r := runBin(t, bin, env, "", "reload")
	if r.code != 1 || !strings.Contains(r.err, "nexus: changes need a restart") || !strings.Contains(r.err, "tags: key nex.x is reserved") {
		t.Fatalf("rejected reload: exit %d, stderr %q", r.code, r.err)
	}
	r = runBin(t, bin, env, "", "--json", "reload")
	var res control.ReloadResult
	if r.code != 1 || json.Unmarshal([]byte(r.out), &res) != nil || res.OK || len(res.Errors) != 2 {
		t.Fatalf("rejected reload --json: exit %d, stdout %q", r.code, r.out)
	}
}

func TestGenDocs(t *testing.T) {
	dir := t.TempDir()
	root := NewRootCommand(IO{Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}, Env: func(string) string { return "" }})
	t.Setenv("SOURCE_DATE_EPOCH", "1798761600")
	if err := GenDocs(root, filepath.Join(dir, "man"), filepath.Join(dir, "completions")); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{"man/nexctl.1", "man/nexctl-workload-run.1", "man/nexctl-node-lameduck.1", "completions/nexctl.bash", "completions/_nexctl", "completions/nexctl.fish"} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil || len(data) == 0 {
			t.Errorf("%s: %v (%d bytes)", f, err, len(data))
		}
	}
	man, _ := os.ReadFile(filepath.Join(dir, "man", "nexctl-workload-run.1"))
	if !strings.Contains(string(man), "--plain-env") || !strings.Contains(string(man), "Jan 2027") {
		t.Errorf("workload run man page lacks its flags or the fixed date:\n%s", man)
	}
	// The checked-in outputs must match the command tree: every generated file, and no
	// page of a command that is gone.
	for _, sub := range []string{"man", "completions"} {
		entries, err := os.ReadDir(filepath.Join(dir, sub))
		if err != nil {
			t.Fatal(err)
		}
		generated := map[string]bool{}
		for _, e := range entries {
			generated[e.Name()] = true
			got, _ := os.ReadFile(filepath.Join(dir, sub, e.Name()))
			want, err := os.ReadFile(filepath.Join("..", "..", "contrib", sub, e.Name()))
			if err != nil || !bytes.Equal(got, want) {
				t.Errorf("contrib/%s/%s is missing or stale: regenerate with SOURCE_DATE_EPOCH=1798761600 go run ./internal/cli/gen", sub, e.Name())
			}
		}
		checkedIn, _ := os.ReadDir(filepath.Join("..", "..", "contrib", sub))
		for _, e := range checkedIn {
			if !generated[e.Name()] && e.Name() != "nexd.8" { // nexd(8) is written by hand
				t.Errorf("contrib/%s/%s belongs to no command: remove it", sub, e.Name())
			}
		}
	}
	// Every command a user can type has its page.
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		if c.Hidden || c.Name() == "help" {
			return
		}
		page := strings.ReplaceAll(c.CommandPath(), " ", "-") + ".1"
		if !hasManPage(dir, page) {
			t.Errorf("no man page %s for %q", page, c.CommandPath())
		}
		// The completion scripts ask the binary (__complete): every subcommand is offered.
		if c.HasAvailableSubCommands() {
			args := append(strings.Fields(c.CommandPath())[1:], "")
			out, _, _ := runCLI(t, nil, append([]string{"__complete"}, args...)...)
			for _, sub := range c.Commands() {
				if sub.IsAvailableCommand() && !strings.Contains(out, "\n"+sub.Name()+"\t") && !strings.HasPrefix(out, sub.Name()+"\t") {
					t.Errorf("completion of %q does not offer %q:\n%s", c.CommandPath(), sub.Name(), out)
				}
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
}

func hasManPage(dir, page string) bool {
	_, err := os.Stat(filepath.Join(dir, "man", page))
	return err == nil
}

func (b *localBackend) Reexec(context.Context) error { return nil }

func (b *localBackend) NATSAccess(context.Context, time.Duration) (control.NATSAccess, error) {
	return control.NATSAccess{}, control.ErrNotFound
}

// publicNexctl copies nexctl into a new directory that every uid may enter (outside
// the test's 0700 temp dirs) and serves a control socket there: the binary and socket
// for tests that run nexctl as another uid.
func publicNexctl(t *testing.T, prefix string) (bin, sock string) {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bin = filepath.Join(dir, "nexctl")
	data, err := os.ReadFile(buildNexctl(t))
	if err != nil {
		t.Fatal(err)
	}
	testkit.WriteFile(t, bin, string(data))
	for _, p := range []string{dir, bin} {
		if err := os.Chmod(p, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	sock = filepath.Join(dir, "nexd.sock")
	serveControl(t, sock, &localBackend{secrets: map[string]string{}})
	return bin, sock
}

// TestBinarySocketPermissionDenied: nexctl run by a user who may not open the control
// socket (uid 65534, not in group nex, a 0600 root socket) says so and what to do, exit
// 1, rather than "cannot reach nexd", which would send the operator looking for a
// stopped daemon. Needs root (a real second uid).
func TestBinarySocketPermissionDenied(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs nexctl as uid 65534")
	}
	// The binary and the socket's directory reachable by uid 65534; the socket not.
	bin, sock := publicNexctl(t, "nexctl-perm-")
	if err := os.Chmod(sock, 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "status", "--control-socket", sock)
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=/"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 || out.Len() != 0 ||
		!strings.Contains(errb.String(), "permission denied on "+sock+": run as root or as a member of group nex") {
		t.Fatalf("nexctl status as uid 65534 on a 0600 root socket: %v, stdout %q, stderr %q", err, out.String(), errb.String())
	}
}

// TestBinaryFleetCommandNotAdmin: a fleet command with no NATS settings, by a user the
// local node does not lend its NATS to (uid 65534: neither root nor in group nex), whether
// the socket refuses the connection (0600) or the node refuses the request (0666, the
// default control_allow_others = status), fails saying why it had nothing but the default
// URL without credentials and what to do. Before, it said only `nats: Authorization
// Violation` (the README's first node) or that no server answered.
func TestBinaryFleetCommandNotAdmin(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs nexctl as uid 65534")
	}
	t.Parallel()
	bin, sock := publicNexctl(t, "nexctl-notadmin-")
	for _, tc := range []struct {
		mode   os.FileMode
		denied string
	}{
		{0o666, "permission denied: uid 65534 is neither root nor a member of group nex"},
		{0o600, "permission denied on " + sock},
	} {
		if err := os.Chmod(sock, tc.mode); err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(bin, "node", "list", "--control-socket", sock, "--nats.timeout", "300ms")
		cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=/"}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if err == nil {
			t.Skipf("a NATS server on %s admitted a user without credentials", defaultNATSURL)
		}
		var ee *exec.ExitError
		msg := errb.String()
		if !errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(msg, "connect to NATS") ||
			!strings.Contains(msg, "lends a credential only to root and members of group nex") ||
			!strings.Contains(msg, tc.denied) || !strings.Contains(msg, "--nats.creds-file") {
			t.Errorf("nexctl node list as uid 65534, socket %#o: %v, stderr %q", tc.mode, err, msg)
		}
	}
}
