package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"os/user"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/natsurl"
	"github.com/nexd-project/nexd/protocol"
)

// Where a setting came from when nothing set it.
const (
	originDefault   = "default"
	originLocalNode = "local node"
)

// natsKeys are the connection settings nexctl shares with nexd: config key, flag name
// and whether --check must hide the value.
var natsKeys = []struct {
	key, flag string
	secret    bool
}{
	{"nats.context", "nats.context", false}, {"nats.servers", "nats.servers", false},
	{"nats.creds_file", "nats.creds-file", false}, {"nats.nkey", "nats.nkey", false},
	{"nats.seed", "nats.seed", true}, {"nats.jwt", "nats.jwt", true},
	{"nats.user", "nats.user", false}, {"nats.password", "nats.password", true},
	{"nats.tlscert", "nats.tlscert", false}, {"nats.tlskey", "nats.tlskey", false},
	{"nats.tlsca", "nats.tlsca", false}, {"nats.tlsfirst", "nats.tlsfirst", false},
	{"nats.conn_name", "nats.conn-name", false}, {"nats.timeout", "nats.timeout", false},
	{"nats.jsdomain", "nats.jsdomain", false},
}

// endpointKeys say where to connect; credentials alone do not.
var credKeys = []string{"nats.creds_file", "nats.nkey", "nats.seed", "nats.jwt", "nats.user", "nats.password", "nats.tlscert", "nats.tlskey", "nats.tlsca"}

// resolution is what nexctl will use and where each value came from.
type resolution struct {
	Namespace     string
	ControlSocket string
	// TrustedNodes are the node ids whose signed bids are accepted (trusted_nodes or
	// --trusted-node); empty accepts any signer.
	TrustedNodes []string
	NATS         natsconn.Options
	// Origins maps "namespace", "control_socket" and nats.* keys to their source:
	// "flag --x", "env X", a file path, "nats context select", "local node" or "default".
	Origins map[string]string
	// Files are the config files read, lowest precedence first.
	Files []string
	// Notes are problems that did not stop the resolution (unreadable files, node-only
	// settings nexd would reject).
	Notes []string
	// Err is a problem with a setting nexctl needs; fleet commands fail with it.
	Err error
	// local is set when nothing selects a NATS system: ask the node on this host.
	local bool
	// localDenied is the local node's refusal to tell this user its NATS (not root
	// nor in group nex): a failed connection then says why nexctl had nothing better
	// than the default URL without credentials.
	localDenied error
}

// resolveInputs are what resolve reads, injectable for tests.
type resolveInputs struct {
	flags   *pflag.FlagSet // nexctl's persistent flags (only Changed ones count)
	nats    *natsFlags
	env     func(string) string
	environ []string
	load    config.LoadOptions // files and NEX_* environment
	// selected returns the NATS CLI's selected context name ("" for none).
	selected func() string
}

