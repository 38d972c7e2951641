package config

import (
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/spf13/pflag"
)

// rawValue collects a flag's values as given, in order; decoding (and its errors)
// happens later with the same decoders as the environment, so every bad flag value
// is reported, not only the first.
type rawValue struct {
	vals   []string
	isBool bool
}

func (v *rawValue) String() string {
	if len(v.vals) == 0 {
		return ""
	}
	return v.vals[len(v.vals)-1]
}
func (v *rawValue) Set(s string) error { v.vals = append(v.vals, s); return nil }
func (v *rawValue) Type() string {
	if v.isBool {
		return "bool"
	}
	return "string"
}

// agentsBuilder groups --agents.uri, --agents.argv, --agents.env and --agents.limits
// in command-line order: each uri starts a new agent; the others apply to the most
// recent one.
type agentsBuilder struct {
	agents []Agent
	probs  []FieldError
}

type agentsPart struct {
	b    *agentsBuilder
	part string // uri, argv, env, limits
}

func (p *agentsPart) String() string { return "" }
func (p *agentsPart) Type() string   { return "string" }
func (p *agentsPart) Set(s string) error {
	b := p.b
	src := "flag --agents." + p.part
	if p.part == "uri" {
		b.agents = append(b.agents, Agent{URI: s})
		return nil
	}
	if len(b.agents) == 0 {
		b.probs = append(b.probs, FieldError{Key: "agents", Source: src,
			Msg: fmt.Sprintf("--agents.%s %q comes before any --agents.uri; give --agents.uri first", p.part, s)})
		return nil
	}
	a := &b.agents[len(b.agents)-1]
	at := fmt.Sprintf("agents[%d]", len(b.agents)-1)
	switch p.part {
	case "argv":
		a.Argv = append(a.Argv, s)
	case "env":
		k, v, ok := strings.Cut(s, "=")
		if !ok || k == "" {
			b.probs = append(b.probs, FieldError{Key: at + ".env", Source: src, Msg: fmt.Sprintf("expected KEY=VALUE, got %q", s)})
			return nil
		}
		if a.Env == nil {
			a.Env = map[string]string{}
		}
		a.Env[k] = v
	case "limits":
		for _, kv := range splitList(s) {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				b.probs = append(b.probs, FieldError{Key: at + ".limits", Source: src,
					Msg: fmt.Sprintf("expected name=value (memory_max, memory_high, cpu_max, pids_max), got %q", kv)})
				continue
			}
			k = strings.ReplaceAll(strings.TrimSpace(k), "-", "_")
			var x any
			var ps []problem
			switch k {
			case "memory_max", "memory_high":
				x, ps = parseSize(v)
			case "cpu_max":
				x, ps = decodeText(&keySpec{kind: kFloat}, []string{v})
			case "pids_max":
				x, ps = decodeText(&keySpec{kind: kInt}, []string{v})
			default:
				b.probs = append(b.probs, FieldError{Key: at + ".limits", Source: src, Msg: unknownMsg(k, limitsKeys)})
				continue
			}
			for _, q := range ps {
				b.probs = append(b.probs, FieldError{Key: at + ".limits." + k, Source: src, Msg: q.msg})
			}
			if ps == nil {
				setLimit(&a.Limits, k, x)
			}
		}
	}
	return nil
}

// flagState is a parsed command line's view: raw values by canonical key, the agents
// builder, and the control flags.
type flagState struct {
	fs      *pflag.FlagSet
	raw     map[string]*rawValue // canonical key -> values
	agents  *agentsBuilder
	config  *rawValue
	check   *bool
	help    *bool
	version *bool
	// insecureArgv lets secret keys come as flags (see secretFlags).
	insecureArgv *bool
}

// NewFlagSet returns a FlagSet holding every nexd flag, for shell completion and
// documentation generators. Load builds and parses its own.
func NewFlagSet() *pflag.FlagSet { return newFlagState(newRegistry()).fs }

func newFlagState(r *registry) *flagState {
	fs := pflag.NewFlagSet("nexd", pflag.ContinueOnError)
	fs.SortFlags = false
	fs.Usage = func() {}
	fs.SetOutput(discard{})
	st := &flagState{fs: fs, raw: map[string]*rawValue{}, agents: &agentsBuilder{}}
	for _, s := range r.specs {
		if s.kind == kAgents {
			for _, part := range []string{"uri", "argv", "env", "limits"} {
				fs.Var(&agentsPart{b: st.agents, part: part}, "agents."+part, agentsHelp[part])
			}
			continue
		}
		v := &rawValue{isBool: s.kind == kBool}
		f := fs.VarPF(v, s.flagName(), s.short, s.help)
		if v.isBool {
			f.NoOptDefVal = "true"
		}
		st.raw[s.key] = v
	}
	st.config = &rawValue{}
	fs.Var(st.config, "config", "read this JSON config file after the default ones")
	st.check = fs.Bool("check", false, "print the resolved configuration with its origins, validate it, and exit")
	st.insecureArgv = fs.Bool("insecure-argv", false, insecureArgvHelp)
	st.help = fs.BoolP("help", "h", false, "show this help")
	st.version = fs.Bool("version", false, "print version, commit and build date")
	addUpstreamFlags(fs)
	return st
}

