package native

import (
	"encoding/json"
	"log/slog"
	"strings"
	"testing"

	"github.com/santhosh-tekuri/jsonschema/v6"

	"github.com/nexd-project/nexd/protocol"
)

func TestSchemaAcceptsWhatTheNexletAccepts(t *testing.T) {
	doc, err := jsonschema.UnmarshalJSON(strings.NewReader(StartRequestSchema))
	if err != nil {
		t.Fatal(err)
	}
	c := jsonschema.NewCompiler()
	if err := c.AddResource("start_request.json", doc); err != nil {
		t.Fatal(err)
	}
	sch, err := c.Compile("start_request.json")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		doc  string
		ok   bool
	}{
		{"upstream fields", `{"uri":"file:///bin/true","argv":["a"],"environment":{"A":"b"},"description":"d","expose_ports":[8080]}`, true},
		{"nats uri", `{"uri":"nats://bucket/name:tag"}`, true},
		{"extensions", `{"uri":"file:///bin/true","workdir":"/tmp","limits":{"memory_max":"256M","cpu_max":0.5,"pids_max":10},"stop_grace":"5s","restart":{"policy":"always","max":2,"backoff":"1s"},"encrypted_environment":{"base64_encrypted_env":"AA==","encrypted_by":"X"}}`, true},
		{"memory as bytes", `{"uri":"file:///bin/true","limits":{"memory_max":1048576}}`, true},
		{"missing uri", `{"argv":[]}`, false},
		// Formats are left to the nexlet, whose errors are more precise than a pattern's.
		{"unknown scheme", `{"uri":"oci://x/y"}`, true},
		{"bad memory", `{"uri":"file:///bin/true","limits":{"memory_max":"lots"}}`, true},
		{"memory wrong type", `{"uri":"file:///bin/true","limits":{"memory_max":true}}`, false},
		{"bad policy", `{"uri":"file:///bin/true","restart":{"policy":"sometimes"}}`, false},
		{"unknown field", `{"uri":"file:///bin/true","stdin":"x"}`, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			v, err := jsonschema.UnmarshalJSON(strings.NewReader(tc.doc))
			if err != nil {
				t.Fatal(err)
			}
			if err := sch.Validate(v); (err == nil) != tc.ok {
				t.Errorf("Validate = %v, want ok=%v", err, tc.ok)
			}
		})
	}
}

func TestParseMemory(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		bad  bool
	}{
		{`1048576`, 1 << 20, false},
		{`"256M"`, 256 << 20, false},
		{`"1.5G"`, 3 << 29, false},
		{`"64Mi"`, 64 << 20, false},
		{`"512KB"`, 512 << 10, false},
		{`"100"`, 100, false},
		{`0`, 0, true},
		{`1.5`, 0, true},
		{`"lots"`, 0, true},
		{`"-1M"`, 0, true},
		{`true`, 0, true},
	}
	for _, tc := range tests {
		got, err := parseMemory(json.RawMessage(tc.in))
		if (err != nil) != tc.bad || got != tc.want {
			t.Errorf("parseMemory(%s) = %d, %v", tc.in, got, err)
		}
	}
}

func TestParseRestartDefaults(t *testing.T) {
	p, err := parseStartRequest(`{"uri":"file:///bin/true"}`, protocol.LifecycleService)
	if err != nil {
		t.Fatal(err)
	}
	if p.policy != RestartOnFailure || p.maxRestarts != DefaultMaxRestarts || p.backoff != DefaultBackoff || p.grace != DefaultStopGrace {
		t.Errorf("service defaults = %+v", p)
	}
	p, _ = parseStartRequest(`{"uri":"file:///bin/true"}`, protocol.LifecycleJob)
	if p.policy != RestartNever {
		t.Errorf("job policy = %s", p.policy)
	}
	p, _ = parseStartRequest(`{"uri":"nats://b/n"}`, protocol.LifecycleJob)
	if p.art.bucket != "b" || p.art.object != "n_latest" {
		t.Errorf("nats artifact = %+v", p.art)
	}
}

// TestLogLevelFromEnv: the nexlet logs at the level nexd names in EnvLogLevel (as
// slog spells it), and at INFO when it names none it knows.
func TestLogLevelFromEnv(t *testing.T) {
	for v, want := range map[string]slog.Level{"DEBUG": slog.LevelDebug, "INFO": slog.LevelInfo, "WARN": slog.LevelWarn,
		"ERROR": slog.LevelError, "INFO+2": slog.LevelInfo + 2, "": slog.LevelInfo, "loud": slog.LevelInfo} {
		if got := logLevel(v); got != want {
			t.Errorf("%s=%q: level %v, want %v", EnvLogLevel, v, got, want)
		}
	}
}
