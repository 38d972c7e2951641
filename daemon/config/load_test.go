package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"
	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/internal/testkit"
)

var update = flag.Bool("update", false, "rewrite testdata/check.golden and KEYS.md")

// testKey makes a deterministic nkey pair of the given kind (seed, public key), so
// golden output is stable.
func testKey(t testing.TB, p nkeys.PrefixByte, fill byte) (string, string) {
	t.Helper()
	raw := bytes.Repeat([]byte{fill}, 32)
	kp, err := nkeys.FromRawSeed(p, raw)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return string(seed), pub
}

func checkInats(path string) error {
	_, err := server.ProcessConfigFile(path)
	return err
}

// hermetic returns options that read nothing from the machine.
func hermetic(args ...string) LoadOptions {
	return LoadOptions{Args: args, Env: []string{}, Hostname: "test-host", CheckInats: checkInats}
}

func mustLoad(t *testing.T, o LoadOptions) *Loaded {
	t.Helper()
	l, err := Load(o)
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	return l
}

func errLines(err error) []string {
	var errs Errors
	if !errors.As(err, &errs) {
		if err == nil {
			return nil
		}
		return []string{"NOT Errors: " + err.Error()}
	}
	out := make([]string, len(errs))
	for i, e := range errs {
		out[i] = e.Error()
	}
	return out
}

func TestDefaults(t *testing.T) {
	l := mustLoad(t, hermetic())
	c := l.Config
	want := &Config{
		Namespace: "system",
		Node: NodeConfig{
			Name: "test-host", Nexus: "nexus", Tags: map[string]string{}, AgentRestartLimit: 3,
			NativeLimits:     Limits{MemoryMax: 1 << 30, PidsMax: 4096},
			WorkloadDefaults: Limits{MemoryMax: 512 << 20, PidsMax: 1024}, ArtifactMaxSize: 256 << 20,
			AuctionTTL: 10 * time.Second, ControlSocket: "/run/nex/nexd.sock", CgroupDriver: "cgroupfs", StopGrace: 10 * time.Second,
			StartupTimeout: 15 * time.Second, DeployTimeout: 5 * time.Minute, ControlAllowOthers: "status",
			WorkloadCredsTTL: time.Hour, NexletCredsTTL: time.Hour, EmbeddedNATSPort: 4222, LogStreamMaxAge: 24 * time.Hour, LogStreamMaxBytes: 256 << 20,
			WorkloadUIDRange: "61184-65519",
		},
		NATS:   NATSConfig{ConnName: "nexd", Timeout: 5 * time.Second},
		Logger: LoggerConfig{Level: "info", Format: "text", File: "nexd.log"},
	}
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("defaults:\n got %+v\nwant %+v", c, want)
	}
	for _, s := range newRegistry().specs {
		if l.Origins[s.key] != "default" && s.def != nil {
			t.Errorf("origin of %s = %q", s.key, l.Origins[s.key])
		}
	}

	// systemd's directories feed the defaults, and say so.
	l = mustLoad(t, LoadOptions{Env: []string{"STATE_DIRECTORY=/var/lib/nex:/other", "RUNTIME_DIRECTORY=/run/nex"}, Hostname: "h"})
	if l.Config.Node.StateDir != "/var/lib/nex" || l.Origins["state_dir"] != "env STATE_DIRECTORY" {
		t.Errorf("state_dir = %q from %q", l.Config.Node.StateDir, l.Origins["state_dir"])
	}
	if l.Config.Node.ControlSocket != "/run/nex/nexd.sock" || l.Origins["control_socket"] != "env RUNTIME_DIRECTORY" {
		t.Errorf("control_socket = %q from %q", l.Config.Node.ControlSocket, l.Origins["control_socket"])
	}
	if l.Config.Logger.File != "/var/lib/nex/nexd.log" {
		t.Errorf("logger.file = %q", l.Config.Logger.File)
	}
}

// TestPrecedence sets the same keys in the first n of the seven layers and checks the
// highest one wins, for every n.
func TestPrecedence(t *testing.T) {
	type layerDef struct {
		origin string
		apply  func(o *LoadOptions, dir, v string)
	}
	fileLayer := func(which string) func(o *LoadOptions, dir, v string) {
		return func(o *LoadOptions, dir, v string) {
			// Alternate the layouts so both are exercised at every level.
			body := fmt.Sprintf(`{"node_name": %q, "nats": {"servers": [%q]}, "logger.level": "debug", "tags": {%q: "x"}}`, v, "nats://"+v, v)
			if which == "user" || which == "config" {
				body = fmt.Sprintf(`{"node": {"up": {"node_name": %q, "tags": {%q: "x"}}}, "nats.servers": [%q], "logger": {"level": "debug"}}`, v, v, "nats://"+v)
			}
			p := testkit.WriteFile(t, filepath.Join(dir, which+".json"), body)
			switch which {
			case "system":
				o.SystemFile = p
			case "user":
				o.UserFile = p
			case "local":
				o.LocalFile = p
			case "config":
				o.Args = append(o.Args, "--config", p)
			}
		}
	}
	layers := []layerDef{
		{"system", fileLayer("system")},
		{"user", fileLayer("user")},
		{"local", fileLayer("local")},
		{"config", fileLayer("config")},
		{"env NEX_NODE_NAME", func(o *LoadOptions, _ string, v string) {
			o.Env = append(o.Env, "NEX_NODE_NAME="+v, "NEX_NATS_SERVERS=nats://"+v, "NEX_LOGGER_LEVEL=debug", "NEX_TAGS="+v+"=x")
		}},
		{"flag --node-name", func(o *LoadOptions, _ string, v string) {
			o.Args = append(o.Args, "--node-name", v, "-s", "nats://"+v, "--logger.level=debug", "--tags", v+"=x")
		}},
	}
	for n := 0; n <= len(layers); n++ {
		t.Run(fmt.Sprintf("layers=%d", n), func(t *testing.T) {
			dir := t.TempDir()
			o := hermetic()
			for i := 0; i < n; i++ {
				layers[i].apply(&o, dir, fmt.Sprintf("v%d", i+1))
			}
			l := mustLoad(t, o)
			c := l.Config
			if n == 0 {
				if c.Node.Name != "test-host" || l.Origins["node_name"] != "default" || len(c.NATS.Servers) != 0 || c.Logger.Level != "info" {
					t.Fatalf("defaults not used: %+v", c)
				}
				return
			}
			v := fmt.Sprintf("v%d", n)
			if c.Node.Name != v {
				t.Errorf("node_name = %q, want %q", c.Node.Name, v)
			}
			if !slices.Equal(c.NATS.Servers, []string{"nats://" + v}) {
				t.Errorf("nats.servers = %q", c.NATS.Servers)
			}
			// A map from a higher layer replaces the lower one whole.
			if !reflect.DeepEqual(c.Node.Tags, map[string]string{v: "x"}) {
				t.Errorf("tags = %v", c.Node.Tags)
			}
			if c.Logger.Level != "debug" {
				t.Errorf("logger.level = %q", c.Logger.Level)
			}
			origin := layers[n-1].origin
			if n <= 4 {
				origin = filepath.Join(dir, origin+".json")
			}
			if l.Origins["node_name"] != origin {
				t.Errorf("origin = %q, want %q", l.Origins["node_name"], origin)
			}
			if n <= 4 && len(l.Files) != n {
				t.Errorf("files = %v", l.Files)
			}
		})
	}
}