// resolve merges, highest first: flags; NEX_* environment; NATS_URL, NATS_CREDS and
// NATS_CONTEXT; --config FILE, ./config.json, ~/.config/nex/config.json,
// /etc/nex/config.json (nexd's layers, read by nexd's own loader); the NATS CLI's
// selected context; and, when none of these names a NATS system, the node on this host
// through its control socket. A context and servers are alternatives: the one from
// the higher source wins.
func resolve(in resolveInputs) *resolution {
	r := &resolution{Origins: map[string]string{}}
	loaded, err := config.Load(in.load)
	var cfg config.Config
	if loaded != nil && loaded.Config != nil {
		cfg = *loaded.Config
		r.Files = loaded.Files
		for _, w := range loaded.Warnings {
			// Only unreadable files concern nexctl; the rest is about running a node.
			if strings.HasPrefix(w, "skipped ") {
				r.Notes = append(r.Notes, w)
			}
		}
	}
	if err != nil {
		r.Err = clientErrors(err, &r.Notes)
	}
	origin := func(key string) string {
		if loaded == nil {
			return originDefault
		}
		if o, ok := loaded.Origins[key]; ok {
			return o
		}
		return originDefault
	}
	o := &r.NATS
	n := cfg.NATS
	*o = natsconn.Options{Context: n.Context, Servers: n.Servers, CredsFile: n.CredsFile, Nkey: n.Nkey, Seed: n.Seed,
		JWT: n.JWT, User: n.User, Password: n.Password, TLSCert: n.TLSCert, TLSKey: n.TLSKey, TLSCA: n.TLSCA,
		TLSFirst: n.TLSFirst, ConnName: n.ConnName, Timeout: n.Timeout, JSDomain: n.JSDomain}
	for _, k := range natsKeys {
		r.Origins[k.key] = origin(k.key)
	}
	// A default conn name is nexd's; nexctl names itself.
	if r.Origins["nats.conn_name"] == originDefault || o.ConnName == "" {
		o.ConnName, r.Origins["nats.conn_name"] = "nexctl", originDefault
	}
	if o.Timeout <= 0 {
		o.Timeout, r.Origins["nats.timeout"] = 5*time.Second, originDefault
	}

	// The NATS ecosystem's variables rank below NEX_* (nexd's own) and above files.
	for _, e := range []struct{ env, key string }{{"NATS_URL", "nats.servers"}, {"NATS_CREDS", "nats.creds_file"}, {"NATS_CONTEXT", "nats.context"}} {
		v := in.env(e.env)
		if v == "" || strings.HasPrefix(r.Origins[e.key], "env NEX_") {
			continue
		}
		switch e.key {
		case "nats.servers":
			o.Servers = splitList(v)
		case "nats.creds_file":
			o.CredsFile = v
		case "nats.context":
			o.Context = v
		}
		r.Origins[e.key] = "env " + e.env
	}
	in.nats.applyChanged(in.flags, o, r.Origins)

	// A context and servers exclude each other; keep the higher-ranked one.
	if o.Context != "" && len(o.Servers) > 0 {
		if r.rank(r.Origins["nats.servers"]) < r.rank(r.Origins["nats.context"]) {
			o.Context, r.Origins["nats.context"] = "", originDefault
		} else {
			o.Servers, r.Origins["nats.servers"] = nil, originDefault
		}
	}
	if o.Context == "" && len(o.Servers) == 0 && !anySet(r.Origins, credKeys) {
		if name := in.selected(); name != "" {
			o.Context, r.Origins["nats.context"] = name, "nats context select"
		} else {
			r.local = true
		}
	}

	// Namespace and control socket: flag, then nexd's layers (NEX_NAMESPACE,
	// NEX_CONTROL_SOCKET, files), then the default.
	r.Namespace, r.Origins["namespace"] = cfg.Namespace, origin("namespace")
	if r.Namespace == "" {
		r.Namespace, r.Origins["namespace"] = protocol.SystemNamespace, originDefault
	}
	if f := in.flags.Lookup("namespace"); f != nil && f.Changed {
		r.Namespace, r.Origins["namespace"] = f.Value.String(), "flag --namespace"
	}
	r.ControlSocket, r.Origins["control_socket"] = cfg.Node.ControlSocket, origin("control_socket")
	if r.ControlSocket == "" {
		r.ControlSocket, r.Origins["control_socket"] = control.DefaultSocketPath(in.env), originDefault
	}
	if f := in.flags.Lookup("control-socket"); f != nil && f.Changed {
		r.ControlSocket, r.Origins["control_socket"] = f.Value.String(), "flag --control-socket"
	}
	r.TrustedNodes, r.Origins["trusted_nodes"] = cfg.TrustedNodes, origin("trusted_nodes")
	if f := in.flags.Lookup("trusted-node"); f != nil && f.Changed {
		ids, _ := in.flags.GetStringArray("trusted-node")
		r.TrustedNodes, r.Origins["trusted_nodes"] = nil, "flag --trusted-node"
		for _, id := range ids {
			for _, one := range splitList(id) {
				if !nkeys.IsValidPublicServerKey(one) {
					r.Err = errors.Join(r.Err, usagef("--trusted-node %q: not a node id (a server public key N…)", one))
					continue
				}
				r.TrustedNodes = append(r.TrustedNodes, one)
			}
		}
	}
	return r
}

// clientErrors keeps the load errors about settings nexctl uses (and whole-file
// problems); the others are nexd's business and become notes.
func clientErrors(err error, notes *[]string) error {
	var errs config.Errors
	if !errors.As(err, &errs) {
		return err
	}
	var keep config.Errors
	other := 0
	for _, e := range errs {
		k := e.Key
		if k == "" || k == "namespace" || k == "control_socket" || k == "trusted_nodes" || strings.HasPrefix(k, "nats") {
			keep = append(keep, e)
		} else {
			other++
		}
	}
	if other > 0 {
		*notes = append(*notes, fmt.Sprintf("%d node-only setting(s) nexd would reject; run 'nexd --check'", other))
	}
	if len(keep) == 0 {
		return nil
	}
	return fmt.Errorf("configuration: %w", keep)
}

