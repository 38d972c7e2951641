package config

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/knadh/koanf/providers/confmap"
	"github.com/knadh/koanf/providers/file"
	"github.com/knadh/koanf/providers/posflag"
	"github.com/knadh/koanf/v2"
	"github.com/spf13/pflag"

	kjson "github.com/knadh/koanf/parsers/json"

	"github.com/nexd-project/nexd/internal/natsurl"
)

// FieldError is one problem with one setting: Source is where the bad value came from
// (a file path, "env NEX_X", "flag --x", "command line"), Key is the key as written
// there (its path in the file, or the canonical key for env and flags).
type FieldError struct {
	Key    string
	Source string
	Msg    string
}

func (e FieldError) Error() string {
	var parts []string
	if e.Source != "" {
		parts = append(parts, e.Source)
	}
	if e.Key != "" {
		parts = append(parts, e.Key)
	}
	return strings.Join(append(parts, e.Msg), ": ")
}

// Errors is every problem found in one load, in the order of the layers.
type Errors []FieldError

func (e Errors) Error() string {
	lines := make([]string, len(e))
	for i, fe := range e {
		lines[i] = fe.Error()
	}
	return strings.Join(lines, "\n")
}

// LoadOptions are a load's inputs, injectable for tests. Empty file paths are skipped.
type LoadOptions struct {
	Args       []string // command-line arguments without the program name
	Env        []string // "K=V" pairs, as os.Environ returns them
	SystemFile string   // normally /etc/nex/config.json
	UserFile   string   // normally ~/.config/nex/config.json
	LocalFile  string   // normally ./config.json
	// Hostname is node_name's default; "" means os.Hostname().
	Hostname string
	// CheckInats parses an inats_config file with nats-server's parser. nexd sets it
	// (natsconn.CheckServerConfig); nil skips that check, so that nexctl, which reads the
	// same files, does not link the server.
	CheckInats func(path string) error
	// CheckCgroupDriver says why a cgroup_driver cannot work on this host (nexd sets it;
	// nil skips the check, so that nexctl, a non-root reader of the same files, passes).
	CheckCgroupDriver func(driver string) error
}

// DefaultLoadOptions are the real inputs: the process environment and the three
// default file locations.
func DefaultLoadOptions(args []string) LoadOptions {
	o := LoadOptions{Args: args, Env: os.Environ(), SystemFile: "/etc/nex/config.json", LocalFile: "config.json"}
	if dir, err := os.UserConfigDir(); err == nil {
		o.UserFile = filepath.Join(dir, "nex", "config.json")
	} else if home, err := os.UserHomeDir(); err == nil {
		o.UserFile = filepath.Join(home, ".config", "nex", "config.json")
	}
	if wd, err := os.Getwd(); err == nil {
		o.LocalFile = filepath.Join(wd, "config.json")
	}
	return o
}

// Loaded is the outcome of Load.
type Loaded struct {
	Config  *Config
	Check   bool // --check: print Render() and exit
	Help    bool // --help: print Usage() and exit
	Version bool // --version
	// Origins names, for each resolved key, where its value came from: "default",
	// "env STATE_DIRECTORY" (a default derived from systemd's environment), a file
	// path, "env NEX_X" or "flag --x".
	Origins map[string]string
	Files   []string // config files read, lowest precedence first
	// Args are the positional arguments left after the flags (e.g. "node", "up").
	Args []string
	// Warnings are things that are valid but worth saying (--check and the log).
	Warnings []string

	paths map[string]string // canonical key -> key as written at its origin
}

// layer is one source's settings, already typed.
type layer struct {
	values  map[string]any
	sources map[string]string
	paths   map[string]string
}

func newLayer() *layer {
	return &layer{values: map[string]any{}, sources: map[string]string{}, paths: map[string]string{}}
}

func (l *layer) put(key, source, path string, v any) {
	l.values[key], l.sources[key], l.paths[key] = v, source, path
}

type loader struct {
	r        *registry
	opts     LoadOptions
	errs     Errors
	warnings []string
	files    []string
}