func TestLayouts(t *testing.T) {
	nested := `{
	  "namespace": "prod",
	  "node": {"up": {
	    "node_name": "n1", "nexus": "east", "tags": {"region": "lab"}, "agent_restart_limit": 5,
	    "allow_remote_agent_registration": true, "state": "kv", "events": "nats",
	    "native_limits": {"memory_max": "512M", "cpu_max": 1.5},
	    "agents": [{"uri": "file:///opt/a", "argv": ["run"], "env": {"A": "1"}, "limits": {"memory_max": 268435456, "pids_max": 10}}]
	  }},
	  "nats": {"servers": ["nats://a:4222", "nats://b:4222"], "timeout": "2s", "tlsfirst": true},
	  "logger": {"level": "warn", "target": ["std", "file"], "with_pid": true}
	}`
	flat := `{
	  "namespace": "prod", "node_name": "n1", "nexus": "east", "tags": {"region": "lab"}, "agent_restart_limit": 5,
	  "allow_remote_agent_registration": true, "state": "kv", "events": "nats",
	  "native_limits.memory_max": "512M", "native_limits": {"cpu_max": 1.5},
	  "agents": [{"uri": "file:///opt/a", "argv": ["run"], "env": {"A": "1"}, "limits": {"memory_max": "256M", "pids_max": 10}}],
	  "nats.servers": "nats://a:4222,nats://b:4222", "nats.timeout": "2s", "nats": {"tlsfirst": true},
	  "logger.level": "warn", "logger.target": ["std", "file"], "logger": {"with_pid": true}
	}`
	var got []*Config
	for _, body := range []string{nested, flat} {
		o := hermetic()
		o.SystemFile = testkit.WriteFile(t, filepath.Join(t.TempDir(), "c.json"), body)
		got = append(got, mustLoad(t, o).Config)
	}
	if !reflect.DeepEqual(got[0], got[1]) {
		t.Fatalf("layouts differ:\nnested %+v\nflat   %+v", got[0], got[1])
	}
	c := got[0]
	if c.Namespace != "prod" || c.Node.Nexus != "east" || c.Node.AgentRestartLimit != 5 || !c.Node.AllowRemoteAgentRegistration ||
		c.NATS.Timeout != 2*time.Second || !c.NATS.TLSFirst || c.Logger.Level != "warn" || !c.Logger.WithPID ||
		c.Node.NativeLimits.MemoryMax != 512<<20 || c.Node.NativeLimits.CPUMax != 1.5 || c.Node.NativeLimits.PidsMax != 4096 {
		t.Errorf("values: %+v", c)
	}
	wantAgents := []Agent{{URI: "file:///opt/a", Argv: []string{"run"}, Env: map[string]string{"A": "1"}, Limits: Limits{MemoryMax: 256 << 20, PidsMax: 10}}}
	if !reflect.DeepEqual(c.Node.Agents, wantAgents) {
		t.Errorf("agents = %+v", c.Node.Agents)
	}
}

func TestSeedSampleLoads(t *testing.T) {
	// The sample from the user documentation, with real keys in place of the elisions.
	_, rootPub := testKey(t, nkeys.PrefixByteAccount, 1)
	skSeed, _ := testKey(t, nkeys.PrefixByteAccount, 2)
	nodeSeed, _ := testKey(t, nkeys.PrefixByteServer, 3)
	xSeed, _ := testKey(t, nkeys.PrefixByteCurve, 4)
	dir := t.TempDir()
	inats := testkit.WriteFile(t, filepath.Join(dir, "server.conf"), "listen: 127.0.0.1:-1\njetstream: enabled\n")
	body := fmt.Sprintf(`{
  "namespace": "system",
  "node": {"up": {
      "node_seed": %q, "node_xkey_seed": %q, "node_name": "prod-node-1", "nexus": "regional-cluster",
      "allow_remote_agent_registration": true, "agent_restart_limit": 5, "state": "kv",
      "tags": {"region": "lab", "arch": "amd64"},
      "agents": [
        {"uri": "file:///opt/nex/agents/native", "argv": ["run"]},
        {"uri": "file:///opt/nex/agents/custom", "argv": ["run"], "env": {"NEX_RUNTIME_SOCKET": "/run/custom.sock"}}
      ],
      "issuer_signing_key": %q, "issuer_signing_key_root_account": %q,
      "inats_config": %q
  }},
  "nats": {"context": "nex-prod", "timeout": "5s"},
  "logger": {"level": "info", "target": ["std"]}
}`, nodeSeed, xSeed, skSeed, rootPub, inats)
	o := hermetic()
	o.SystemFile = testkit.WriteFile(t, filepath.Join(dir, "config.json"), body)
	l := mustLoad(t, o)
	if len(l.Config.Node.Agents) != 2 || l.Config.Node.IssuerSigningKeyRootAccount != rootPub || l.Config.NATS.Context != "nex-prod" {
		t.Fatalf("%+v", l.Config)
	}
}

func TestShippedConfig(t *testing.T) {
	o := hermetic()
	o.SystemFile = filepath.Join("..", "..", "etc", "nex", "config.json")
	l := mustLoad(t, o)
	c := l.Config
	if c.Namespace != "system" || c.Node.Nexus != "nexus" || c.Node.State != "kv" || c.Logger.Level != "info" || c.NATS.Configured() {
		t.Fatalf("shipped config: %+v", c)
	}
	if len(l.Files) != 1 || l.Origins["state"] != o.SystemFile {
		t.Fatalf("files %v, origin %q", l.Files, l.Origins["state"])
	}
}

func TestDefaultLoadOptions(t *testing.T) {
	o := DefaultLoadOptions([]string{"--check"})
	if o.SystemFile != "/etc/nex/config.json" || !filepath.IsAbs(o.LocalFile) || filepath.Base(o.LocalFile) != "config.json" ||
		!strings.HasSuffix(o.UserFile, filepath.Join("nex", "config.json")) || len(o.Env) == 0 || o.Args[0] != "--check" {
		t.Errorf("%+v", o)
	}
}

func TestMissingAndUnreadableFiles(t *testing.T) {
	dir := t.TempDir()
	o := hermetic()
	o.SystemFile = filepath.Join(dir, "absent.json")
	o.UserFile = testkit.WriteFile(t, filepath.Join(dir, "empty.json"), "  \n")
	l := mustLoad(t, o)
	if !slices.Equal(l.Files, []string{o.UserFile}) {
		t.Errorf("files = %v", l.Files)
	}
	// An explicit --config must exist.
	o.Args = []string{"--config", filepath.Join(dir, "nope.json")}
	_, err := Load(o)
	want := filepath.Join(dir, "nope.json") + ": cannot read config file: no such file or directory"
	if got := errLines(err); !slices.Equal(got, []string{want}) {
		t.Errorf("errors = %q, want %q", got, want)
	}
}

func TestAgentsFlags(t *testing.T) {
	l := mustLoad(t, hermetic(
		"--agents.uri", "file:///a", "--agents.argv", "run", "--agents.argv", "--fast",
		"--agents.env", "A=1", "--agents.env", "B=x=y",
		"--agents.uri=/usr/bin/b", "--agents.limits", "memory_max=256M,cpu_max=0.5", "--agents.limits", "pids-max=20",
		"--agents.uri", "nats://bucket/obj:v1",
	))
	want := []Agent{
		{URI: "file:///a", Argv: []string{"run", "--fast"}, Env: map[string]string{"A": "1", "B": "x=y"}},
		{URI: "/usr/bin/b", Limits: Limits{MemoryMax: 256 << 20, CPUMax: 0.5, PidsMax: 20}},
		{URI: "nats://bucket/obj:v1"},
	}
	if !reflect.DeepEqual(l.Config.Node.Agents, want) {
		t.Fatalf("agents = %+v", l.Config.Node.Agents)
	}
	if l.Origins["agents"] != "flag --agents.uri" {
		t.Errorf("origin %q", l.Origins["agents"])
	}
	// Flags replace the agents of files whole; NEX_AGENTS takes a JSON array.
	o := hermetic("--agents.uri", "/x")
	o.SystemFile = testkit.WriteFile(t, filepath.Join(t.TempDir(), "c.json"), `{"agents": [{"uri": "/file"}, {"uri": "/file2"}]}`)
	o.Env = []string{`NEX_AGENTS=[{"uri": "/env"}]`}
	if got := mustLoad(t, o).Config.Node.Agents; len(got) != 1 || got[0].URI != "/x" {
		t.Errorf("agents = %+v", got)
	}
	o.Args = nil
	if got := mustLoad(t, o).Config.Node.Agents; len(got) != 1 || got[0].URI != "/env" {
		t.Errorf("agents = %+v", got)
	}
}

func TestFlagsMisc(t *testing.T) {
	l := mustLoad(t, hermetic("node", "up", "--tags", "a=1,b=2", "--tags", "c=3", "-s", "nats://a", "--nats.servers", "nats://b,nats://c",
		"--logger.target", "std", "--logger.target=file", "--allow-remote-agent-registration", "--nats.tlsfirst=false",
		"--check", "-l", "debug", "--stop-grace", "1m", "--native-limits.memory-max", "2G"))
	c := l.Config
	if !reflect.DeepEqual(c.Node.Tags, map[string]string{"a": "1", "b": "2", "c": "3"}) ||
		!slices.Equal(c.NATS.Servers, []string{"nats://a", "nats://b", "nats://c"}) ||
		!slices.Equal(c.Logger.Target, []string{"std", "file"}) || !c.Node.AllowRemoteAgentRegistration || c.NATS.TLSFirst ||
		c.Logger.Level != "debug" || c.Node.StopGrace != time.Minute || c.Node.NativeLimits.MemoryMax != 2<<30 {
		t.Fatalf("%+v", c)
	}
	if !l.Check || l.Help || !slices.Equal(l.Args, []string{"node", "up"}) {
		t.Errorf("check %v help %v args %q", l.Check, l.Help, l.Args)
	}
	// --help and --version work even when the config is broken.
	o := hermetic("--help")
	o.SystemFile = testkit.WriteFile(t, filepath.Join(t.TempDir(), "c.json"), `{"bogus": 1}`)
	l, err := Load(o)
	if err != nil || !l.Help {
		t.Fatalf("--help: %v %+v", err, l)
	}
	o.Args = []string{"--version"}
	if l, err := Load(o); err != nil || !l.Version {
		t.Fatalf("--version: %v", err)
	}
}