// rank orders origins, lower is stronger; a later config file beats an earlier one.
func (r *resolution) rank(origin string) int {
	switch {
	case strings.HasPrefix(origin, "flag "):
		return 0
	case strings.HasPrefix(origin, "env NEX_"):
		return 1
	case strings.HasPrefix(origin, "env "):
		return 2
	case origin == "nats context select":
		return 1000
	case origin == originDefault:
		return 1002
	}
	for i, f := range r.Files {
		if f == origin {
			return 10 + len(r.Files) - i
		}
	}
	return 1001
}

func anySet(origins map[string]string, keys []string) bool {
	for _, k := range keys {
		if origins[k] != originDefault {
			return true
		}
	}
	return false
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// selectedContext is the NATS CLI's `nats context select` choice: the first line of
// nats/context.txt under $XDG_CONFIG_HOME, else the user's ~/.config (found as the NATS
// tools find it, through the passwd entry).
func selectedContext(env func(string) string) string {
	parent := env("XDG_CONFIG_HOME")
	if parent == "" {
		u, err := user.Current()
		if err != nil || u.HomeDir == "" {
			return ""
		}
		parent = filepath.Join(u.HomeDir, ".config")
	}
	b, err := os.ReadFile(filepath.Join(parent, "nats", "context.txt"))
	if err != nil {
		return ""
	}
	name, _, _ := strings.Cut(strings.TrimSpace(string(b)), "\n")
	return strings.TrimSpace(name)
}

// localNodeWait bounds the wait for the local node's answer to where its NATS is. No
// node costs nothing (the socket refuses at once); a node that is there answers, but a
// loaded one slowly: 2 s fell back to nats://127.0.0.1:4222 while a node reloading
// every 20 ms at load ~30 answered later (e2e TestReloadDuringDeploysAndStops).
const localNodeWait = 10 * time.Second

// useLocalNode asks the node on this host how to reach its NATS system. Without a
// node it falls back to nats://127.0.0.1:4222.
func (r *resolution) useLocalNode(ctx context.Context) error {
	if !r.local {
		return nil
	}
	r.local = false
	c := control.NewClient(r.ControlSocket)
	defer c.Close()
	cctx, cancel := context.WithTimeout(ctx, localNodeWait)
	defer cancel()
	acc, err := c.NATSAccess(cctx)
	if err != nil || len(acc.Servers) == 0 {
		r.NATS.Servers, r.Origins["nats.servers"] = []string{defaultNATSURL}, originDefault
		if err != nil {
			r.Notes = append(r.Notes, fmt.Sprintf("no NATS configured and the local node did not say where its NATS is (%v)", err))
			if deniedByNode(err) {
				r.localDenied = err
			}
		}
		return nil
	}
	src := originLocalNode + " (" + r.ControlSocket + ")"
	r.NATS.Servers, r.Origins["nats.servers"] = acc.Servers, src
	if acc.Creds != "" {
		jwt, seed, err := parseCreds(acc.Creds)
		if err != nil {
			return fmt.Errorf("credential from the local node: %w", err)
		}
		r.NATS.JWT, r.NATS.Seed = jwt, seed
		r.Origins["nats.jwt"], r.Origins["nats.seed"] = src, src
	}
	return nil
}

// deniedByNode: the control socket, or the node behind it, refused this user.
func deniedByNode(err error) bool {
	var ae *control.APIError
	return errors.Is(err, fs.ErrPermission) || errors.As(err, &ae) && ae.Status == http.StatusForbidden
}

// explainDenied adds to a failed NATS connection why nexctl had no settings but the
// default ones: the local node tells its server and lends an admin credential only to
// its admins.
func (r *resolution) explainDenied(err error) error {
	if r.localDenied == nil {
		return err
	}
	return fmt.Errorf("%w; nexctl has no NATS settings and the local node tells its NATS server and lends a credential only to root and members of group nex (%v): run nexctl as one of them, or name the server and a credential (-s/--nats.servers, --nats.creds-file; an admin makes one with 'nexctl creds issue --admin')", err, r.localDenied)
}

// render prints the resolution like nexd --check: key, value, origin; secrets hidden.
func (r *resolution) render(w io.Writer) {
	o := r.NATS
	vals := map[string]string{
		"nats.context": o.Context, "nats.servers": strings.Join(natsurl.RedactAll(o.Servers), ","), "nats.creds_file": o.CredsFile,
		"nats.nkey": o.Nkey, "nats.seed": o.Seed, "nats.jwt": o.JWT, "nats.user": o.User, "nats.password": o.Password,
		"nats.tlscert": o.TLSCert, "nats.tlskey": o.TLSKey, "nats.tlsca": o.TLSCA, "nats.tlsfirst": fmt.Sprint(o.TLSFirst),
		"nats.conn_name": o.ConnName, "nats.timeout": o.Timeout.String(), "nats.jsdomain": o.JSDomain,
		"namespace": r.Namespace, "control_socket": r.ControlSocket, "trusted_nodes": strings.Join(r.TrustedNodes, ","),
	}
	secret := map[string]bool{}
	for _, k := range natsKeys {
		secret[k.key] = k.secret
	}
	keys := []string{"namespace", "control_socket", "trusted_nodes"}
	for _, k := range natsKeys {
		keys = append(keys, k.key)
	}
	rows := make([][]string, 0, len(keys))
	for _, k := range keys {
		v := vals[k]
		if secret[k] && v != "" {
			v = "[redacted]"
		}
		if v == "" {
			v = "-"
		}
		rows = append(rows, []string{k, v, r.Origins[k]})
	}
	_ = table(w, "", []string{"Setting", "Value", "From"}, rows)
	files := "none"
	if len(r.Files) > 0 {
		files = strings.Join(r.Files, ", ")
	}
	fmt.Fprintf(w, "Config files read: %s\n", files)
	notes := append([]string(nil), r.Notes...)
	sort.Strings(notes)
	for _, n := range notes {
		fmt.Fprintf(w, "Note: %s\n", n)
	}
}

// checkJSON is --check --json.
func (r *resolution) checkJSON() map[string]any {
	o := r.NATS
	red := func(s string) string {
		if s != "" {
			return "[redacted]"
		}
		return ""
	}
	settings := map[string]any{
		"namespace": r.Namespace, "control_socket": r.ControlSocket, "trusted_nodes": nonNil(r.TrustedNodes),
		"nats.context": o.Context, "nats.servers": natsurl.RedactAll(o.Servers), "nats.creds_file": o.CredsFile,
		"nats.nkey": o.Nkey, "nats.seed": red(o.Seed), "nats.jwt": red(o.JWT), "nats.user": o.User,
		"nats.password": red(o.Password), "nats.tlscert": o.TLSCert, "nats.tlskey": o.TLSKey, "nats.tlsca": o.TLSCA,
		"nats.tlsfirst": o.TLSFirst, "nats.conn_name": o.ConnName, "nats.timeout": o.Timeout.String(), "nats.jsdomain": o.JSDomain,
	}
	out := map[string]any{"settings": settings, "origins": r.Origins, "files": nonNil(r.Files), "notes": nonNil(r.Notes)}
	if r.Err != nil {
		out["error"] = r.Err.Error()
	}
	return out
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// defaultLoadOptions are nexd's file locations and the process environment, with
// nexctl's --config passed the way nexd takes it.
func defaultLoadOptions(configFile string, environ []string, env func(string) string) config.LoadOptions {
	o := config.LoadOptions{Env: environ, SystemFile: "/etc/nex/config.json"}
	if configFile != "" {
		o.Args = []string{"--config", configFile}
	}
	if dir := env("XDG_CONFIG_HOME"); dir != "" {
		o.UserFile = filepath.Join(dir, "nex", "config.json")
	} else if home := env("HOME"); home != "" {
		o.UserFile = filepath.Join(home, ".config", "nex", "config.json")
	}
	if wd, err := os.Getwd(); err == nil {
		o.LocalFile = filepath.Join(wd, "config.json")
	}
	return o
}

// parseCreds splits a .creds text into its user JWT and seed.
func parseCreds(creds string) (jwt, seed string, err error) {
	jwt, err = nkeys.ParseDecoratedJWT([]byte(creds))
	if err != nil {
		return "", "", err
	}
	kp, err := nkeys.ParseDecoratedUserNKey([]byte(creds))
	if err != nil {
		return "", "", err
	}
	defer kp.Wipe()
	s, err := kp.Seed()
	if err != nil {
		return "", "", err
	}
	return jwt, string(s), nil
}