// Load resolves the configuration: defaults < SystemFile < UserFile < LocalFile <
// --config FILE < NEX_* environment < flags. A missing default file is skipped; a
// missing --config file is an error. On any problem the error is an Errors holding
// all of them, and the returned Loaded still holds what did resolve (for --check).
func Load(opts LoadOptions) (*Loaded, error) {
	ld := &loader{r: newRegistry(), opts: opts}
	st := newFlagState(ld.r)
	flagErrs := scanUnknown(st.fs, opts.Args)
	ld.errs = append(ld.errs, flagErrs...)
	st.fs.ParseErrorsAllowlist.UnknownFlags = true
	parsed := true
	if err := st.fs.Parse(opts.Args); err != nil {
		ld.errs = append(ld.errs, FieldError{Source: "command line", Msg: err.Error()})
		parsed = false
	}
	out := &Loaded{Check: *st.check, Help: *st.help, Version: *st.version, Args: st.fs.Args()}
	if parsed {
		ld.warnings = append(ld.warnings, upstreamFlagNotices(st.fs)...)
	}

	k := koanf.New(".")
	origins, paths := map[string]string{}, map[string]string{}
	apply := func(l *layer) {
		if len(l.values) == 0 {
			return
		}
		// Typed leaves ([]Agent, map[string]string, time.Duration) stay whole in koanf,
		// so a later layer replaces a map or list instead of merging into it.
		if err := k.Load(confmap.Provider(l.values, "."), nil); err != nil {
			ld.errs = append(ld.errs, FieldError{Msg: "merging settings: " + err.Error()})
			return
		}
		for key := range l.values {
			origins[key], paths[key] = l.sources[key], l.paths[key]
		}
	}
	apply(ld.defaults())

	if out.Help || out.Version {
		out.Config, out.Origins, out.paths = ld.build(k), origins, paths
		return out, nil
	}

	for _, f := range []string{opts.SystemFile, opts.UserFile, opts.LocalFile} {
		if f == "" {
			continue
		}
		if f == opts.LocalFile {
			if ok, why := localFileUsable(f); !ok {
				ld.warnings = append(ld.warnings, why)
				continue
			}
		}
		apply(ld.file(f, false))
	}
	if parsed && len(st.config.vals) > 0 {
		apply(ld.file(st.config.String(), true))
	}
	apply(ld.env())
	if parsed {
		fl := ld.flags(st)
		cb := func(f *pflag.Flag) (string, any) {
			key := strings.ReplaceAll(f.Name, "-", "_")
			if f.Name == "agents.uri" {
				key = "agents"
			}
			if v, ok := fl.values[key]; ok && f.Changed {
				return key, v
			}
			return "", nil
		}
		if err := k.Load(posflag.ProviderWithFlag(st.fs, ".", k, cb), nil); err != nil {
			ld.errs = append(ld.errs, FieldError{Source: "command line", Msg: err.Error()})
		}
		for key := range fl.values {
			origins[key], paths[key] = fl.sources[key], fl.paths[key]
		}
		if !*st.insecureArgv {
			ld.errs = append(ld.errs, secretFlags(ld.r, fl)...)
		}
	}

	cfg := ld.build(k)
	if _, ok := origins["logger.file"]; !ok {
		cfg.Logger.File = "nexd.log"
		if cfg.Node.StateDir != "" {
			cfg.Logger.File = filepath.Join(cfg.Node.StateDir, "nexd.log")
		}
		origins["logger.file"], paths["logger.file"] = "default", "logger.file"
	}
	if _, ok := origins["runtime_dir"]; !ok && cfg.Node.StateDir != "" {
		cfg.Node.RuntimeDir = filepath.Join(cfg.Node.StateDir, "run")
		origins["runtime_dir"], paths["runtime_dir"] = "default", "runtime_dir"
	}
	out.Config, out.Origins, out.paths, out.Files = cfg, origins, paths, ld.files
	v := &validator{r: ld.r, cfg: cfg, origins: origins, paths: paths, checkInats: opts.CheckInats,
		checkDriver: opts.CheckCgroupDriver}
	v.validate()
	ld.errs = append(ld.errs, v.errs...)
	out.Warnings = append(ld.warnings, v.warnings...)
	if len(ld.errs) > 0 {
		return out, ld.errs
	}
	return out, nil
}