// TestErrors asserts the exact message of every kind of error.
func TestErrors(t *testing.T) {
	userSeed, userPub := testKey(t, nkeys.PrefixByteUser, 5)
	otherSeed, _ := testKey(t, nkeys.PrefixByteUser, 6)
	acctSeed, acctPub := testKey(t, nkeys.PrefixByteAccount, 7)
	serverSeed, serverPub := testKey(t, nkeys.PrefixByteServer, 8)
	curveSeed, _ := testKey(t, nkeys.PrefixByteCurve, 9)

	dir := t.TempDir()
	badInats := testkit.WriteFile(t, filepath.Join(dir, "bad.conf"), "listen: 127.0.0.1:4222\nport: [\n")
	_, inatsErr := server.ProcessConfigFile(badInats)
	if inatsErr == nil {
		t.Fatal("nats-server accepted the broken config")
	}

	const F = "FILE" // replaced by the file's path
	cases := []struct {
		name string
		file string   // system file body ("" = none)
		env  []string // extra environment
		args []string
		want []string
	}{
		{name: "unknown key flat", file: `{"node_nmae": "x"}`,
			want: []string{`FILE: node_nmae: unknown key "node_nmae" (did you mean "node_name"?)`}},
		{name: "unknown key nested", file: `{"node": {"up": {"nexsu": "x"}}}`,
			want: []string{`FILE: node.up.nexsu: unknown key "nexsu" (did you mean "nexus"?)`}},
		{name: "unknown key no suggestion", file: `{"zzzzzzzzzz": 1}`,
			want: []string{`FILE: zzzzzzzzzz: unknown key "zzzzzzzzzz"`}},
		{name: "unknown nats key", file: `{"nats": {"sevrers": ["x"]}}`,
			want: []string{`FILE: nats.sevrers: unknown key "sevrers" (did you mean "servers"?)`}},
		{name: "node key outside up", file: `{"node": {"node_name": "x"}}`,
			want: []string{`FILE: node.node_name: unknown key "node_name": node settings go under "node": {"up": {...}} or at the top level`}},
		{name: "global key under node.up", file: `{"node": {"up": {"namespace": "x"}}}`,
			want: []string{`FILE: node.up.namespace: "namespace" is not a node setting: put it at the top level of the file`}},
		{name: "group key at the top level", file: `{"servers": ["nats://a"]}`,
			want: []string{`FILE: servers: unknown key "servers" (did you mean "nats.servers"?)`}},
		{name: "unknown agent key", file: `{"agents": [{"uri": "/a", "agrv": ["x"]}]}`,
			want: []string{`FILE: agents[0].agrv: unknown key "agrv" (did you mean "argv"?)`}},
		{name: "tags as string", file: `{"node": {"up": {"tags": "a=b"}}}`,
			want: []string{`FILE: node.up.tags: expected an object of string values such as {"k": "v"}, got a string`}},
		{name: "tag value not a string", file: `{"tags": {"rack": 5}}`,
			want: []string{`FILE: tags.rack: expected a string, got a number`}},
		{name: "wrong type bool", file: `{"allow_remote_agent_registration": "yes"}`,
			want: []string{`FILE: allow_remote_agent_registration: expected true or false, got a string`}},
		{name: "wrong type int", file: `{"agent_restart_limit": 2.5}`,
			want: []string{`FILE: agent_restart_limit: expected a whole number, got 2.5`}},
		{name: "group not an object", file: `{"nats": ["x"]}`,
			want: []string{`FILE: nats: expected an object of nats settings, got an array`}},
		{name: "bad duration", file: `{"nats": {"timeout": "5 sec"}}`,
			want: []string{`FILE: nats.timeout: invalid duration "5 sec": expected a Go duration such as "5s" or "1m30s"`}},
		{name: "duration as number", file: `{"auction_ttl": 10}`,
			want: []string{`FILE: auction_ttl: expected a duration string such as "5s" or "1m30s", got a number`}},
		{name: "zero timeout", file: `{"nats.timeout": "0s"}`,
			want: []string{`FILE: nats.timeout: must be more than 0`}},
		{name: "workload creds ttl too short", args: []string{"--workload-creds-ttl", "500ms"},
			want: []string{`flag --workload-creds-ttl: workload_creds_ttl: must be 1s or more, got 500ms`}},
		{name: "nexlet creds ttl too short", args: []string{"--nexlet-creds-ttl", "10ms"},
			want: []string{`flag --nexlet-creds-ttl: nexlet_creds_ttl: must be 1s or more, got 10ms`}},
		{name: "workload creds ttl negative", env: []string{"NEX_WORKLOAD_CREDS_TTL=-1h"},
			want: []string{`env NEX_WORKLOAD_CREDS_TTL: workload_creds_ttl: must be 1s or more, got -1h0m0s`}},
		{name: "bad state", file: `{"node": {"up": {"state": "redis"}}}`,
			want: []string{`FILE: node.up.state: invalid value "redis": expected one of "", "kv"`}},
		{name: "bad events", file: `{"events": "kafka"}`,
			want: []string{`FILE: events: invalid value "kafka": expected one of "", "nats", "logs"`}},
		{name: "bad logger", file: `{"logger": {"level": "trace", "target": ["std", "syslog", "std"], "format": "xml"}}`,
			want: []string{
				`FILE: logger.level: invalid value "trace": expected one of "debug", "info", "warn", "error"`,
				`FILE: logger.format: invalid value "xml": expected one of "text", "json"`,
				`FILE: logger.target[1]: invalid value "syslog": expected one of std, file, journal, nats`,
				`FILE: logger.target[2]: "std" is listed twice`,
			}},
		{name: "bad control_allow_others", args: []string{"--control-allow-others", "all"},
			want: []string{`flag --control-allow-others: control_allow_others: invalid value "all": expected one of "status", "none"`}},
		{name: "node seed of the wrong kind", file: fmt.Sprintf(`{"node": {"up": {"node_seed": %q}}}`, userSeed),
			want: []string{`FILE: node.up.node_seed: expected a server seed (SN…), got a user seed (SU…)`}},
		{name: "node seed public key", args: []string{"--insecure-argv", "--node-seed", serverPub},
			want: []string{`flag --node-seed: node_seed: expected a server seed (SN…), got a public server key (N…)`}},
		{name: "node seed garbage", env: []string{"NEX_NODE_SEED=SNhunter2"},
			want: []string{`env NEX_NODE_SEED: node_seed: expected a server seed (SN…), got a value that is not a valid nkey`}},
		{name: "xkey seed of the wrong kind", file: fmt.Sprintf(`{"node_xkey_seed": %q}`, serverSeed),
			want: []string{`FILE: node_xkey_seed: expected a curve seed (SX…), got a server seed (SN…)`}},
		{name: "signing key of the wrong kind", file: fmt.Sprintf(`{"issuer_signing_key": %q, "issuer_signing_key_root_account": %q}`, userSeed, acctPub),
			want: []string{`FILE: issuer_signing_key: expected an account seed (SA…), got a user seed (SU…)`}},
		{name: "root account of the wrong kind", file: fmt.Sprintf(`{"issuer_signing_key": %q, "issuer_signing_key_root_account": %q}`, acctSeed, userPub),
			want: []string{`FILE: issuer_signing_key_root_account: expected a public account key (A…), got a public user key (U…)`}},
		{name: "issuer nkey of the wrong kind", file: fmt.Sprintf(`{"issuer_nkey": %q, "issuer_nkey_seed": %q}`, acctPub, userSeed),
			want: []string{`FILE: issuer_nkey: expected a public user key (U…), got a public account key (A…)`}},
		{name: "issuer nkey seed of the wrong kind", file: fmt.Sprintf(`{"issuer_nkey": %q, "issuer_nkey_seed": %q}`, userPub, curveSeed),
			want: []string{`FILE: issuer_nkey_seed: expected a user seed (SU…), got a curve seed (SX…)`}},
		{name: "issuer nkey not of its seed", file: fmt.Sprintf(`{"issuer_nkey": %q, "issuer_nkey_seed": %q}`, userPub, otherSeed),
			want: []string{fmt.Sprintf(`FILE: issuer_nkey: does not belong to issuer_nkey_seed (its public key is %s)`, mustPub(t, otherSeed))}},
		{name: "signing key without root account", file: fmt.Sprintf(`{"node": {"up": {"issuer_signing_key": %q}}}`, acctSeed),
			want: []string{`FILE: node.up.issuer_signing_key: needs issuer_signing_key_root_account (the public key A… of the account it signs for)`}},
		{name: "root account without signing key", env: []string{"NEX_ISSUER_SIGNING_KEY_ROOT_ACCOUNT=" + acctPub},
			want: []string{`env NEX_ISSUER_SIGNING_KEY_ROOT_ACCOUNT: issuer_signing_key_root_account: needs issuer_signing_key (the account signing key seed, SA…)`}},
		{name: "nkey without seed", args: []string{"--issuer-nkey", userPub},
			want: []string{`flag --issuer-nkey: issuer_nkey: needs issuer_nkey_seed (the user seed SU… of this key)`}},
		{name: "seed without nkey", file: fmt.Sprintf(`{"issuer_nkey_seed": %q}`, userSeed),
			want: []string{`FILE: issuer_nkey_seed: needs issuer_nkey (the public user key U… of this seed)`}},
		{name: "both issuers", file: fmt.Sprintf(`{"issuer_signing_key": %q, "issuer_signing_key_root_account": %q, "issuer_nkey": %q, "issuer_nkey_seed": %q}`, acctSeed, acctPub, userPub, userSeed),
			want: []string{`FILE: issuer_nkey: give one credential issuer: issuer_signing_key with issuer_signing_key_root_account, or issuer_nkey with issuer_nkey_seed, not both`}},
		{name: "nats auth pairs", file: fmt.Sprintf(`{"nats": {"jwt": "eyJ0", "tlscert": "/c.pem", "nkey": %q}}`, userPub),
			want: []string{
				`FILE: nats.jwt: needs nats.seed (the user seed SU… the JWT was issued to)`,
				`FILE: nats.nkey: needs nats.seed (the user seed SU… of this key)`,
				`FILE: nats.tlscert: needs nats.tlskey`,
			}},
		{name: "nats seed alone", env: []string{"NEX_NATS_SEED=" + userSeed},
			want: []string{`env NEX_NATS_SEED: nats.seed: needs nats.jwt or nats.nkey`}},
		{name: "reserved tag", file: `{"tags": {"nex.lameduck": "true", "ok": "1"}}`,
			want: []string{`FILE: tags.nex.lameduck: tag "nex.lameduck" uses the reserved prefix "nex."`}},
		{name: "reserved tag from flag", args: []string{"--tags", "nex.os=linux"},
			want: []string{`flag --tags: tags.nex.os: tag "nex.os" uses the reserved prefix "nex."`}},
		{name: "bad tag flag", args: []string{"--tags", "justakey"},
			want: []string{`flag --tags: tags: expected key=value, got "justakey"`}},
		{name: "inats config unparsable", file: fmt.Sprintf(`{"inats_config": %q}`, badInats),
			want: []string{fmt.Sprintf(`FILE: inats_config: nats-server cannot use %q: %v`, badInats, inatsErr)}},
		{name: "inats config missing", args: []string{"--inats-config", filepath.Join(dir, "none.conf")},
			want: []string{fmt.Sprintf(`flag --inats-config: inats_config: cannot read nats-server config %q: no such file or directory`, filepath.Join(dir, "none.conf"))}},
		{name: "inats config a directory", args: []string{"--inats-config", dir},
			want: []string{fmt.Sprintf(`flag --inats-config: inats_config: %q is not a regular file`, dir)}},
		{name: "agent without uri", file: `{"node": {"up": {"agents": [{"uri": "/a"}, {"argv": ["x"]}]}}}`,
			want: []string{`FILE: node.up.agents[1].uri: every agent needs a uri (file://PATH, PATH or nats://BUCKET/OBJECT)`}},
		{name: "agents not an array", file: `{"agents": {"uri": "/a"}}`,
			want: []string{`FILE: agents: expected an array of {"uri", "argv", "env", "limits"} objects, got an object`}},
		{name: "negative restart limit", args: []string{"--agent-restart-limit=-1"},
			want: []string{`flag --agent-restart-limit: agent_restart_limit: must be 0 or more, got -1`}},
		{name: "negative limits", file: `{"native_limits": {"memory_max": -1, "cpu_max": -0.5, "pids_max": -3}, "agents": [{"uri": "/a", "limits": {"memory_max": "1G", "memory_high": "2G", "memory_mx": 1}}]}`,
			want: []string{
				`FILE: agents[0].limits.memory_mx: unknown key "memory_mx" (did you mean "memory_max"?)`,
				`FILE: native_limits.memory_max: expected a whole number of bytes >= 0, got -1`,
				`FILE: native_limits.cpu_max: must be a number of CPUs of 0 (no limit) or more, got -0.5`,
				`FILE: native_limits.pids_max: must be 0 (no limit) or more`,
			}},
		{name: "negative native max workloads", env: []string{"NEX_NATIVE_MAX_WORKLOADS=-1"},
			want: []string{`env NEX_NATIVE_MAX_WORKLOADS: native_max_workloads: must be 0 (no bound) or more, got -1`}},
		{name: "native max workloads not a number", file: `{"native_max_workloads": "many"}`,
			want: []string{`FILE: native_max_workloads: expected a whole number, got a string`}},
		{name: "workloads pids below -1", args: []string{"--workloads-pids-max=-2"},
			want: []string{`flag --workloads-pids-max: workloads_pids_max: must be -1 (no limit), 0 (auto) or more`}},
		{name: "workloads pids above the kernel's limit", args: []string{"--workloads-pids-max=4194305"},
			want: []string{`flag --workloads-pids-max: workloads_pids_max: must be at most 4194304 (the kernel's largest pid limit), got 4194305`}},
		{name: "limits from flags", args: []string{"--agents.uri", "/a", "--agents.limits", "memory_max=1G,memory_high=2G"},
			want: []string{`flag --agents.uri: agents[0].limits.memory_high: 2G is above memory_max 1G`}},
		{name: "bad size", env: []string{"NEX_NATIVE_LIMITS_MEMORY_MAX=lots"},
			want: []string{`env NEX_NATIVE_LIMITS_MEMORY_MAX: native_limits.memory_max: invalid size "lots": expected bytes, a number with K, M, G or T, or "max"`}},
		{name: "invalid JSON", file: "{\n  \"namespace\": \"system\",\n}\n",
			want: []string{`FILE: invalid JSON at line 3, column 1 (byte 28): invalid character '}' looking for beginning of object key string`}},
		{name: "truncated JSON", file: `{"namespace": `,
			want: []string{`FILE: invalid JSON at line 1, column 14 (byte 14): unexpected end of JSON input`}},
		{name: "top level array", file: `[1, 2]`,
			want: []string{`FILE: expected a JSON object at the top level, got an array`}},
		{name: "set twice in one file", file: `{"node_name": "a", "node": {"up": {"node_name": "b"}}}`,
			want: []string{`FILE: node_name: node_name is also set as "node.up.node_name" in this file; give it once`}},
		{name: "env bad int", env: []string{"NEX_AGENT_RESTART_LIMIT=abc"},
			want: []string{`env NEX_AGENT_RESTART_LIMIT: agent_restart_limit: expected a whole number, got "abc"`}},
		{name: "env bad bool", env: []string{"NEX_SHOW_WORKLOAD_LOGS=sure"},
			want: []string{`env NEX_SHOW_WORKLOAD_LOGS: show_workload_logs: expected true or false, got "sure"`}},
		{name: "flag bad duration", args: []string{"--auction-ttl", "5x"},
			want: []string{`flag --auction-ttl: auction_ttl: invalid duration "5x": expected a Go duration such as "5s" or "1m30s"`}},
		{name: "flag bad bool", args: []string{"--tlsfirst"},
			want: []string{`command line: unknown flag --tlsfirst (did you mean --nats.tlsfirst?)`}},
		{name: "unknown flag", args: []string{"--node-nmae", "x", "-x"},
			want: []string{`command line: unknown flag --node-nmae (did you mean --node-name?)`, `command line: unknown flag -x`}},
		{name: "flag missing value", args: []string{"--node-name"},
			want: []string{`command line: flag needs an argument: --node-name`}},
		{name: "argv before uri", args: []string{"--agents.argv", "run", "--agents.uri", "/a"},
			want: []string{`flag --agents.argv: agents: --agents.argv "run" comes before any --agents.uri; give --agents.uri first`}},
		{name: "env before uri", args: []string{"--agents.env", "A=1"},
			want: []string{`flag --agents.env: agents: --agents.env "A=1" comes before any --agents.uri; give --agents.uri first`}},
		{name: "namespace with a dot", args: []string{"--namespace", "a.b"},
			want: []string{`flag --namespace: namespace: "a.b" cannot be used in NATS subjects: no dots, wildcards or spaces`}},
		{name: "bad metrics address", args: []string{"--metrics-listen", "9090"},
			want: []string{`flag --metrics-listen: metrics_listen: expected host:port such as 127.0.0.1:9090, got "9090"`}},
		{name: "every error at once", file: fmt.Sprintf(`{"node_nmae": "x", "state": "redis", "node_seed": %q, "nats": {"timeout": "soon"}}`, userSeed),
			env: []string{"NEX_AGENT_RESTART_LIMIT=-2"}, args: []string{"--events", "kafka"},
			want: []string{
				`FILE: nats.timeout: invalid duration "soon": expected a Go duration such as "5s" or "1m30s"`,
				`FILE: node_nmae: unknown key "node_nmae" (did you mean "node_name"?)`,
				`FILE: node_seed: expected a server seed (SN…), got a user seed (SU…)`,
				`env NEX_AGENT_RESTART_LIMIT: agent_restart_limit: must be 0 or more, got -2`,
				`FILE: state: invalid value "redis": expected one of "", "kv"`,
				`flag --events: events: invalid value "kafka": expected one of "", "nats", "logs"`,
			}},
	}
	secrets := []string{userSeed, otherSeed, acctSeed, serverSeed, curveSeed}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := hermetic(tc.args...)
			o.Env = tc.env
			path := ""
			if tc.file != "" {
				path = testkit.WriteFile(t, filepath.Join(t.TempDir(), "config.json"), tc.file)
				o.SystemFile = path
			}
			l, err := Load(o)
			if l == nil {
				t.Fatal("Load returned no Loaded")
			}
			got := errLines(err)
			want := make([]string, len(tc.want))
			for i, w := range tc.want {
				want[i] = strings.ReplaceAll(w, F, path)
			}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("errors:\n got %q\nwant %q", got, want)
			}
			for _, s := range secrets {
				if strings.Contains(err.Error(), s) {
					t.Errorf("error text leaks a seed: %v", err)
				}
			}
		})
	}
}

