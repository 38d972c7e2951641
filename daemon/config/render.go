package config

import (
	"encoding/json"
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/internal/natsurl"
)

const redacted = "[redacted]"

// secretEnvName matches agent environment variable names whose values --check must
// not show.
var secretEnvName = sync.OnceValue(func() *regexp.Regexp {
	return regexp.MustCompile(`(?i)(secret|passw|token|key|seed|jwt|cred|auth|private)`)
})

// renderValue formats a typed value for the text rendering (JSON-like, so strings are
// quoted and a value can be pasted back into a config file).
func renderValue(s *keySpec, v any) string {
	switch x := v.(type) {
	case string:
		return strconv.Quote(x)
	case time.Duration:
		return strconv.Quote(x.String())
	case float64:
		return strconv.FormatFloat(x, 'g', -1, 64)
	case int64:
		if s.kind == kSize {
			return strconv.Quote(formatSize(x))
		}
		return strconv.FormatInt(x, 10)
	case int:
		return strconv.Itoa(x)
	case bool:
		return strconv.FormatBool(x)
	}
	b, _ := json.Marshal(jsonValue(s, v))
	return string(b)
}

// jsonValue converts a typed value to what RenderJSON emits.
func jsonValue(s *keySpec, v any) any {
	switch x := v.(type) {
	case time.Duration:
		return x.String()
	case int64:
		if s.kind == kSize {
			return formatSize(x)
		}
		return x
	case []string:
		if x == nil {
			return []string{}
		}
		return x
	case map[string]string:
		if x == nil {
			return map[string]string{}
		}
		return x
	case []RemoteNexlet:
		if x == nil {
			return []RemoteNexlet{}
		}
		return x
	case []Agent:
		out := make([]any, len(x))
		for i, a := range x {
			out[i] = agentJSON(a)
		}
		return out
	}
	return v
}

func agentJSON(a Agent) map[string]any {
	env := map[string]string{}
	for k, v := range a.Env {
		if secretEnvName().MatchString(k) {
			v = redacted
		}
		env[k] = v
	}
	argv := a.Argv
	if argv == nil {
		argv = []string{}
	}
	m := map[string]any{"uri": a.URI, "argv": argv, "env": env, "limits": limitsJSON(a.Limits)}
	if a.UnsignedRegistration {
		m["unsigned_registration"] = true
	}
	return m
}

func limitsJSON(l Limits) map[string]any {
	return map[string]any{
		"memory_max":  formatSize(l.MemoryMax),
		"memory_high": formatSize(l.MemoryHigh),
		"cpu_max":     l.CPUMax,
		"pids_max":    l.PidsMax,
	}
}

// redactedValue is the key's value with secrets hidden.
func redactedValue(s *keySpec, c *Config) any {
	v := s.get(c)
	if str, ok := v.(string); ok && s.secret && str != "" {
		return redacted
	}
	if list, ok := v.([]string); ok && s.key == "nats.servers" {
		return natsurl.RedactAll(list)
	}
	if str, ok := v.(string); ok && s.key == "nats.leaf_remote" {
		return natsurl.Redact(str)
	}
	return v
}

type renderLine struct{ key, value, origin string }

func (l *Loaded) lines() []renderLine {
	r := newRegistry()
	specs := append([]*keySpec(nil), r.specs...)
	sort.Slice(specs, func(i, j int) bool { return specs[i].key < specs[j].key })
	var out []renderLine
	for _, s := range specs {
		origin := l.Origins[s.key]
		if origin == "" {
			origin = "default"
		}
		if s.kind == kAgents && len(l.Config.Node.Agents) > 0 {
			for i, a := range l.Config.Node.Agents {
				at := fmt.Sprintf("agents[%d].", i)
				j := agentJSON(a)
				for _, f := range []string{"uri", "argv", "env", "limits"} {
					b, _ := json.Marshal(j[f])
					out = append(out, renderLine{at + f, string(b), origin})
				}
			}
			continue
		}
		out = append(out, renderLine{s.key, renderValue(s, redactedValue(s, l.Config)), origin})
	}
	return out
}