// build assembles a Config from the merged settings.
func (ld *loader) build(k *koanf.Koanf) *Config {
	cfg := &Config{}
	for _, s := range ld.r.specs {
		if v := k.Get(s.key); v != nil {
			s.set(cfg, v)
		}
	}
	if cfg.Node.Tags == nil {
		cfg.Node.Tags = map[string]string{}
	}
	return cfg
}

// defaults is the lowest layer. A few defaults follow the environment systemd sets up
// for the unit (StateDirectory=, RuntimeDirectory=); their origin says so.
func (ld *loader) defaults() *layer {
	l := newLayer()
	for _, s := range ld.r.specs {
		if s.def != nil {
			l.put(s.key, "default", s.key, s.def)
		}
	}
	host := ld.opts.Hostname
	if host == "" {
		host, _ = os.Hostname()
	}
	if host == "" {
		host = "nexd"
	}
	l.put("node_name", "default", "node_name", host)
	if dir := firstPath(lookupEnv(ld.opts.Env, "STATE_DIRECTORY")); dir != "" {
		l.put("state_dir", "env STATE_DIRECTORY", "state_dir", dir)
	}
	if dir := firstPath(lookupEnv(ld.opts.Env, "RUNTIME_DIRECTORY")); dir != "" {
		l.put("runtime_dir", "env RUNTIME_DIRECTORY", "runtime_dir", dir)
		l.put("control_socket", "env RUNTIME_DIRECTORY", "control_socket", filepath.Join(dir, "nexd.sock"))
	} else {
		l.put("control_socket", "default", "control_socket", "/run/nex/nexd.sock")
	}
	return l
}

// firstPath is the first of systemd's colon-separated directory list.
func firstPath(s string) string {
	first, _, _ := strings.Cut(s, ":")
	return first
}

// file reads one JSON config file in either layout.
func (ld *loader) file(path string, required bool) *layer {
	l := newLayer()
	b, err := file.Provider(path).ReadBytes()
	if err != nil {
		if !required && errors.Is(err, fs.ErrNotExist) {
			return l
		}
		if !required && errors.Is(err, fs.ErrPermission) {
			ld.warnings = append(ld.warnings, fmt.Sprintf("skipped %s: %v", path, err))
			return l
		}
		ld.errs = append(ld.errs, FieldError{Source: path, Msg: "cannot read config file: " + unwrapPathErr(err)})
		return l
	}
	ld.files = append(ld.files, path)
	if len(bytes.TrimSpace(b)) == 0 {
		return l
	}
	mp, err := kjson.Parser().Unmarshal(b)
	if err != nil {
		ld.errs = append(ld.errs, FieldError{Source: path, Msg: jsonErrMsg(b, err)})
		return l
	}
	fw := &fileWalker{ld: ld, l: l, source: path}
	fw.top(mp)
	if keys := ld.secretKeysIn(l); len(keys) > 0 {
		if fi, err := os.Stat(path); err == nil {
			problem, warning := checkSecretFile(path, strings.Join(keys, ", "), fi)
			if problem != "" {
				ld.errs = append(ld.errs, FieldError{Source: path, Msg: problem})
			}
			if warning != "" {
				ld.warnings = append(ld.warnings, warning)
			}
		}
	}
	return l
}

func unwrapPathErr(err error) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err.Error()
	}
	return err.Error()
}

// jsonErrMsg turns a JSON decoding error into a message with line, column and byte
// offset.
func jsonErrMsg(b []byte, err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		line, col := lineCol(b, se.Offset)
		return fmt.Sprintf("invalid JSON at line %d, column %d (byte %d): %v", line, col, se.Offset, se)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) && te.Field == "" {
		return fmt.Sprintf("expected a JSON object at the top level, got %s", articled(te.Value))
	}
	return "invalid JSON: " + err.Error()
}

func articled(v string) string {
	if v == "array" || v == "object" {
		return "an " + v
	}
	return "a " + v
}

func lineCol(b []byte, off int64) (int, int) {
	if off > int64(len(b)) {
		off = int64(len(b))
	}
	line, col := 1, 1
	for _, c := range b[:max(off-1, 0)] {
		if c == '\n' {
			line, col = line+1, 1
		} else {
			col++
		}
	}
	return line, col
}