func mustPub(t *testing.T, seed string) string {
	kp, err := nkeys.FromSeed([]byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := kp.PublicKey()
	return p
}

func goldenInputs(t *testing.T) (LoadOptions, string) {
	nodeSeed, _ := testKey(t, nkeys.PrefixByteServer, 11)
	xSeed, _ := testKey(t, nkeys.PrefixByteCurve, 12)
	skSeed, _ := testKey(t, nkeys.PrefixByteAccount, 13)
	_, rootPub := testKey(t, nkeys.PrefixByteAccount, 14)
	userSeed, userPub := testKey(t, nkeys.PrefixByteUser, 15)
	sys := fmt.Sprintf(`{
  "namespace": "system",
  "node": {"up": {"node_seed": %q, "node_xkey_seed": %q, "nexus": "lab", "state": "kv",
    "tags": {"region": "lab"}, "issuer_signing_key": %q, "issuer_signing_key_root_account": %q,
    "agents": [{"uri": "file:///opt/nex/custom", "argv": ["run"], "env": {"API_TOKEN": "hunter2", "MODE": "fast"}, "limits": {"memory_max": "256M", "cpu_max": 0.5}}]}},
  "logger": {"level": "info"}
}`, nodeSeed, xSeed, skSeed, rootPub)
	dir := t.TempDir()
	o := LoadOptions{
		Args:       []string{"--check", "--insecure-argv", "--node-name", "golden", "-s", "nats://127.0.0.1:4222", "--nats.password", "s3cret", "--nats.user", "nex"},
		Env:        []string{"NEX_LOGGER_LEVEL=debug", "NEX_NATS_JWT=eyJhbGciOi.secret.jwt", "NEX_NATS_SEED=" + userSeed, "STATE_DIRECTORY=/var/lib/nex", "RUNTIME_DIRECTORY=/run/nex"},
		SystemFile: testkit.WriteFile(t, filepath.Join(dir, "system.json"), sys),
		UserFile:   testkit.WriteFile(t, filepath.Join(dir, "user.json"), fmt.Sprintf(`{"nats": {"nkey": %q}, "show_workload_logs": true}`, userPub)),
		Hostname:   "golden-host",
		CheckInats: checkInats,
	}
	// It holds seeds: as the package ships it, readable by nexd (and group nex) only.
	if err := os.Chmod(o.SystemFile, 0o600); err != nil {
		t.Fatal(err)
	}
	return o, dir
}

func TestCheckGolden(t *testing.T) {
	o, dir := goldenInputs(t)
	l := mustLoad(t, o)
	if !l.Check {
		t.Fatal("--check not seen")
	}
	// The files live in a temporary directory; name it stably.
	got := strings.ReplaceAll(l.Render(), dir, "$TMP")
	golden := filepath.Join("testdata", "check.golden")
	if *update {
		if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -run TestCheckGolden -update)", err)
	}
	if got != string(want) {
		t.Errorf("--check output differs from %s (run with -update to accept):\n%s", golden, got)
	}
	c := l.Config
	secrets := []string{c.Node.Seed, c.Node.XKeySeed, c.Node.IssuerSigningKey, c.NATS.Seed, c.NATS.JWT, c.NATS.Password, "hunter2"}
	js, err := l.RenderJSON()
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range secrets {
		if s == "" || strings.Contains(got, s) || strings.Contains(string(js), s) {
			t.Errorf("secret %q empty or shown", s)
		}
	}
	var doc struct {
		Files    []string
		Settings map[string]struct {
			Value  any
			Origin string
		}
		Warnings []string
	}
	if err := json.Unmarshal(js, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.Settings) != len(newRegistry().specs) || doc.Settings["node_seed"].Value != "[redacted]" ||
		doc.Settings["nats.password"].Origin != "flag --nats.password" || doc.Settings["logger.level"].Origin != "env NEX_LOGGER_LEVEL" ||
		doc.Settings["nexus"].Origin != o.SystemFile || !slices.Equal(doc.Files, []string{o.SystemFile, o.UserFile}) {
		t.Errorf("RenderJSON: %s", js)
	}
	agents := doc.Settings["agents"].Value.([]any)
	env := agents[0].(map[string]any)["env"].(map[string]any)
	if env["API_TOKEN"] != "[redacted]" || env["MODE"] != "fast" {
		t.Errorf("agent env %v", env)
	}
}