// Render is the --check output: every resolved key, sorted, with its value and where
// it came from; secrets are shown as [redacted]. Warnings follow as comments.
func (l *Loaded) Render() string {
	lines := l.lines()
	kw, vw := 0, 0
	for _, ln := range lines {
		kw = max(kw, len(ln.key))
		vw = max(vw, len(ln.value))
	}
	vw = min(vw, 40)
	var b strings.Builder
	b.WriteString("# nexd configuration: key = value  # origin\n")
	files := "none"
	if len(l.Files) > 0 {
		files = strings.Join(l.Files, ", ")
	}
	fmt.Fprintf(&b, "# files read: %s\n", files)
	for _, ln := range lines {
		fmt.Fprintf(&b, "%-*s = %-*s  # %s\n", kw, ln.key, vw, ln.value, ln.origin)
	}
	for _, w := range l.Warnings {
		fmt.Fprintf(&b, "# warning: %s\n", w)
	}
	return b.String()
}

// RenderJSON is the redacted resolved configuration for `nexctl config`:
// {"files": [...], "settings": {"key": {"value": ..., "origin": ...}}, "warnings": [...]}.
func (l *Loaded) RenderJSON() ([]byte, error) {
	type setting struct {
		Value  any    `json:"value"`
		Origin string `json:"origin"`
	}
	settings := map[string]setting{}
	for _, s := range newRegistry().specs {
		origin := l.Origins[s.key]
		if origin == "" {
			origin = "default"
		}
		settings[s.key] = setting{jsonValue(s, redactedValue(s, l.Config)), origin}
	}
	files, warnings := l.Files, l.Warnings
	if files == nil {
		files = []string{}
	}
	if warnings == nil {
		warnings = []string{}
	}
	return json.MarshalIndent(map[string]any{"files": files, "settings": settings, "warnings": warnings}, "", "  ")
}

// Changes are the keys whose values differ between two configurations, split by what
// the key registry says a reload can do with them.
type Changes struct {
	Applied     []string // reloadable keys that changed: a reload applies them
	RestartOnly []string // other keys that changed: a reload naming any is rejected whole
}

// Diff compares old and new key by key over the registry, each list sorted.
func Diff(old, new *Config) Changes {
	var c Changes
	for _, s := range newRegistry().specs {
		if sameValue(s.get(old), s.get(new)) {
			continue
		}
		if s.reloadable {
			c.Applied = append(c.Applied, s.key)
		} else {
			c.RestartOnly = append(c.RestartOnly, s.key)
		}
	}
	sort.Strings(c.Applied)
	sort.Strings(c.RestartOnly)
	return c
}

// sameValue is DeepEqual that treats nil and empty maps and slices alike.
func sameValue(a, b any) bool {
	if aa, ok := a.([]Agent); ok {
		if ab, ok := b.([]Agent); ok {
			return reflect.DeepEqual(normAgents(aa), normAgents(ab))
		}
	}
	va, vb := reflect.ValueOf(a), reflect.ValueOf(b)
	if va.IsValid() && vb.IsValid() && va.Kind() == vb.Kind() {
		switch va.Kind() {
		case reflect.Map, reflect.Slice:
			if va.Len() == 0 && vb.Len() == 0 {
				return true
			}
		}
	}
	return reflect.DeepEqual(a, b)
}

// normAgents makes nil and empty argv and env compare equal.
func normAgents(in []Agent) []Agent {
	out := cloneAgents(in)
	for i := range out {
		if len(out[i].Argv) == 0 {
			out[i].Argv = nil
		}
		if len(out[i].Env) == 0 {
			out[i].Env = nil
		}
	}
	if len(out) == 0 {
		return nil
	}
	return out
}