// fileWalker maps a parsed file onto canonical keys, accepting the nested layout
// ({"node": {"up": {...}}, "nats": {...}, "logger": {...}}), the flat one (node keys at
// the top level) and dotted group keys ("nats.servers").
type fileWalker struct {
	ld     *loader
	l      *layer
	source string
}

func (w *fileWalker) errAt(path, msg string) {
	w.ld.errs = append(w.ld.errs, FieldError{Key: path, Source: w.source, Msg: msg})
}

func (w *fileWalker) names(ok func(*keySpec) bool, extra ...string) []string {
	var out []string
	for _, s := range w.ld.r.specs {
		if ok(s) {
			out = append(out, s.key)
		}
	}
	return append(out, extra...)
}

func (w *fileWalker) top(mp map[string]any) {
	for _, k := range sortedKeys(mp) {
		v := mp[k]
		switch k {
		case "node":
			w.node(v)
		case "nats", "logger":
			w.group(k, v)
		case "native_limits":
			w.limits(k, v)
		default:
			if s := w.ld.r.byKey[k]; s != nil {
				w.set(s, k, v)
				continue
			}
			if w.upstream(k, k) {
				continue
			}
			w.errAt(k, unknownMsg(k, w.names(func(*keySpec) bool { return true }, "node", "nats", "logger", "native_limits")))
		}
	}
}

func (w *fileWalker) object(path string, v any, want string) (map[string]any, bool) {
	obj, ok := v.(map[string]any)
	if !ok {
		w.errAt(path, fmt.Sprintf("expected an object %s, got %s", want, jsonType(v)))
	}
	return obj, ok
}

func (w *fileWalker) node(v any) {
	obj, ok := w.object("node", v, "such as {\"up\": {...}}")
	if !ok {
		return
	}
	for _, k := range sortedKeys(obj) {
		if k != "up" {
			if s := w.ld.r.byKey[k]; s != nil && s.scope == scopeNode {
				w.errAt("node."+k, fmt.Sprintf("unknown key %q: node settings go under \"node\": {\"up\": {...}} or at the top level", k))
			} else {
				w.errAt("node."+k, unknownMsg(k, []string{"up"}))
			}
			continue
		}
		up, ok := w.object("node.up", obj[k], "of node settings")
		if !ok {
			continue
		}
		for _, k2 := range sortedKeys(up) {
			path := "node.up." + k2
			if k2 == "native_limits" {
				w.limits(path, up[k2])
				continue
			}
			if s := w.ld.r.byKey[k2]; s != nil {
				if s.scope == scopeNode {
					w.set(s, path, up[k2])
				} else {
					w.errAt(path, fmt.Sprintf("%q is not a node setting: put it at the top level of the file", k2))
				}
				continue
			}
			if w.upstream(k2, path) {
				continue
			}
			w.errAt(path, unknownMsg(k2, w.names(func(s *keySpec) bool { return s.scope == scopeNode }, "native_limits")))
		}
	}
}

func (w *fileWalker) group(name string, v any) {
	obj, ok := w.object(name, v, "of "+name+" settings")
	if !ok {
		return
	}
	var known []string
	for _, s := range w.ld.r.specs {
		if strings.HasPrefix(s.key, name+".") {
			known = append(known, s.fileName())
		}
	}
	for _, k := range sortedKeys(obj) {
		if s := w.ld.r.byKey[name+"."+k]; s != nil {
			w.set(s, name+"."+k, obj[k])
			continue
		}
		if w.upstream(name+"."+k, name+"."+k) {
			continue
		}
		w.errAt(name+"."+k, unknownMsg(k, known))
	}
}

// upstream accepts an upstream-only key with a notice; false when key is not one.
func (w *fileWalker) upstream(key, path string) bool {
	n := upstreamNotice(key)
	if n == "" {
		return false
	}
	w.ld.warnings = append(w.ld.warnings, fmt.Sprintf("%s: %s%s", w.source, path, strings.TrimPrefix(n, key)))
	return true
}

func (w *fileWalker) limits(path string, v any) {
	obj, ok := w.object(path, v, "with memory_max, memory_high, cpu_max, pids_max")
	if !ok {
		return
	}
	for _, k := range sortedKeys(obj) {
		if s := w.ld.r.byKey["native_limits."+k]; s != nil {
			w.set(s, path+"."+k, obj[k])
			continue
		}
		w.errAt(path+"."+k, unknownMsg(k, limitsKeys))
	}
}