func TestDiff(t *testing.T) {
	base := mustLoad(t, hermetic()).Config
	cases := []struct {
		name             string
		args             []string
		applied, restart []string
	}{
		{"nothing", nil, nil, nil},
		{"reloadable only", []string{"-l", "debug", "--logger.target", "std", "--logger.with-pid", "--logger.format", "json",
			"--tags", "a=b", "--agent-restart-limit", "7", "--show-workload-logs"},
			[]string{"agent_restart_limit", "logger.format", "logger.level", "logger.target", "logger.with_pid", "show_workload_logs", "tags"}, nil},
		{"restart only", []string{"--nexus", "other", "-s", "nats://x", "--state", "kv", "--agents.uri", "/a", "--native-limits.pids-max", "9",
			"--embedded-nats-port", "-1"},
			nil, []string{"agents", "embedded_nats_port", "native_limits.pids_max", "nats.servers", "nexus", "state"}},
		{"mixed", []string{"--tags", "a=b", "--logger.file", "/tmp/x.log"}, []string{"tags"}, []string{"logger.file"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			next := mustLoad(t, hermetic(tc.args...)).Config
			got := Diff(base, next)
			if !slices.Equal(got.Applied, tc.applied) || !slices.Equal(got.RestartOnly, tc.restart) {
				t.Errorf("Diff = %+v, want applied %q, restart-only %q", got, tc.applied, tc.restart)
			}
		})
	}
	// nil and empty agent argv/env are the same setting.
	a := &Config{Node: NodeConfig{Agents: []Agent{{URI: "/a"}}}}
	b := &Config{Node: NodeConfig{Agents: []Agent{{URI: "/a", Argv: []string{}, Env: map[string]string{}}}, Tags: map[string]string{}}}
	if got := Diff(a, b); len(got.Applied)+len(got.RestartOnly) != 0 {
		t.Errorf("Diff = %+v", got)
	}
}

