package cli

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
)

func TestResolvePrecedence(t *testing.T) {
	dir := t.TempDir()
	write := func(name, body string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	sys := write("system.json", `{"namespace": "sysns", "nats": {"servers": ["nats://sys:4222"], "creds_file": "/sys.creds"}}`)
	user := write("user.json", `{"namespace": "userns", "nats": {"context": "userctx"}}`)
	explicit := write("explicit.json", `{"nats": {"servers": "nats://explicit:4222"}}`)
	nested := write("nested.json", `{"namespace": "lab", "node": {"up": {"node_name": "n1"}}, "nats": {"context": "nex-prod", "timeout": "7s"}, "logger": {"level": "info"}}`)
	broken := write("broken.json", `{"nats": {"servers": 5}}`)
	nodeOnly := write("nodeonly.json", `{"nats": {"servers": "nats://x:1"}, "node_seed": "not-a-seed"}`)

	type want struct {
		ns, nsFrom, servers, serversFrom, ctx, ctxFrom, creds string
		local                                                 bool
		err                                                   string
	}
	cases := []struct {
		name     string
		load     config.LoadOptions
		env      map[string]string
		args     []string
		selected string
		want     want
	}{
		{name: "nothing: local node", want: want{ns: "system", nsFrom: "default", local: true}},
		{name: "nothing but a selected context", selected: "dev",
			want: want{ns: "system", nsFrom: "default", ctx: "dev", ctxFrom: "nats context select"}},
		{name: "system file", load: config.LoadOptions{SystemFile: sys}, selected: "dev",
			want: want{ns: "sysns", nsFrom: sys, servers: "nats://sys:4222", serversFrom: sys, creds: "/sys.creds"}},
		{name: "user file context beats system servers", load: config.LoadOptions{SystemFile: sys, UserFile: user},
			want: want{ns: "userns", nsFrom: user, ctx: "userctx", ctxFrom: user, creds: "/sys.creds"}},
		{name: "--config beats the user file", load: config.LoadOptions{SystemFile: sys, UserFile: user, Args: []string{"--config", explicit}},
			want: want{ns: "userns", nsFrom: user, servers: "nats://explicit:4222", serversFrom: explicit, creds: "/sys.creds"}},
		{name: "upstream nested layout", load: config.LoadOptions{UserFile: nested},
			want: want{ns: "lab", nsFrom: nested, ctx: "nex-prod", ctxFrom: nested}},
		{name: "NATS_URL beats files", load: config.LoadOptions{UserFile: user}, env: map[string]string{"NATS_URL": "nats://envurl:4222", "NATS_CREDS": "/env.creds"},
			want: want{ns: "userns", nsFrom: user, servers: "nats://envurl:4222", serversFrom: "env NATS_URL", creds: "/env.creds"}},
		{name: "NEX_NATS_SERVERS beats NATS_URL", load: config.LoadOptions{Env: []string{"NEX_NATS_SERVERS=nats://nex:4222", "NEX_NAMESPACE=envns"}},
			env:  map[string]string{"NATS_URL": "nats://envurl:4222"},
			want: want{ns: "envns", nsFrom: "env NEX_NAMESPACE", servers: "nats://nex:4222", serversFrom: "env NEX_NATS_SERVERS"}},
		{name: "NATS_CONTEXT", env: map[string]string{"NATS_CONTEXT": "envctx"}, selected: "dev",
			want: want{ns: "system", nsFrom: "default", ctx: "envctx", ctxFrom: "env NATS_CONTEXT"}},
		{name: "flags beat everything", load: config.LoadOptions{SystemFile: sys}, env: map[string]string{"NATS_CONTEXT": "envctx"},
			args: []string{"-s", "nats://flag:4222", "--namespace", "flagns"},
			want: want{ns: "flagns", nsFrom: "flag --namespace", servers: "nats://flag:4222", serversFrom: "flag --nats.servers", creds: "/sys.creds"}},
		{name: "a bad nats value is an error", load: config.LoadOptions{UserFile: broken},
			want: want{ns: "system", nsFrom: "default", local: true, err: "nats.servers"}},
		{name: "node-only problems are not", load: config.LoadOptions{UserFile: nodeOnly},
			want: want{ns: "system", nsFrom: "default", servers: "nats://x:1", serversFrom: nodeOnly}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var nf natsFlags
			fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
			var ns, sock string
			fs.StringVar(&ns, "namespace", "system", "")
			fs.StringVar(&sock, "control-socket", "", "")
			nf.register(fs)
			if err := fs.Parse(tc.args); err != nil {
				t.Fatal(err)
			}
			if tc.load.Env == nil {
				tc.load.Env = []string{}
			}
			tc.load.Hostname = "h"
			r := resolve(resolveInputs{flags: fs, nats: &nf, env: func(k string) string { return tc.env[k] },
				load: tc.load, selected: func() string { return tc.selected }})
			got := want{ns: r.Namespace, nsFrom: r.Origins["namespace"], servers: strings.Join(r.NATS.Servers, ","),
				ctx: r.NATS.Context, creds: r.NATS.CredsFile, local: r.local}
			if got.servers != "" {
				got.serversFrom = r.Origins["nats.servers"]
			}
			if got.ctx != "" {
				got.ctxFrom = r.Origins["nats.context"]
			}
			if r.Err != nil {
				got.err = tc.want.err
				if tc.want.err == "" || !strings.Contains(r.Err.Error(), tc.want.err) {
					t.Errorf("error %v, want one about %q", r.Err, tc.want.err)
				}
			} else if tc.want.err != "" {
				t.Errorf("no error, want one about %q", tc.want.err)
			}
			if got != tc.want {
				t.Errorf("resolved\n got  %+v\n want %+v", got, tc.want)
			}
			if r.NATS.ConnName != "nexctl" {
				t.Errorf("conn name %q", r.NATS.ConnName)
			}
		})
	}
}

