package config

import (
	"errors"
	"fmt"
	"math"
	"net"
	"net/url"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/natsurl"
	"github.com/nexd-project/nexd/protocol"
)

// validator checks the resolved configuration as a whole and attributes each problem
// to the layer the offending value came from.
type validator struct {
	r        *registry
	cfg      *Config
	origins  map[string]string
	paths    map[string]string
	errs     Errors
	warnings []string
	// checkInats parses a nats-server config file (LoadOptions.CheckInats).
	checkInats func(path string) error
	// checkDriver vets cgroup_driver on this host (LoadOptions.CheckCgroupDriver).
	checkDriver func(driver string) error
}

// Compiled on first use, not at init: every package's init runs in nexd and in the
// native nexlet alike, used or not.
var userNameRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_.-]{0,31}$`) })

func parseRange(s string) (uint64, uint64, bool) {
	a, b, ok := strings.Cut(s, "-")
	lo, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	hi, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	return lo, hi, ok && err1 == nil && err2 == nil
}

func (v *validator) fail(key, sub, msg string) {
	path := v.paths[key]
	if path == "" {
		path = key
	}
	v.errs = append(v.errs, FieldError{Key: path + sub, Source: v.origins[key], Msg: msg})
}

func (v *validator) validate() {
	c := v.cfg
	n := &c.Node
	v.subjectToken("namespace", c.Namespace)
	for i, id := range c.TrustedNodes {
		if !nkeys.IsValidPublicServerKey(id) {
			v.fail("trusted_nodes", fmt.Sprintf("[%d]", i), fmt.Sprintf("expected a node id (server public key N…), got %s", describeKey(id)))
		}
	}
	v.subjectToken("nexus", n.Nexus)
	if strings.TrimSpace(n.Name) == "" {
		v.fail("node_name", "", "must not be empty")
	} else if err := protocol.CheckName("node name", n.Name); err != nil {
		v.fail("node_name", "", err.Error())
	}
	v.seed("node_seed", n.Seed, nkeys.PrefixByteServer)
	v.seed("node_xkey_seed", n.XKeySeed, nkeys.PrefixByteCurve)
	for _, k := range sortedKeys(n.Tags) {
		switch {
		case strings.TrimSpace(k) == "":
			v.fail("tags", "", "a tag needs a non-empty key")
		case strings.HasPrefix(strings.ToLower(k), "nex."):
			v.fail("tags", "."+k, fmt.Sprintf("tag %q uses the reserved prefix \"nex.\"", k))
		}
	}
	if n.AgentRestartLimit < 0 {
		v.fail("agent_restart_limit", "", fmt.Sprintf("must be 0 or more, got %d", n.AgentRestartLimit))
	}
	for i, a := range n.Agents {
		at := fmt.Sprintf("[%d]", i)
		if strings.TrimSpace(a.URI) == "" {
			v.fail("agents", at+".uri", "every agent needs a uri (file://PATH, PATH or nats://BUCKET/OBJECT)")
		}
		for _, k := range sortedKeys(a.Env) {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				v.fail("agents", at+".env", fmt.Sprintf("invalid environment variable name %q", k))
			}
		}
		v.limits("agents", at+".limits", a.Limits)
	}
	v.limits("native_limits", "", n.NativeLimits)
	if n.WorkloadsPidsMax < -1 {
		v.fail("workloads_pids_max", "", "must be -1 (no limit), 0 (auto) or more")
	} else if n.WorkloadsPidsMax > pidMaxLimit {
		// The kernel refuses a pids.max above its PID_MAX_LIMIT (EINVAL), which would
		// leave the workloads with no common bound and only a log line to say so.
		v.fail("workloads_pids_max", "", fmt.Sprintf("must be at most %d (the kernel's largest pid limit), got %d", pidMaxLimit, n.WorkloadsPidsMax))
	}
	if n.NativeMaxWorkloads < 0 {
		v.fail("native_max_workloads", "", fmt.Sprintf("must be 0 (no bound) or more, got %d", n.NativeMaxWorkloads))
	}
	if f := c.NATS.CredsFile; f != "" {
		if fi, err := os.Stat(f); err == nil {
			problem, warning := checkSecretFile(f, "NATS credentials (nats.creds_file)", fi)
			if problem != "" {
				v.fail("nats.creds_file", "", problem)
			}
			if warning != "" {
				v.warnings = append(v.warnings, warning)
			}
		}
	}
	for i, list := range c.NATS.Servers {
		for _, s := range strings.Split(list, ",") {
			v.serverURL(fmt.Sprintf("[%d]", i), strings.TrimSpace(s))
		}
	}
	if r := c.NATS.LeafRemote; r != "" {
		u, err := url.Parse(r)
		switch {
		case err != nil || u.Host == "" || !slices.Contains([]string{"nats", "nats-leaf", "tls", "ws", "wss"}, u.Scheme):
			v.fail("nats.leaf_remote", "", fmt.Sprintf("want a URL like nats-leaf://hub.example.com:7422 (schemes nats, nats-leaf, tls, ws, wss), got %q", natsurl.Redact(r)))
		case len(c.NATS.Servers) > 0 || c.NATS.Context != "" || n.InatsConfig != "":
			v.fail("nats.leaf_remote", "", "makes nexd's own embedded server a leaf node, so it cannot go with nats.servers, nats.context or inats_config (with inats_config, put leafnodes.remotes in that file)")
		case c.NATS.JSDomain == "":
			v.fail("nats.leaf_remote", "", "needs nats.jsdomain: the site's own JetStream domain, unique per site, so its state stays on the site's server")
		}
	} else if c.NATS.LeafCreds != "" {
		v.fail("nats.leaf_creds", "", "is used only with nats.leaf_remote")
	}
	for i, u := range n.WorkloadUsers {
		if !userNameRE().MatchString(u) {
			v.fail("workload_users", fmt.Sprintf("[%d]", i), fmt.Sprintf("%q is not a user name (letters, digits, '_', '-', '.', at most 32)", u))
		} else if u == "root" && !n.AllowRootWorkloads {
			v.fail("workload_users", fmt.Sprintf("[%d]", i), "root is allowed only with allow_root_workloads")
		}
	}
	if lo, hi, ok := parseRange(n.WorkloadUIDRange); !ok || lo == 0 || hi < lo || hi >= 1<<31 {
		v.fail("workload_uid_range", "", fmt.Sprintf("want MIN-MAX with 0 < MIN <= MAX < 2147483648 (e.g. 61184-65519), got %q", n.WorkloadUIDRange))
	}
	if p := n.EmbeddedNATSPort; p < -1 || p > 65535 {
		v.fail("embedded_nats_port", "", fmt.Sprintf("must be a port number (1-65535), or 0 or -1 for any free port; got %d", p))
	}
	if g := n.GoGCPercent; g < -1 {
		v.fail("go_gc_percent", "", fmt.Sprintf("must be a percentage above 0, -1 (collector off) or 0 (nexd's default); got %d", g))
	}
	if r := n.StateReplicas; r < 0 || r > 5 {
		v.fail("state_replicas", "", fmt.Sprintf("must be 1-5 (JetStream's limit), or 0 to follow the cluster's size; got %d", r))
	}
	v.enum("state", n.State)
	v.enum("events", n.Events)
	v.enum("control_allow_others", n.ControlAllowOthers)
	v.enum("cgroup_driver", n.CgroupDriver)
	if v.checkDriver != nil && slices.Contains(v.r.byKey["cgroup_driver"].enum, n.CgroupDriver) {
		if err := v.checkDriver(n.CgroupDriver); err != nil {
			v.fail("cgroup_driver", "", fmt.Sprintf("%q cannot be used here: %v; use \"cgroupfs\"", n.CgroupDriver, err))
		}
	}
	v.enum("logger.level", c.Logger.Level)
	v.enum("logger.format", c.Logger.Format)
	seen := map[string]bool{}
	for i, t := range c.Logger.Target {
		if !slices.Contains([]string{"std", "file", "journal", "nats"}, t) {
			v.fail("logger.target", fmt.Sprintf("[%d]", i), fmt.Sprintf("invalid value %q: expected one of std, file, journal, nats", t))
		} else if seen[t] {
			v.fail("logger.target", fmt.Sprintf("[%d]", i), fmt.Sprintf("%q is listed twice", t))
		}
		seen[t] = true
	}
	if seen["file"] && strings.TrimSpace(c.Logger.File) == "" {
		v.fail("logger.file", "", "the file log target needs a file")
	}
	v.positive("auction_ttl", n.AuctionTTL.Seconds(), true)
	v.positive("nats.timeout", c.NATS.Timeout.Seconds(), true)
	v.positive("stop_grace", n.StopGrace.Seconds(), false)
	if n.WorkloadCredsTTL < time.Second {
		// Shorter users would expire before a workload could even connect.
		v.fail("workload_creds_ttl", "", fmt.Sprintf("must be 1s or more, got %s", n.WorkloadCredsTTL))
	}
	if n.NexletCredsTTL < time.Second {
		v.fail("nexlet_creds_ttl", "", fmt.Sprintf("must be 1s or more, got %s", n.NexletCredsTTL))
	}
	v.positive("startup_timeout", n.StartupTimeout.Seconds(), false)
	v.positive("deploy_timeout", n.DeployTimeout.Seconds(), false)
	if n.MetricsListen != "" {
		if _, port, err := net.SplitHostPort(n.MetricsListen); err != nil {
			v.fail("metrics_listen", "", fmt.Sprintf("expected host:port such as 127.0.0.1:9090, got %q", n.MetricsListen))
		} else if p, err := strconv.ParseUint(port, 10, 16); err != nil || (p == 0 && port != "0") {
			v.fail("metrics_listen", "", fmt.Sprintf("invalid port %q", port))
		}
	}
	if n.InatsConfig != "" {
		v.inats(n.InatsConfig)
	}
	v.issuer()
	v.natsAuth()
	if n.LiveRestore && (n.State != "kv" || n.StateDir == "") {
		v.warnings = append(v.warnings, "live_restore without state kv and a state_dir: workloads keep running when nexd stops, but the next nexd has no record of them and leaves them unmanaged")
	}
	v.directFeeds()
}

// directFeeds warns of each nexlet on upstream's SDK whose feeds the server will refuse:
// nexd mints scoped users (a signing key, given or the zero-config embedded server's)
// and allow_nexlet_direct_feeds is off.
func (v *validator) directFeeds() {
	n := &v.cfg.Node
	issuer := n.IssuerSigningKey != "" || n.IssuerSigningKeyRootAccount != "" || n.IssuerNkey != "" || n.IssuerNkeySeed != ""
	scoped := n.IssuerSigningKey != "" || (!issuer && n.InatsConfig == "" && !v.cfg.NATS.Configured())
	if !scoped || n.AllowNexletDirectFeeds {
		return
	}
	for i, a := range n.Agents {
		if a.UnsignedRegistration {
			v.warnings = append(v.warnings, fmt.Sprintf("agents[%d] (%s): unsigned_registration (upstream's SDK) without allow_nexlet_direct_feeds: the server refuses its workloads' logs, metrics and events, and the node hears its workloads end only by listing it (a job that ends within a list period of the nexlet's crash runs again when it registers again)", i, a.URI))
		}
	}
}

// subjectToken checks a value used as one token of NATS subjects.
func (v *validator) subjectToken(key, val string) {
	if val == "" {
		v.fail(key, "", "must not be empty")
		return
	}
	if strings.ContainsAny(val, ".*> \t\r\n") {
		v.fail(key, "", fmt.Sprintf("%q cannot be used in NATS subjects: no dots, wildcards or spaces", val))
	}
}

func (v *validator) enum(key, val string) {
	s := v.r.byKey[key]
	if slices.Contains(s.enum, val) {
		return
	}
	q := make([]string, len(s.enum))
	for i, e := range s.enum {
		q[i] = strconv.Quote(e)
	}
	v.fail(key, "", fmt.Sprintf("invalid value %q: expected one of %s", val, strings.Join(q, ", ")))
}

func (v *validator) positive(key string, secs float64, strict bool) {
	if secs < 0 || (strict && secs == 0) {
		want := "0 or more"
		if strict {
			want = "more than 0"
		}
		v.fail(key, "", fmt.Sprintf("must be %s", want))
	}
}

func (v *validator) limits(key, sub string, l Limits) {
	at := func(f string) string {
		if key == "native_limits" {
			return "." + f // native_limits.x are keys of their own; attribute to each
		}
		return sub + "." + f
	}
	fail := func(f, msg string) {
		if key == "native_limits" {
			v.fail("native_limits."+f, "", msg)
			return
		}
		v.fail(key, at(f), msg)
	}
	if l.MemoryMax < 0 {
		fail("memory_max", "must be 0 (no limit) or more")
	}
	if l.MemoryHigh < 0 {
		fail("memory_high", "must be 0 (no limit) or more")
	}
	if l.MemoryMax > 0 && l.MemoryHigh > l.MemoryMax {
		fail("memory_high", fmt.Sprintf("%s is above memory_max %s", formatSize(l.MemoryHigh), formatSize(l.MemoryMax)))
	}
	if l.CPUMax < 0 || math.IsNaN(l.CPUMax) || math.IsInf(l.CPUMax, 0) {
		fail("cpu_max", fmt.Sprintf("must be a number of CPUs of 0 (no limit) or more, got %v", l.CPUMax))
	}
	if l.PidsMax < 0 {
		fail("pids_max", "must be 0 (no limit) or more")
	}
}

// maxInatsConfig bounds what we hand nats-server's parser, which reads the whole file.
const maxInatsConfig = 4 << 20

func (v *validator) inats(path string) {
	fi, err := os.Stat(path)
	switch {
	case err != nil:
		v.fail("inats_config", "", fmt.Sprintf("cannot read nats-server config %q: %v", path, unwrapPathErr(err)))
		return
	case !fi.Mode().IsRegular():
		v.fail("inats_config", "", fmt.Sprintf("%q is not a regular file", path))
		return
	case fi.Size() > maxInatsConfig:
		v.fail("inats_config", "", fmt.Sprintf("%q is larger than %d bytes", path, maxInatsConfig))
		return
	}
	// The parse lives behind a hook so this package does not link nats-server (nexctl
	// reads configs through it).
	if v.checkInats == nil {
		return
	}
	if err := v.checkInats(path); err != nil {
		var w InatsWarning
		if errors.As(err, &w) {
			v.warnings = append(v.warnings, fmt.Sprintf("inats_config %s: %s", path, w.Msg))
			return
		}
		v.fail("inats_config", "", fmt.Sprintf("nats-server cannot use %q: %v", path, err))
	}
}

// InatsWarning is what a CheckInats hook returns for a file nats-server accepts but
// that deserves a warning (it configures no authentication).
type InatsWarning struct{ Msg string }

func (w InatsWarning) Error() string { return w.Msg }

var keyKinds = map[nkeys.PrefixByte]struct{ article, name, letter string }{
	nkeys.PrefixByteServer:   {"a", "server", "N"},
	nkeys.PrefixByteCurve:    {"a", "curve", "X"},
	nkeys.PrefixByteAccount:  {"an", "account", "A"},
	nkeys.PrefixByteUser:     {"a", "user", "U"},
	nkeys.PrefixByteOperator: {"an", "operator", "O"},
	nkeys.PrefixByteCluster:  {"a", "cluster", "C"},
}

func seedName(p nkeys.PrefixByte) string {
	k := keyKinds[p]
	return fmt.Sprintf("%s %s seed (S%s…)", k.article, k.name, k.letter)
}

func pubName(p nkeys.PrefixByte) string {
	k := keyKinds[p]
	return fmt.Sprintf("a public %s key (%s…)", k.name, k.letter)
}

// describeKey names what kind of nkey s is, never echoing it (it may be a secret).
// serverURL checks a nats.servers URL as nats.go reads it (no scheme: nats://), so
// that a bad one is named here, redacted: nats.go's own error quotes it whole, userinfo
// and all, at every connect attempt.
func (v *validator) serverURL(at, s string) {
	if s == "" {
		return
	}
	full := s
	if !strings.Contains(s, "://") {
		full = "nats://" + s
	}
	u, err := url.Parse(full)
	if ue := (*url.Error)(nil); errors.As(err, &ue) {
		err = ue.Err // not the URL
	}
	switch {
	case err != nil:
		v.fail("nats.servers", at, fmt.Sprintf("want a server URL like nats://host:4222, got %q: %v", natsurl.Redact(s), err))
	case u.Host == "":
		v.fail("nats.servers", at, fmt.Sprintf("want a server URL like nats://host:4222, got %q: no host", natsurl.Redact(s)))
	}
}

func describeKey(s string) string {
	if p, _, err := nkeys.DecodeSeed([]byte(s)); err == nil {
		if _, ok := keyKinds[p]; ok {
			return seedName(p)
		}
	}
	if nkeys.IsValidPublicKey(s) {
		if p := nkeys.Prefix(s); keyKinds[p].name != "" {
			return pubName(p)
		}
	}
	return "a value that is not a valid nkey"
}

func (v *validator) seed(key, val string, want nkeys.PrefixByte) bool {
	if val == "" {
		return false
	}
	if p, _, err := nkeys.DecodeSeed([]byte(val)); err == nil && p == want {
		return true
	}
	v.fail(key, "", fmt.Sprintf("expected %s, got %s", seedName(want), describeKey(val)))
	return false
}

func (v *validator) pub(key, val string, want nkeys.PrefixByte) bool {
	if val == "" {
		return false
	}
	if nkeys.IsValidPublicKey(val) && nkeys.Prefix(val) == want {
		return true
	}
	v.fail(key, "", fmt.Sprintf("expected %s, got %s", pubName(want), describeKey(val)))
	return false
}

// matches checks that a public key belongs to a seed.
func (v *validator) matches(pubKey, pub, seedKey, seed string) {
	kp, err := nkeys.FromSeed([]byte(seed))
	if err != nil {
		return
	}
	if got, err := kp.PublicKey(); err == nil && got != pub {
		v.fail(pubKey, "", fmt.Sprintf("does not belong to %s (its public key is %s)", seedKey, got))
	}
}

func (v *validator) issuer() {
	n := &v.cfg.Node
	v.seed("issuer_signing_key", n.IssuerSigningKey, nkeys.PrefixByteAccount)
	v.pub("issuer_signing_key_root_account", n.IssuerSigningKeyRootAccount, nkeys.PrefixByteAccount)
	okNK := v.pub("issuer_nkey", n.IssuerNkey, nkeys.PrefixByteUser)
	okNS := v.seed("issuer_nkey_seed", n.IssuerNkeySeed, nkeys.PrefixByteUser)
	sk, ra := n.IssuerSigningKey != "", n.IssuerSigningKeyRootAccount != ""
	nk, ns := n.IssuerNkey != "", n.IssuerNkeySeed != ""
	if sk && !ra {
		v.fail("issuer_signing_key", "", "needs issuer_signing_key_root_account (the public key A… of the account it signs for)")
	}
	if ra && !sk {
		v.fail("issuer_signing_key_root_account", "", "needs issuer_signing_key (the account signing key seed, SA…)")
	}
	if nk && !ns {
		v.fail("issuer_nkey", "", "needs issuer_nkey_seed (the user seed SU… of this key)")
	}
	if ns && !nk {
		v.fail("issuer_nkey_seed", "", "needs issuer_nkey (the public user key U… of this seed)")
	}
	if (sk || ra) && (nk || ns) {
		key := "issuer_nkey"
		if !nk {
			key = "issuer_nkey_seed"
		}
		v.fail(key, "", "give one credential issuer: issuer_signing_key with issuer_signing_key_root_account, or issuer_nkey with issuer_nkey_seed, not both")
	}
	if okNK && okNS {
		v.matches("issuer_nkey", n.IssuerNkey, "issuer_nkey_seed", n.IssuerNkeySeed)
	}
	switch {
	case nk && !(sk || ra):
		v.warnings = append(v.warnings, "issuer_nkey: every nexlet and workload connects as this one user, without restrictions; prefer issuer_signing_key with issuer_signing_key_root_account")
	case !sk && !ra && !nk && !ns && (v.cfg.Node.InatsConfig != "" || v.cfg.NATS.Configured()):
		// The zero-config embedded server mints with its own account signing key.
		v.warnings = append(v.warnings, "no credential issuer configured: nexlets and workloads connect without credentials, which only a server without auth accepts (development only)")
	}
}

func (v *validator) natsAuth() {
	c := &v.cfg.NATS
	okNK := v.pub("nats.nkey", c.Nkey, nkeys.PrefixByteUser)
	okSeed := v.seed("nats.seed", c.Seed, nkeys.PrefixByteUser)
	if c.JWT != "" && c.Seed == "" {
		v.fail("nats.jwt", "", "needs nats.seed (the user seed SU… the JWT was issued to)")
	}
	if c.Nkey != "" && c.Seed == "" {
		v.fail("nats.nkey", "", "needs nats.seed (the user seed SU… of this key)")
	}
	if c.Seed != "" && c.JWT == "" && c.Nkey == "" {
		v.fail("nats.seed", "", "needs nats.jwt or nats.nkey")
	}
	if okNK && okSeed {
		v.matches("nats.nkey", c.Nkey, "nats.seed", c.Seed)
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		if c.TLSCert != "" {
			v.fail("nats.tlscert", "", "needs nats.tlskey")
		} else {
			v.fail("nats.tlskey", "", "needs nats.tlscert")
		}
	}
	n := &v.cfg.Node
	switch {
	case n.InatsConfig != "" && c.Configured():
		v.warnings = append(v.warnings, "inats_config is set: the node connects to its embedded server and ignores nats.context and nats.servers")
	case n.InatsConfig == "" && !c.Configured():
		v.warnings = append(v.warnings, "no NATS configured (nats.context, nats.servers or inats_config): nexd runs an embedded NATS server on 127.0.0.1")
	}
}

// pidMaxLimit is the kernel's PID_MAX_LIMIT on 64-bit Linux (4 M): no pid_max or
// pids.max can be above it.
const pidMaxLimit = 4 * 1024 * 1024