// TestDiffFollowsRegistry changes every key in turn: Diff must name exactly that key,
// on the side the registry's reloadable mark says, so no hand-kept list can drift.
func TestDiffFollowsRegistry(t *testing.T) {
	base := mustLoad(t, hermetic()).Config
	for _, s := range newRegistry().specs {
		next := mustLoad(t, hermetic()).Config
		switch p := s.field(next).(type) {
		case *string:
			*p += "x"
		case *bool:
			*p = !*p
		case *int:
			*p++
		case *int64:
			*p++
		case *float64:
			*p++
		case *time.Duration:
			*p++
		case *[]string:
			*p = append(*p, "x")
		case *map[string]string:
			*p = map[string]string{"k": "v"}
		case *[]Agent:
			*p = append(*p, Agent{URI: "/x"})
		default:
			// Any other list: one more (zero) element.
			v := reflect.ValueOf(p).Elem()
			if v.Kind() != reflect.Slice {
				t.Fatalf("%s: unhandled field type %T", s.key, p)
			}
			v.Set(reflect.Append(v, reflect.Zero(v.Type().Elem())))
		}
		got := Diff(base, next)
		want := Changes{RestartOnly: []string{s.key}}
		if s.reloadable {
			want = Changes{Applied: []string{s.key}}
		}
		if !slices.Equal(got.Applied, want.Applied) || !slices.Equal(got.RestartOnly, want.RestartOnly) {
			t.Errorf("changing %s: Diff = %+v, want %+v", s.key, got, want)
		}
	}
}

// TestEmbeddedNATSPortEnv: the key's NEX_ name and the older NEXD_ name both work; the
// NEX_ name wins when both are set.
func TestEmbeddedNATSPortEnv(t *testing.T) {
	for _, tc := range []struct {
		env  []string
		want int
		from string
	}{
		{nil, 4222, "default"},
		{[]string{"NEXD_EMBEDDED_NATS_PORT=-1"}, -1, "env NEXD_EMBEDDED_NATS_PORT"},
		{[]string{"NEX_EMBEDDED_NATS_PORT=4333"}, 4333, "env NEX_EMBEDDED_NATS_PORT"},
		{[]string{"NEX_EMBEDDED_NATS_PORT=4333", "NEXD_EMBEDDED_NATS_PORT=-1"}, 4333, "env NEX_EMBEDDED_NATS_PORT"},
	} {
		o := hermetic()
		o.Env = append(o.Env, tc.env...)
		l := mustLoad(t, o)
		if l.Config.Node.EmbeddedNATSPort != tc.want || l.Origins["embedded_nats_port"] != tc.from {
			t.Errorf("env %q: port %d from %q, want %d from %q", tc.env, l.Config.Node.EmbeddedNATSPort,
				l.Origins["embedded_nats_port"], tc.want, tc.from)
		}
	}
	o := hermetic("--embedded-nats-port", "70000")
	if _, err := Load(o); err == nil || !strings.Contains(err.Error(), "embedded_nats_port") {
		t.Errorf("port 70000: %v, want an error naming embedded_nats_port", err)
	}
}

func TestLogTargets(t *testing.T) {
	c := &Config{}
	if got := c.LogTargets(); len(got) != 0 {
		t.Errorf("LogTargets with none configured = %q, want none (automatic)", got)
	}
	c.Logger.Target = []string{"file", "nats"}
	got := c.LogTargets()
	if !slices.Equal(got, []string{"file", "nats"}) {
		t.Errorf("LogTargets = %q", got)
	}
	got[0] = "std"
	if c.Logger.Target[0] != "file" {
		t.Error("LogTargets shares the config's slice")
	}
}

func TestRegistry(t *testing.T) {
	r := newRegistry()
	aliases := 0
	for _, s := range r.specs {
		aliases += len(s.envAliases)
	}
	if len(r.byEnv) != len(r.specs)+aliases || len(r.byKey) != len(r.specs) {
		t.Fatal("duplicate key or environment variable name")
	}
	usage := Usage()
	fs := NewFlagSet()
	n := 0
	fs.VisitAll(func(f *pflag.Flag) {
		n++
		if f.Hidden {
			return // upstream-only flags, accepted with a notice
		}
		if !strings.Contains(usage, "--"+f.Name+" ") && !strings.Contains(usage, "--"+f.Name+"\n") &&
			!strings.Contains(usage, "--"+f.Name+"  ") {
			t.Errorf("Usage lacks --%s", f.Name)
		}
	})
	for _, g := range groupOrder {
		if !strings.Contains(usage, "\n"+g+":\n") {
			t.Errorf("Usage lacks heading %s", g)
		}
	}
	if n < 55 {
		t.Errorf("only %d flags", n)
	}
}