func TestCheckRedactsSecrets(t *testing.T) {
	var nf natsFlags
	fs := pflag.NewFlagSet("t", pflag.ContinueOnError)
	nf.register(fs)
	_ = fs.Parse([]string{"--nats.password", "hunter2", "--nats.seed", "SUASECRETSEED", "-s", "nats://u:pw2@h:4222"})
	r := resolve(resolveInputs{flags: fs, nats: &nf, env: func(string) string { return "" },
		load: config.LoadOptions{Env: []string{"NEX_NATS_JWT=eyJsecret"}, Hostname: "h"}, selected: func() string { return "" }})
	var b strings.Builder
	r.render(&b)
	for _, s := range []string{"hunter2", "SUASECRETSEED", "pw2", "eyJsecret"} {
		if strings.Contains(b.String(), s) {
			t.Errorf("--check shows %q:\n%s", s, b.String())
		}
	}
	if !strings.Contains(b.String(), "env NEX_NATS_JWT") {
		t.Errorf("origin of nats.jwt missing:\n%s", b.String())
	}
}

// slowNATSBackend is a node that says where its NATS is only after a delay.
type slowNATSBackend struct {
	*localBackend
	delay time.Duration
	url   string
}

func (b slowNATSBackend) NATSAccess(ctx context.Context, _ time.Duration) (control.NATSAccess, error) {
	select {
	case <-time.After(b.delay):
	case <-ctx.Done():
		return control.NATSAccess{}, ctx.Err()
	}
	return control.NATSAccess{Servers: []string{b.url}}, nil
}

// TestLocalNodeSlowToAnswerIsWaitedFor: with no NATS configured, nexctl takes the local
// node's NATS even when the node takes 3 s to say where it is (a loaded node amid
// reloads). Before, nexctl gave up after 2 s and used nats://127.0.0.1:4222, where no
// server ran (e2e TestReloadDuringDeploysAndStops at load ~30).
func TestLocalNodeSlowToAnswerIsWaitedFor(t *testing.T) {
	t.Parallel()
	const url = "nats://127.0.0.1:14999"
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	serveControl(t, sock, slowNATSBackend{&localBackend{secrets: map[string]string{}}, 3 * time.Second, url})
	xdg := t.TempDir()
	env := func(k string) string {
		if k == "XDG_CONFIG_HOME" {
			return xdg
		}
		return ""
	}
	var out, errb bytes.Buffer
	code := Main(context.Background(), []string{"--control-socket", sock, "--check"}, IO{Stdout: &out, Stderr: &errb, Env: env})
	if code != 0 || !strings.Contains(out.String(), url) || !strings.Contains(out.String(), originLocalNode) {
		t.Fatalf("nexctl --check with a node 3 s slow to answer: exit %d, want %s from the %s\n%s%s", code, url, originLocalNode, out.String(), errb.String())
	}
}