func (w *fileWalker) set(s *keySpec, path string, raw any) {
	if prev, dup := w.l.paths[s.key]; dup {
		w.errAt(path, fmt.Sprintf("%s is also set as %q in this file; give it once", s.key, prev))
		return
	}
	v, ps := decodeJSON(s, raw)
	for _, p := range ps {
		w.errAt(path+p.sub, p.msg)
	}
	if ps == nil {
		w.l.put(s.key, w.source, path, v)
	}
}

// env reads NEX_<KEY> variables (and a key's older alias names, which NEX_<KEY>
// overrides). Unknown NEX_ names are ignored: workloads and nexctl use that prefix too.
// An empty value counts as unset.
func (ld *loader) env() *layer {
	l := newLayer()
	var ordered []string
	for _, alias := range []bool{true, false} {
		for _, kv := range ld.opts.Env {
			name, val, ok := strings.Cut(kv, "=")
			if !ok || val == "" {
				continue
			}
			if s := ld.r.byEnv[name]; s != nil && (name != s.envName()) == alias {
				ordered = append(ordered, kv)
			}
		}
	}
	for _, kv := range ordered {
		name, val, _ := strings.Cut(kv, "=")
		s := ld.r.byEnv[name]
		src := "env " + name
		v, ps := decodeText(s, []string{val})
		if ps != nil {
			for _, p := range ps {
				ld.errs = append(ld.errs, FieldError{Key: s.key + p.sub, Source: src, Msg: p.msg})
			}
			continue
		}
		l.put(s.key, src, s.key, v)
	}
	return l
}

// flags decodes the flags the user set.
func (ld *loader) flags(st *flagState) *layer {
	l := newLayer()
	for _, key := range sortedKeys(st.raw) {
		s := ld.r.byKey[key]
		f := st.fs.Lookup(s.flagName())
		if f == nil || !f.Changed {
			continue
		}
		src := "flag --" + s.flagName()
		v, ps := decodeText(s, st.raw[key].vals)
		for _, p := range ps {
			ld.errs = append(ld.errs, FieldError{Key: key + p.sub, Source: src, Msg: p.msg})
		}
		if ps == nil {
			l.put(key, src, key, v)
		}
	}
	ld.errs = append(ld.errs, st.agents.probs...)
	if len(st.agents.agents) > 0 {
		l.put("agents", "flag --agents.uri", "agents", cloneAgents(st.agents.agents))
	}
	return l
}

const insecureArgvHelp = "take secrets (seeds, keys, passwords, a password in a server URL) as flags, where every local user reads them in /proc/<pid>/cmdline"

// secretFlags refuses the secret keys given as flags, and server URLs with userinfo
// (nats.servers, nats.leaf_remote):
// a process's command line is world-readable (/proc/<pid>/cmdline) for as long as it
// runs, and nexd runs for good, so every local user and workload read the node's
// seed, issuer signing key or NATS password there. The environment (0400, the
// process's own uid) and a config file (checked at start) keep them.
func secretFlags(r *registry, fl *layer) []FieldError {
	var errs []FieldError
	for _, key := range sortedKeys(fl.values) {
		s := r.byKey[key]
		if s == nil {
			continue
		}
		secret := s.secret
		switch v := fl.values[key].(type) {
		case []string: // nats.servers
			secret = secret || key == "nats.servers" && slices.ContainsFunc(v, func(u string) bool { return natsurl.Strip(u) != u })
		case string: // nats.leaf_remote
			secret = secret || key == "nats.leaf_remote" && natsurl.Strip(v) != v
		}
		if !secret {
			continue
		}
		what := "a secret"
		if !s.secret {
			what = "a server URL with a user or password"
		}
		errs = append(errs, FieldError{Key: key, Source: fl.sources[key], Msg: fmt.Sprintf(
			"%s on the command line is read by every local user in /proc/<pid>/cmdline while nexd runs: set $%s or %s in a config file (0600), or give --insecure-argv",
			what, s.envName(), key)})
	}
	return errs
}