func TestKeysDoc(t *testing.T) {
	got := keysMarkdown()
	if *update {
		if err := os.WriteFile("KEYS.md", []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile("KEYS.md")
	if err != nil || string(want) != got {
		t.Errorf("KEYS.md is out of date with the key registry; run go test -run TestKeysDoc -update")
	}
}

// keysMarkdown renders the table of every key, flag and environment variable.
func keysMarkdown() string {
	var b strings.Builder
	b.WriteString("# nexd configuration keys\n\n")
	b.WriteString("Each setting has one name in three spellings. In JSON files it is the flag name with dashes\n")
	b.WriteString("as underscores, either at the top level (flat layout) or, for node settings, under\n")
	b.WriteString("`\"node\": {\"up\": {...}}` (nested layout); `nats.*` and `logger.*` keys go in a `\"nats\"` or\n")
	b.WriteString("`\"logger\"` object or stay dotted (`\"nats.servers\"`). The environment variable is `NEX_` plus the\n")
	b.WriteString("key upper-cased with dots as underscores; an empty variable counts as unset; lists are\n")
	b.WriteString("comma-separated, `NEX_TAGS` is `k=v,k2=v2` (or a JSON object) and `NEX_AGENTS` a JSON array.\n")
	b.WriteString("Precedence, lowest first: defaults, `/etc/nex/config.json`, `~/.config/nex/config.json`,\n")
	b.WriteString("`./config.json`, `--config FILE`, environment, flags. *Reload* marks what `nexctl reload`\n")
	b.WriteString("(SIGHUP) applies; changing any other key needs a restart.\n\n")
	b.WriteString("| Key | Flag | Environment | Default | Reload | Description |\n")
	b.WriteString("|---|---|---|---|---|---|\n")
	for _, g := range groupOrder {
		for _, s := range newRegistry().specs {
			if s.group != g {
				continue
			}
			flagCol := "`--" + s.flagName() + "`"
			if s.short != "" {
				flagCol = "`-" + s.short + "`, " + flagCol
			}
			if s.kind == kAgents {
				flagCol = "`--agents.uri`, `--agents.argv`, `--agents.env`, `--agents.limits`"
			}
			reload := ""
			if s.reloadable {
				reload = "yes"
			}
			def := defaultText(s)
			if def != "" && s.defText == "" {
				def = "`" + def + "`"
			}
			help := s.help
			if len(s.enum) > 0 {
				help += " (one of: "
				for i, e := range s.enum {
					if i > 0 {
						help += ", "
					}
					help += fmt.Sprintf("%q", e)
				}
				help += ")"
			}
			if s.secret {
				help += "; secret, redacted by --check"
			}
			envCol := "`" + s.envName() + "`"
			for _, a := range s.envAliases {
				envCol += ", `" + a + "`"
			}
			fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s | %s |\n", s.key, flagCol, envCol, def, reload, strings.ReplaceAll(help, "|", "\\|"))
		}
	}
	b.WriteString("\nAgents (`agents` in JSON): `[{\"uri\": \"file:///path\", \"argv\": [\"run\"], \"env\": {\"K\": \"V\"},\n")
	b.WriteString("\"limits\": {\"memory_max\": \"256M\", \"memory_high\": \"192M\", \"cpu_max\": 0.5, \"pids_max\": 100}}]`.\n")
	b.WriteString("On the command line each `--agents.uri` starts a new agent and the `--agents.argv` (one argument\n")
	b.WriteString("each), `--agents.env K=V` and `--agents.limits name=value,...` after it apply to it. Sizes are\n")
	b.WriteString("bytes or a number with K, M, G or T (powers of 1024); `max` or 0 means no limit.\n\n")
	b.WriteString("Command-only flags: `--config FILE`, `--check` (print the resolved configuration with the origin\n")
	b.WriteString("of every value, secrets redacted, and exit non-zero listing every error), `-h`/`--help`, `--version`.\n")
	return b.String()
}

// FuzzLoad feeds arbitrary bytes as a config file: Load must never panic, must report
// problems only as Errors, and whatever it resolves must render. Run it with
// -fuzzminimizetime=1s: coverage inside encoding/json depends on sync.Pool state, so
// the engine's minimisation of "interesting" inputs never settles and eats the budget.
func FuzzLoad(f *testing.F) {
	if b, err := os.ReadFile(filepath.Join("..", "..", "etc", "nex", "config.json")); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"namespace": "x", "node": {"up": {"tags": {"a": "b"}, "agents": [{"uri": "/a", "argv": ["x"], "env": {"K": "V"}, "limits": {"memory_max": "1G", "cpu_max": 0.5}}]}}}`))
	f.Add([]byte(`{"node_name": "n", "nats": {"servers": ["nats://a"], "timeout": "1s"}, "logger.level": "debug", "native_limits": {"pids_max": 5}}`))
	f.Add([]byte(`{"agents": [{"limits": {"memory_max": 1e300}}], "agent_restart_limit": -1e20, "auction_ttl": "-5s"}`))
	f.Add([]byte(`[`))
	f.Add([]byte(`null`))
	// One file rewritten per input: a temporary directory per input costs more in
	// disk traffic than Load itself.
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		o := hermetic()
		o.SystemFile = filepath.Join(dir, "config.json")
		if err := os.WriteFile(o.SystemFile, data, 0o644); err != nil {
			t.Fatal(err)
		}
		l, err := Load(o)
		if l == nil || l.Config == nil {
			t.Fatal("no Loaded")
		}
		if err != nil {
			var errs Errors
			if !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("error is not a non-empty Errors: %v", err)
			}
		}
		_ = l.Render()
		if _, err := l.RenderJSON(); err != nil {
			t.Fatalf("RenderJSON: %v", err)
		}
		_ = Diff(l.Config, l.Config)
	})
}

// TestUpstreamGlobalsAccepted loads a config.json shared with upstream's nex CLI: its
// global keys (flat, dotted and nested), resource_directory and the same as flags load
// with one notice each instead of stopping the node.
func TestUpstreamGlobalsAccepted(t *testing.T) {
	dir := t.TempDir()
	body := `{
  "namespace": "system",
  "json": true,
  "disable_upgrade_check": true,
  "logger": {"level": "info", "color": true, "short": true, "timefmt": "DateTime"},
  "node": {"up": {"node_name": "n1", "resource_directory": "/home/u/.config/nex", "tags": {"region": "lab"}}}
}`
	o := hermetic("--logger.color", "--resource-directory", "/tmp/x", "--tags", "a=1;b=2")
	o.UserFile = testkit.WriteFile(t, filepath.Join(dir, "config.json"), body)
	l := mustLoad(t, o)
	want := []string{
		o.UserFile + ": json: no effect in nexd",
		o.UserFile + ": disable_upgrade_check: no effect in nexd",
		o.UserFile + ": logger.color: no effect",
		o.UserFile + ": logger.short: no effect",
		o.UserFile + ": logger.timefmt: no effect",
		o.UserFile + ": node.up.resource_directory: no effect in nexd: its files live in state_dir",
		"flag --logger.color: no effect",
		"flag --resource-directory: no effect",
	}
	all := strings.Join(l.Warnings, "\n")
	for _, w := range want {
		if !strings.Contains(all, w) {
			t.Errorf("no notice %q in:\n%s", w, all)
		}
	}
	if got := l.Config.Node.Tags; len(got) != 2 || got["a"] != "1" || got["b"] != "2" {
		t.Errorf("--tags 'a=1;b=2' = %v, want a=1 and b=2 as upstream parses it", got)
	}
	if strings.Contains(Usage(), "resource-directory") {
		t.Error("upstream-only flags must stay out of --help")
	}
}

// A password in a server URL is a secret too: --check and nexctl config hide it.
func TestServerURLPasswordRedacted(t *testing.T) {
	l := mustLoad(t, hermetic("--check", "--insecure-argv", "--nats.servers", "nats://admin:s3cret@127.0.0.1:4222,nats://tok3n@h:4222"))
	js, err := l.RenderJSON()
	if err != nil {
		t.Fatal(err)
	}
	for _, out := range []string{l.Render(), string(js)} {
		if strings.Contains(out, "s3cret") || strings.Contains(out, "tok3n") || !strings.Contains(out, "127.0.0.1:4222") {
			t.Errorf("server URL credentials shown or URL lost:\n%s", out)
		}
	}
}

// A config file holding a seed that others can change stops the node; one others can
// read is warned about; ./config.json that is not the invoking user's alone is skipped.
func TestSecretFilesChecked(t *testing.T) {
	dir := t.TempDir()
	seed, _ := testKey(t, nkeys.PrefixByteServer, 7)
	body := fmt.Sprintf(`{"node_seed": %q}`, seed)
	path := testkit.WriteFile(t, filepath.Join(dir, "system.json"), body)
	for mode, want := range map[os.FileMode]string{0o664: "others can change it", 0o644: "every local user can read it", 0o600: ""} {
		os.Chmod(path, mode)
		o := hermetic()
		o.SystemFile = path
		l, err := Load(o)
		all := fmt.Sprint(err, l.Warnings)
		switch {
		case mode == 0o664 && (err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "0664")):
			t.Errorf("mode %o: err %v, want a refusal naming %q and the mode", mode, err, want)
		case mode != 0o664 && err != nil:
			t.Errorf("mode %o: %v", mode, err)
		case want != "" && !strings.Contains(all, want):
			t.Errorf("mode %o: %s, want %q", mode, all, want)
		case want == "" && strings.Contains(all, path):
			t.Errorf("mode %o: unexpected %s", mode, all)
		}
	}
	local := testkit.WriteFile(t, filepath.Join(dir, "config.json"), `{"node_name": "from-local"}`)
	os.Chmod(local, 0o666)
	o := hermetic()
	o.LocalFile = local
	l := mustLoad(t, o)
	if l.Config.Node.Name == "from-local" || !strings.Contains(strings.Join(l.Warnings, "\n"), "skipped "+local) {
		t.Errorf("a world-writable ./config.json was read (name %q, warnings %q)", l.Config.Node.Name, l.Warnings)
	}
}

// nats.leaf_remote and state_replicas: bad combinations name the key and say why.
func TestFleetSettings(t *testing.T) {
	mustLoad(t, hermetic("--nats.leaf-remote", "nats-leaf://hub:7422", "--nats.jsdomain", "site1", "--state-replicas", "3"))
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--nats.leaf-remote", "hub:7422", "--nats.jsdomain", "s"}, "want a URL like nats-leaf://"},
		{[]string{"--nats.leaf-remote", "nats-leaf://hub:7422"}, "needs nats.jsdomain"},
		{[]string{"--nats.leaf-remote", "nats-leaf://hub:7422", "--nats.jsdomain", "s", "--nats.servers", "nats://x:4222"}, "cannot go with nats.servers"},
		{[]string{"--nats.leaf-creds", "/x.creds"}, "nats.leaf_creds"},
		{[]string{"--state-replicas", "6"}, "state_replicas"},
		{[]string{"--state-replicas", "-1"}, "state_replicas"},
	} {
		if _, err := Load(hermetic(tc.args...)); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: %v, want an error containing %q", tc.args, err, tc.want)
		}
	}
}

// TestREADMEKeys guards the README's hand-kept key table against keys lost in a merge
// or never added: every registry key needs a row there.
func TestREADMEKeys(t *testing.T) {
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range newRegistry().specs {
		if !strings.Contains(string(readme), "\n| `"+s.key+"` |") {
			t.Errorf("README.md's key table has no row for %s (see daemon/config/KEYS.md)", s.key)
		}
	}
}

// With the zero-config embedded server nexd mints with its own keys, so the "children
// connect without credentials" warning would be false; with an external server it holds.
func TestNoIssuerWarningOnlyWithoutEmbeddedAuth(t *testing.T) {
	const warn = "no credential issuer configured"
	if l := mustLoad(t, hermetic()); strings.Contains(strings.Join(l.Warnings, "\n"), warn) {
		t.Errorf("zero-config embedded server: false warning in %q", l.Warnings)
	}
	if l := mustLoad(t, hermetic("--nats.servers", "nats://127.0.0.1:4222")); !strings.Contains(strings.Join(l.Warnings, "\n"), warn) {
		t.Errorf("external server without an issuer: no warning in %q", l.Warnings)
	}
}

// TestLiveRestoreNeedsState: live_restore without KV state and a state dir is valid but
// warned about (the next nexd could not adopt anything); with both it is quiet.
func TestLiveRestoreNeedsState(t *testing.T) {
	l := mustLoad(t, hermetic("--live-restore"))
	if !l.Config.Node.LiveRestore || !strings.Contains(strings.Join(l.Warnings, "\n"), "live_restore without state kv") {
		t.Errorf("live_restore alone: %v, warnings %q", l.Config.Node.LiveRestore, l.Warnings)
	}
	l = mustLoad(t, hermetic("--live-restore", "--state", "kv", "--state-dir", t.TempDir()))
	if strings.Contains(strings.Join(l.Warnings, "\n"), "live_restore") {
		t.Errorf("live_restore with state: warnings %q", l.Warnings)
	}
}

// TestUnsignedNexletWithoutDirectFeeds: a nexlet on upstream's SDK (unsigned_registration)
// on a node that mints scoped users (here the zero-config embedded server's) is warned
// about unless allow_nexlet_direct_feeds is set: its feeds would be refused.
func TestUnsignedNexletWithoutDirectFeeds(t *testing.T) {
	o := hermetic()
	o.Env = []string{`NEX_AGENTS=[{"uri": "/opt/up", "unsigned_registration": true}, {"uri": "/opt/nexd-sdk"}]`}
	w := strings.Join(mustLoad(t, o).Warnings, "\n")
	if !strings.Contains(w, "agents[0] (/opt/up): unsigned_registration (upstream's SDK) without allow_nexlet_direct_feeds") || strings.Contains(w, "agents[1]") {
		t.Errorf("warnings %q: want one for agents[0] alone", w)
	}
	o.Args = []string{"--allow-nexlet-direct-feeds"}
	if w := strings.Join(mustLoad(t, o).Warnings, "\n"); strings.Contains(w, "allow_nexlet_direct_feeds") {
		t.Errorf("with the key: warnings %q", w)
	}
}

// TestCgroupDriver: cgroup_driver is cgroupfs by default; systemd is refused with the
// key and the host's reason where the host cannot give scopes (this test host has no
// systemd as init, so the real check refuses it); an unknown driver names the choices.
func TestCgroupDriver(t *testing.T) {
	if d := mustLoad(t, hermetic()).Config.Node.CgroupDriver; d != "cgroupfs" {
		t.Errorf("default cgroup_driver %q, want cgroupfs", d)
	}
	o := hermetic("--cgroup-driver", "systemd")
	if l := mustLoad(t, o); l.Config.Node.CgroupDriver != "systemd" {
		t.Errorf("cgroup_driver %q, want systemd (no host check without CheckCgroupDriver, as in nexctl)", l.Config.Node.CgroupDriver)
	}
	o.CheckCgroupDriver = func(d string) error {
		if d == "systemd" {
			return errors.New("systemd is not the init system here (no /run/systemd/system)")
		}
		return nil
	}
	_, err := Load(o)
	if err == nil || !strings.Contains(err.Error(), "cgroup_driver") || !strings.Contains(err.Error(), "no /run/systemd/system") || !strings.Contains(err.Error(), `use "cgroupfs"`) {
		t.Errorf("systemd driver on a host without systemd: %v", err)
	}
	o = hermetic("--cgroup-driver", "runc")
	o.CheckCgroupDriver = o2check
	_, err = Load(o)
	if err == nil || !strings.Contains(err.Error(), `cgroup_driver`) || !strings.Contains(err.Error(), `"cgroupfs", "systemd"`) {
		t.Errorf("unknown driver: %v", err)
	}
	o = hermetic("--cgroup-driver", "cgroupfs")
	o.CheckCgroupDriver = o2check
	mustLoad(t, o)
}

func o2check(d string) error {
	if d != "cgroupfs" {
		return fmt.Errorf("check called for %q", d)
	}
	return nil
}

// TestGoRuntimeKeys: go_gc_percent and go_memory_limit load from flags (a size with a
// unit), and a GOGC below -1 is refused with the key named.
func TestGoRuntimeKeys(t *testing.T) {
	l := mustLoad(t, hermetic("--go-gc-percent", "50", "--go-memory-limit", "64M"))
	if l.Config.Node.GoGCPercent != 50 || l.Config.Node.GoMemoryLimit != 64<<20 {
		t.Errorf("loaded go_gc_percent %d, go_memory_limit %d", l.Config.Node.GoGCPercent, l.Config.Node.GoMemoryLimit)
	}
	if _, err := Load(hermetic("--go-gc-percent", "-2")); err == nil || !strings.Contains(err.Error(), "go_gc_percent") {
		t.Errorf("go_gc_percent -2: %v, want an error naming the key", err)
	}
}

// TestConfigErrorsHideCredentials: a NATS URL with a password or token that
// nexd cannot use is refused naming its key, and neither the error nor the rendered
// configuration (`nexctl config`, `nexd --check`) shows the secret. Before, the
// nats.leaf_remote error quoted the URL whole (in the journal at every failed start),
// nats.servers was not checked at all (nats.go's parse error quoted it whole at every
// connect attempt, retried for good), and `nexctl config` showed nats.leaf_remote whole.
func TestConfigErrorsHideCredentials(t *testing.T) {
	const secret = "hub-s3cret"
	for _, tc := range []struct {
		args []string
		key  string
	}{
		{[]string{"--nats.leaf-remote", "nats-leaf://site:" + secret + "%zz@hub:7422", "--nats.jsdomain", "s"}, "nats.leaf_remote"},
		{[]string{"--nats.leaf-remote", "http://site:" + secret + "@hub:7422", "--nats.jsdomain", "s"}, "nats.leaf_remote"},
		{[]string{"--nats.leaf-remote", "site:" + secret + "@hub:7422", "--nats.jsdomain", "s"}, "nats.leaf_remote"},
		{[]string{"--nats.servers", "nats://admin:" + secret + "%zz@127.0.0.1:4222"}, "nats.servers[0]"},
		{[]string{"--nats.servers", "nats://h:4222,admin:" + secret + "%zz@127.0.0.1:4222"}, "nats.servers[1]"},
		{[]string{"--nats.servers", "nats://" + secret + "@[::1"}, "nats.servers[0]"},
	} {
		_, err := Load(hermetic(tc.args...))
		if err == nil || !strings.Contains(err.Error(), tc.key) {
			t.Errorf("%q: %v, want an error naming %s", tc.args, err, tc.key)
		} else if strings.Contains(err.Error(), secret) {
			t.Errorf("%q: the error shows the secret: %v", tc.args, err)
		}
	}
	l := mustLoad(t, hermetic("--insecure-argv", "--nats.leaf-remote", "nats-leaf://site:"+secret+"@hub:7422", "--nats.jsdomain", "s"))
	js, err := l.RenderJSON()
	if err != nil {
		t.Fatal(err)
	}
	if out := l.Render() + string(js); strings.Contains(out, secret) || !strings.Contains(out, "nats-leaf://[redacted]@hub:7422") {
		t.Errorf("rendered configuration shows the leaf remote's password, or no leaf remote:\n%s", out)
	}
	mustLoad(t, hermetic("--insecure-argv", "--nats.servers", "nats://a:4222, b:4222,tls://u:p@c:4443"))
	// A nexlet's seed pasted as its public key: refused, not shown (before, quoted whole).
	seed, _ := testKey(t, nkeys.PrefixByteUser, 7)
	_, err = Load(hermetic("--remote-nexlets", `[{"name":"edge","type":"wasm","public_key":"`+seed+`"}]`))
	if err == nil || !strings.Contains(err.Error(), "public_key") || strings.Contains(err.Error(), seed) {
		t.Errorf("a seed as a remote nexlet's public_key: %v, want refused without the seed", err)
	}
}

// FuzzFlagsAndEnv feeds arbitrary command lines and NEX_* environments: Load must never
// panic, must report problems only as Errors each naming where (its source: a flag,
// an env variable, the command line) or what (its key), and whatever it resolves must
// render.
func FuzzFlagsAndEnv(f *testing.F) {
	f.Add("--nats.servers\nnats://127.0.0.1:4222\n--tags\na=1;b=2\n--agents.uri\n/bin/a\n--agents.argv\nx\n--agents.limits\nmemory_max=1G,cpu_max=0.5", "NEX_NODE_NAME=n1\nNEX_TAGS=a=1")
	f.Add("--check\n--insecure-argv\n--nats.servers\nnats://admin:s3cret@127.0.0.1:4222", "NEX_LOGGER_LEVEL=debug")
	f.Add("--agents.env\nK=V\n--auction_ttl\n-5s\n--nope\n-x\n--", "NEX_AUCTION_TTL=soon\nNEX_NATIVE_LIMITS={\nSTATE_DIRECTORY=rel:/abs")
	f.Add("--agents.limits\nmemory_max=lots\n--tags\n;;=\n--logger.level", "NEX_AGENTS=[{\"uri\":1}]")
	f.Fuzz(func(t *testing.T, args, env string) {
		o := hermetic(strings.Split(args, "\n")...)
		if env != "" {
			o.Env = strings.Split(env, "\n")
		}
		l, err := Load(o)
		if l == nil || l.Config == nil {
			t.Fatal("no Loaded")
		}
		if err != nil {
			var errs Errors
			if !errors.As(err, &errs) || len(errs) == 0 {
				t.Fatalf("error is not a non-empty Errors: %v", err)
			}
			for _, fe := range errs {
				if fe.Source == "" && fe.Key == "" {
					t.Fatalf("args %q env %q: error %q names neither where nor what", args, env, fe.Msg)
				}
			}
		}
		_ = l.Render()
		if _, err := l.RenderJSON(); err != nil {
			t.Fatalf("RenderJSON: %v", err)
		}
	})
}