var agentsHelp = map[string]string{
	"uri":    "start a local nexlet from file://PATH, PATH or nats://BUCKET/OBJECT[:TAG] (repeatable; starts a new agent) [$NEX_AGENTS as a JSON array]",
	"argv":   "one argument for the most recent --agents.uri (repeatable)",
	"env":    "KEY=VALUE in the environment of the most recent --agents.uri (repeatable)",
	"limits": "limits of the most recent --agents.uri: memory_max=256M,memory_high=…,cpu_max=0.5,pids_max=…",
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// scanUnknown finds command-line flags nexd does not know, before pflag (which stops
// at the first) so each gets an error with the nearest known flag.
func scanUnknown(fs *pflag.FlagSet, args []string) []FieldError {
	var names []string
	fs.VisitAll(func(f *pflag.Flag) { names = append(names, f.Name) })
	sort.Strings(names)
	var errs []FieldError
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			return errs
		case strings.HasPrefix(a, "--"):
			name, _, hasVal := strings.Cut(a[2:], "=")
			f := fs.Lookup(name)
			if f == nil {
				msg := fmt.Sprintf("unknown flag --%s", name)
				if s := nearest(name, names); s != "" {
					msg += fmt.Sprintf(" (did you mean --%s?)", s)
				}
				errs = append(errs, FieldError{Source: "command line", Msg: msg})
				continue
			}
			if !hasVal && f.NoOptDefVal == "" {
				i++ // its value
			}
		case strings.HasPrefix(a, "-") && len(a) > 1:
			for j := 1; j < len(a); j++ {
				f := fs.ShorthandLookup(a[j : j+1])
				if f == nil {
					errs = append(errs, FieldError{Source: "command line", Msg: fmt.Sprintf("unknown flag -%s", a[j:j+1])})
					break
				}
				if f.NoOptDefVal == "" {
					if j == len(a)-1 {
						i++
					}
					break
				}
			}
		}
	}
	return errs
}

// Usage is the complete --help text, grouped by heading, with each flag's default,
// its environment variable and a one-line description.
func Usage() string {
	r := newRegistry()
	type row struct{ left, right string }
	groups := map[string][]row{}
	for _, s := range r.specs {
		if s.kind == kAgents {
			for _, part := range []string{"uri", "argv", "env", "limits"} {
				groups[s.group] = append(groups[s.group], row{"    --agents." + part + " string", agentsHelp[part]})
			}
			continue
		}
		left := "    --" + s.flagName()
		if s.short != "" {
			left = "-" + s.short + ", --" + s.flagName()
		}
		switch s.kind {
		case kBool:
		case kDuration:
			left += " duration"
		case kInt:
			left += " int"
		case kFloat:
			left += " float"
		case kSize:
			left += " size"
		case kList:
			left += " strings"
		case kMap:
			left += " k=v"
		default:
			left += " string"
		}
		right := s.help
		if d := defaultText(s); d != "" {
			right += " (default " + d + ")"
		}
		right += " [$" + s.envName()
		for _, a := range s.envAliases {
			right += ", $" + a
		}
		right += "]"
		groups[s.group] = append(groups[s.group], row{left, right})
	}
	groups[gGeneral] = append(groups[gGeneral],
		row{"    --config string", "read this JSON config file after the default ones"},
		row{"    --check", "print the resolved configuration with its origins, validate it, and exit"},
		row{"    --insecure-argv", insecureArgvHelp},
		row{"-h, --help", "show this help"},
		row{"    --version", "print version, commit and build date"},
	)
	width := 0
	for _, rows := range groups {
		for _, rw := range rows {
			width = max(width, len(rw.left))
		}
	}
	var b strings.Builder
	b.WriteString("Usage: nexd [node up] [flags]\n\n")
	b.WriteString("nexd runs a Nex node. Settings come from, lowest first: defaults, /etc/nex/config.json,\n")
	b.WriteString("~/.config/nex/config.json, ./config.json, --config FILE, NEX_* environment variables, flags.\n")
	for _, g := range groupOrder {
		fmt.Fprintf(&b, "\n%s:\n", g)
		for _, rw := range groups[g] {
			fmt.Fprintf(&b, "  %-*s  %s\n", width, rw.left, rw.right)
		}
	}
	return b.String()
}

// defaultText is a key's default as help and KEYS.md show it ("" when it has none).
func defaultText(s *keySpec) string {
	if s.defText != "" {
		return s.defText
	}
	switch d := s.def.(type) {
	case nil:
		return ""
	case time.Duration:
		return d.String()
	case int64:
		if s.kind == kSize {
			return formatSize(d)
		}
	}
	return renderValue(s, s.def)
}
