package config

import (
	"strings"
	"time"
)

// kind is how a key's value is typed and parsed.
type kind int

const (
	kString kind = iota
	kBool
	kInt
	kDuration
	kList          // []string
	kMap           // map[string]string
	kAgents        // []Agent
	kRemoteNexlets // []RemoteNexlet
	kSize          // int64 bytes, "256M" accepted
	kFloat         // float64
)

// where a key may appear in a config file besides its canonical spelling.
type scope int

const (
	scopeTop  scope = iota // only at the top level (namespace)
	scopeNode              // top level (flat layout) or under node.up (nested layout)
	scopeNATS              // "nats": {...} or "nats.x"
	scopeLog               // "logger": {...} or "logger.x"
)

// Help headings, in the order Usage prints them.
const (
	gNode    = "Node"
	gNexlets = "Nexlets"
	gCreds   = "Credentials"
	gState   = "State and events"
	gNATS    = "NATS connection"
	gLog     = "Logging"
	gDaemon  = "Daemon"
	gGeneral = "General"
)

var groupOrder = []string{gNode, gNexlets, gCreds, gState, gNATS, gLog, gDaemon, gGeneral}

// keySpec describes one setting: its canonical key (flag name with dashes as
// underscores), type, default, help and where it lives in Config.
type keySpec struct {
	key        string
	kind       kind
	scope      scope
	group      string
	short      string
	help       string
	def        any    // typed default; nil = zero value
	defText    string // the default as help shows it, when it is not simply def
	enum       []string
	secret     bool
	reloadable bool
	// envAliases are older environment names still read (below NEX_<KEY>).
	envAliases []string
	field      func(*Config) any // pointer to the field
}

// flagName is the command-line spelling: dashes for underscores.
func (s *keySpec) flagName() string { return strings.ReplaceAll(s.key, "_", "-") }

// envName is NEX_ plus the key upper-cased with dots as underscores.
func (s *keySpec) envName() string {
	return "NEX_" + strings.ToUpper(strings.ReplaceAll(s.key, ".", "_"))
}

// fileName is the key's spelling inside its group object in a file ("servers" for
// nats.servers, "memory_max" for native_limits.memory_max).
func (s *keySpec) fileName() string {
	if s.scope == scopeNATS || s.scope == scopeLog {
		_, after, _ := strings.Cut(s.key, ".")
		return after
	}
	return s.key
}

// keySpecs returns the registry, freshly built so nothing is shared between loads.
func keySpecs() []*keySpec {
	return []*keySpec{
		// Node
		{key: "namespace", kind: kString, scope: scopeTop, group: gNode, def: "system",
			help:  "namespace this node serves; \"system\" is the administrative one",
			field: func(c *Config) any { return &c.Namespace }},
		{key: "trusted_nodes", kind: kList, scope: scopeTop, group: gNode, defText: "none: any node that signs its bid",
			help:  "node ids (server public keys N…) whose signed bids count: nexctl refuses a bid signed by any other node before anything is sealed, and nexd re-seals a CLONE only to a listed node's bid",
			field: func(c *Config) any { return &c.TrustedNodes }},
		{key: "node_name", kind: kString, scope: scopeNode, group: gNode, defText: "the host name",
			help:  "human-readable node name",
			field: func(c *Config) any { return &c.Node.Name }},
		{key: "node_seed", kind: kString, scope: scopeNode, group: gNode, secret: true, defText: "generated; persisted in state_dir",
			help:  "server nkey seed (SN…) that fixes the node id",
			field: func(c *Config) any { return &c.Node.Seed }},
		{key: "node_xkey_seed", kind: kString, scope: scopeNode, group: gNode, secret: true, defText: "generated; persisted in state_dir",
			help:  "curve nkey seed (SX…) for encrypted environments",
			field: func(c *Config) any { return &c.Node.XKeySeed }},
		{key: "nexus", kind: kString, scope: scopeNode, group: gNode, def: "nexus",
			help:  "name of the group of nodes this node belongs to",
			field: func(c *Config) any { return &c.Node.Nexus }},
		{key: "tags", kind: kMap, scope: scopeNode, group: gNode, reloadable: true,
			help:  "placement tag k=v (repeatable, or k=v,k2=v2); the nex. prefix is reserved",
			field: func(c *Config) any { return &c.Node.Tags }},
		{key: "auction_ttl", kind: kDuration, scope: scopeNode, group: gNode, def: 10 * time.Second,
			help:  "how long an auction's bid reservation lasts",
			field: func(c *Config) any { return &c.Node.AuctionTTL }},

		// Nexlets
		{key: "allow_remote_agent_registration", kind: kBool, scope: scopeNode, group: gNexlets,
			help:  "accept nexlets that run elsewhere and register over NATS",
			field: func(c *Config) any { return &c.Node.AllowRemoteAgentRegistration }},
		{key: "allow_nexlet_direct_feeds", kind: kBool, scope: scopeNode, group: gNexlets,
			help:  "let nexlets that cannot relay their feeds through the node (upstream's SDK, nexd's older than the relay) publish on every namespace's $NEX.FEED logs, metrics and events: any of them can then forge another workload's",
			field: func(c *Config) any { return &c.Node.AllowNexletDirectFeeds }},
		{key: "agent_restart_limit", kind: kInt, scope: scopeNode, group: gNexlets, def: int64(3), reloadable: true,
			help:  "restarts of a crashing nexlet before it is marked failed (0 = never restart)",
			field: func(c *Config) any { return &c.Node.AgentRestartLimit }},
		{key: "disable_native_start", kind: kBool, scope: scopeNode, group: gNexlets,
			help:  "do not start the built-in native nexlet",
			field: func(c *Config) any { return &c.Node.DisableNativeStart }},
		{key: "workload_users", kind: kList, scope: scopeNode, group: gNexlets, defText: "none: every workload gets a dynamic uid",
			help:  "named users a start request may ask to run as (user); root, and a user in group nex (the node's admins), need allow_root_workloads",
			field: func(c *Config) any { return &c.Node.WorkloadUsers }},
		{key: "allow_root_workloads", kind: kBool, scope: scopeNode, group: gNexlets,
			help:  "let start requests ask for user root (full control of the host), and for a workload_users user in group nex (the node's admins)",
			field: func(c *Config) any { return &c.Node.AllowRootWorkloads }},
		{key: "workload_uid_range", kind: kString, scope: scopeNode, group: gNexlets, def: "61184-65519",
			help:  "range MIN-MAX of the dynamic uids workloads run under (each its own, released after)",
			field: func(c *Config) any { return &c.Node.WorkloadUIDRange }},
		{key: "agents", kind: kAgents, scope: scopeNode, group: gNexlets,
			help:  "local nexlets to supervise (see --agents.uri)",
			field: func(c *Config) any { return &c.Node.Agents }},
		{key: "remote_nexlets", kind: kRemoteNexlets, scope: scopeNode, group: gNexlets,
			help:  "remote nexlets allowed to register: JSON [{\"name\",\"type\",\"public_key\"}], each signs with its key",
			field: func(c *Config) any { return &c.Node.RemoteNexlets }},
		{key: "native_limits.memory_max", kind: kSize, scope: scopeNode, group: gNexlets, def: int64(1 << 30),
			help:  "hard memory limit of the native nexlet process (bytes or K/M/G/T; max = none)",
			field: func(c *Config) any { return &c.Node.NativeLimits.MemoryMax }},
		{key: "native_limits.memory_high", kind: kSize, scope: scopeNode, group: gNexlets,
			help:  "memory throttling threshold of the native nexlet process (max = none)",
			field: func(c *Config) any { return &c.Node.NativeLimits.MemoryHigh }},
		{key: "native_limits.cpu_max", kind: kFloat, scope: scopeNode, group: gNexlets,
			help:  "CPU limit of the native nexlet process in CPUs, e.g. 0.5 (0 = none)",
			field: func(c *Config) any { return &c.Node.NativeLimits.CPUMax }},
		{key: "native_limits.pids_max", kind: kInt, scope: scopeNode, group: gNexlets, def: int64(4096),
			help:  "process/thread limit of the native nexlet process (0 = none)",
			field: func(c *Config) any { return &c.Node.NativeLimits.PidsMax }},
		{key: "workload_default_memory_max", kind: kSize, scope: scopeNode, group: gNexlets, def: int64(512 << 20),
			help:  "memory limit of a native workload whose start request names none (bytes or K/M/G/T; max = none)",
			field: func(c *Config) any { return &c.Node.WorkloadDefaults.MemoryMax }},
		{key: "workload_default_pids_max", kind: kInt, scope: scopeNode, group: gNexlets, def: int64(1024),
			help:  "process/thread limit of a native workload whose start request names none (0 = none)",
			field: func(c *Config) any { return &c.Node.WorkloadDefaults.PidsMax }},
		{key: "workloads_pids_max", kind: kInt, scope: scopeNode, group: gNexlets, defText: "0: auto",
			help:  "process/thread limit of all native workloads together (cgroupfs driver); 0 = three quarters of the kernel's (the lesser of kernel.pid_max and kernel.threads-max), -1 = none",
			field: func(c *Config) any { return &c.Node.WorkloadsPidsMax }},
		{key: "artifact_max_size", kind: kSize, scope: scopeNode, group: gNexlets, def: int64(256 << 20),
			help:  "largest nats:// artifact the native nexlet fetches; a larger one refuses the start (max = none)",
			field: func(c *Config) any { return &c.Node.ArtifactMaxSize }},
		{key: "native_max_workloads", kind: kInt, scope: scopeNode, group: gNexlets, defText: "0: no bound",
			help:  "most workloads the built-in native nexlet runs at once; the node bids on no auction past it (0 = no bound)",
			field: func(c *Config) any { return &c.Node.NativeMaxWorkloads }},

		// Credentials
		{key: "issuer_signing_key", kind: kString, scope: scopeNode, group: gCreds, secret: true,
			help:  "account signing key seed (SA…) used to mint nexlet and workload users",
			field: func(c *Config) any { return &c.Node.IssuerSigningKey }},
		{key: "issuer_signing_key_root_account", kind: kString, scope: scopeNode, group: gCreds,
			help:  "public key (A…) of the account the signing key belongs to",
			field: func(c *Config) any { return &c.Node.IssuerSigningKeyRootAccount }},
		{key: "issuer_nkey", kind: kString, scope: scopeNode, group: gCreds,
			help:  "public user nkey (U…) shared with nexlets and workloads",
			field: func(c *Config) any { return &c.Node.IssuerNkey }},
		{key: "issuer_nkey_seed", kind: kString, scope: scopeNode, group: gCreds, secret: true,
			help:  "user seed (SU…) of issuer_nkey",
			field: func(c *Config) any { return &c.Node.IssuerNkeySeed }},

		// State and events
		{key: "state", kind: kString, scope: scopeNode, group: gState, enum: []string{"", "kv"},
			help:  "workload persistence: \"\" (in memory) or kv (NATS KV bucket nex-<node id>)",
			field: func(c *Config) any { return &c.Node.State }},
		{key: "state_replicas", kind: kInt, scope: scopeNode, group: gState, def: int64(0), defText: "0: auto",
			help:  "replicas of the KV state bucket (1-5); 0 = 3 when nexd's NATS cluster has three or more servers, else 1",
			field: func(c *Config) any { return &c.Node.StateReplicas }},
		{key: "log_stream", kind: kBool, scope: scopeNode, group: gState,
			help:  "keep workload output in the bounded JetStream stream NEX_LOGS (nexctl workload logs --tail/--since, fleet-wide)",
			field: func(c *Config) any { return &c.Node.LogStream }},
		{key: "log_stream_max_age", kind: kDuration, scope: scopeNode, group: gState, def: 24 * time.Hour,
			help:  "how long NEX_LOGS keeps a line",
			field: func(c *Config) any { return &c.Node.LogStreamMaxAge }},
		{key: "log_stream_max_bytes", kind: kSize, scope: scopeNode, group: gState, def: int64(256 << 20),
			help:  "how many bytes NEX_LOGS keeps (oldest lines go first)",
			field: func(c *Config) any { return &c.Node.LogStreamMaxBytes }},
		{key: "events", kind: kString, scope: scopeNode, group: gState, enum: []string{"", "nats", "logs"},
			help:  "where node events go: \"\" (nowhere), nats or logs",
			field: func(c *Config) any { return &c.Node.Events }},

		// NATS connection
		{key: "nats.context", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "NATS CLI context to connect with (takes priority over the other nats settings)",
			field: func(c *Config) any { return &c.NATS.Context }},
		{key: "nats.servers", kind: kList, scope: scopeNATS, group: gNATS, short: "s", defText: "none: run an embedded server",
			help:  "NATS server URLs (repeatable, or comma-separated)",
			field: func(c *Config) any { return &c.NATS.Servers }},
		{key: "nats.creds_file", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "NATS credentials file",
			field: func(c *Config) any { return &c.NATS.CredsFile }},
		{key: "nats.nkey", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "public user nkey (U…) to connect with, used with --nats.seed",
			field: func(c *Config) any { return &c.NATS.Nkey }},
		{key: "nats.seed", kind: kString, scope: scopeNATS, group: gNATS, secret: true,
			help:  "user seed (SU…) for --nats.nkey or --nats.jwt",
			field: func(c *Config) any { return &c.NATS.Seed }},
		{key: "nats.jwt", kind: kString, scope: scopeNATS, group: gNATS, secret: true,
			help:  "user JWT to connect with, used with --nats.seed",
			field: func(c *Config) any { return &c.NATS.JWT }},
		{key: "nats.user", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "user name to connect with",
			field: func(c *Config) any { return &c.NATS.User }},
		{key: "nats.password", kind: kString, scope: scopeNATS, group: gNATS, secret: true,
			help:  "password to connect with",
			field: func(c *Config) any { return &c.NATS.Password }},
		{key: "nats.tlscert", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "TLS client certificate file",
			field: func(c *Config) any { return &c.NATS.TLSCert }},
		{key: "nats.tlskey", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "TLS client key file",
			field: func(c *Config) any { return &c.NATS.TLSKey }},
		{key: "nats.tlsca", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "TLS certificate authority file",
			field: func(c *Config) any { return &c.NATS.TLSCA }},
		{key: "nats.tlsfirst", kind: kBool, scope: scopeNATS, group: gNATS,
			help:  "do the TLS handshake before the NATS protocol starts",
			field: func(c *Config) any { return &c.NATS.TLSFirst }},
		{key: "nats.conn_name", kind: kString, scope: scopeNATS, group: gNATS, def: "nexd",
			help:  "connection name shown in the server's monitoring",
			field: func(c *Config) any { return &c.NATS.ConnName }},
		{key: "nats.timeout", kind: kDuration, scope: scopeNATS, group: gNATS, def: 5 * time.Second,
			help:  "connect and request timeout",
			field: func(c *Config) any { return &c.NATS.Timeout }},
		{key: "nats.leaf_remote", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "hub URL (nats-leaf://host:7422) the embedded server joins as a leaf node, so local workloads keep their server through WAN outages; needs nats.jsdomain",
			field: func(c *Config) any { return &c.NATS.LeafRemote }},
		{key: "nats.leaf_creds", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "credentials file the leaf connection to nats.leaf_remote authenticates with",
			field: func(c *Config) any { return &c.NATS.LeafCreds }},
		{key: "nats.jsdomain", kind: kString, scope: scopeNATS, group: gNATS,
			help:  "JetStream domain for the KV state",
			field: func(c *Config) any { return &c.NATS.JSDomain }},
		{key: "embedded_nats_port", kind: kInt, scope: scopeNode, group: gNATS, def: int64(4222),
			envAliases: []string{"NEXD_EMBEDDED_NATS_PORT"},
			help:       "client port of the zero-config embedded NATS server (-1 = any free port)",
			field:      func(c *Config) any { return &c.Node.EmbeddedNATSPort }},
		{key: "inats_config", kind: kString, scope: scopeNode, group: gNATS,
			help:  "run an embedded nats-server from this config file and connect to it",
			field: func(c *Config) any { return &c.Node.InatsConfig }},

		// Logging
		{key: "logger.level", kind: kString, scope: scopeLog, group: gLog, short: "l", def: "info", reloadable: true,
			enum:  []string{"debug", "info", "warn", "error"},
			help:  "log level: debug, info, warn or error",
			field: func(c *Config) any { return &c.Logger.Level }},
		{key: "logger.target", kind: kList, scope: scopeLog, group: gLog, reloadable: true, defText: "journal under systemd, else std",
			enum:  []string{"std", "file", "journal", "nats"},
			help:  "log targets: std, file, journal, nats (repeatable, or comma-separated)",
			field: func(c *Config) any { return &c.Logger.Target }},
		{key: "logger.with_pid", kind: kBool, scope: scopeLog, group: gLog, reloadable: true,
			help:  "add the process id to every log line",
			field: func(c *Config) any { return &c.Logger.WithPID }},
		{key: "logger.format", kind: kString, scope: scopeLog, group: gLog, def: "text", reloadable: true,
			enum:  []string{"text", "json"},
			help:  "format of the std and file targets: text or json",
			field: func(c *Config) any { return &c.Logger.Format }},
		{key: "logger.file", kind: kString, scope: scopeLog, group: gLog, defText: "<state_dir>/nexd.log, or ./nexd.log",
			help:  "file the file target writes to",
			field: func(c *Config) any { return &c.Logger.File }},
		{key: "show_workload_logs", kind: kBool, scope: scopeNode, group: gLog, reloadable: true,
			help:  "also log every workload's output in the node log",
			field: func(c *Config) any { return &c.Node.ShowWorkloadLogs }},

		// Daemon
		{key: "live_restore", kind: kBool, scope: scopeNode, group: gDaemon, reloadable: true,
			help:  "on SIGTERM leave workloads running for the next nexd (same state dir) to adopt, as Docker's live-restore; off: stop them",
			field: func(c *Config) any { return &c.Node.LiveRestore }},
		{key: "state_dir", kind: kString, scope: scopeNode, group: gDaemon, defText: "$STATE_DIRECTORY, else none (ephemeral node)",
			help:  "directory for the node identity, embedded JetStream and secrets; nexd makes it when missing, not the ones above",
			field: func(c *Config) any { return &c.Node.StateDir }},
		{key: "runtime_dir", kind: kString, scope: scopeNode, group: gDaemon, defText: "$RUNTIME_DIRECTORY, else <state_dir>/run, else a temp dir",
			help:  "directory for fetched nexlet binaries and workload working directories; nexd makes it when missing, not the ones above",
			field: func(c *Config) any { return &c.Node.RuntimeDir }},
		{key: "control_socket", kind: kString, scope: scopeNode, group: gDaemon, defText: "$RUNTIME_DIRECTORY/nexd.sock, else /run/nex/nexd.sock",
			help:  "Unix socket of the local control API (nexctl); nexd makes its directory when missing, not the ones above",
			field: func(c *Config) any { return &c.Node.ControlSocket }},
		{key: "control_allow_others", kind: kString, scope: scopeNode, group: gDaemon, def: "status",
			enum:  []string{"status", "none"},
			help:  "what users other than root and group nex may do on the socket: status or none",
			field: func(c *Config) any { return &c.Node.ControlAllowOthers }},
		{key: "cgroup_root", kind: kString, scope: scopeNode, group: gDaemon, defText: "detected",
			help:  "cgroup under which nexlet cgroups are created",
			field: func(c *Config) any { return &c.Node.CgroupRoot }},
		{key: "cgroup_driver", kind: kString, scope: scopeNode, group: gDaemon, def: "cgroupfs",
			enum:  []string{"cgroupfs", "systemd"},
			help:  "where workloads get their cgroup: cgroupfs (nexd's own delegated subtree) or systemd (a transient scope nex-<id>.scope per workload in nex-workloads.slice; needs root and systemd as init)",
			field: func(c *Config) any { return &c.Node.CgroupDriver }},
		{key: "go_gc_percent", kind: kInt, scope: scopeNode, group: gDaemon, reloadable: true, defText: "0: nexd's, 50 (or $GOGC)",
			help:  "GOGC of nexd and of its native nexlet: heap growth before a collection, in percent; -1 turns the collector off; 0 takes nexd's default for a small daemon, 50 (Go's is 100), or $GOGC when nexd has it; both start with Go's collector and take this once ready (nexd) or registered (the nexlet)",
			field: func(c *Config) any { return &c.Node.GoGCPercent }},
		{key: "go_memory_limit", kind: kSize, scope: scopeNode, group: gDaemon, reloadable: true, defText: "0: Go's (none, or $GOMEMLIMIT)",
			help:  "GOMEMLIMIT of nexd and of its native nexlet, each: a soft heap limit the collector works harder to stay under (a limit, not a cap); 0 leaves Go's",
			field: func(c *Config) any { return &c.Node.GoMemoryLimit }},
		{key: "keep_startup_pages", kind: kBool, scope: scopeNode, group: gDaemon,
			help:  "keep resident the pages of nexd's binary that start-up faulted in; by default nexd (once ready) and the native nexlet (once registered) unmap those of the binary's read-only mappings, which stay in the page cache and fault back when used",
			field: func(c *Config) any { return &c.Node.KeepStartupPages }},
		{key: "stop_grace", kind: kDuration, scope: scopeNode, group: gDaemon, def: 10 * time.Second,
			help:  "time a nexlet gets between SIGTERM and being killed",
			field: func(c *Config) any { return &c.Node.StopGrace }},
		{key: "workload_creds_ttl", kind: kDuration, scope: scopeNode, group: gDaemon, def: time.Hour,
			help:  "lifetime of the NATS credentials minted for each workload (renewed before they expire)",
			field: func(c *Config) any { return &c.Node.WorkloadCredsTTL }},
		{key: "nexlet_creds_ttl", kind: kDuration, scope: scopeNode, group: gDaemon, def: time.Hour,
			help:  "lifetime of the NATS credentials minted for each nexlet (the nexlet renews them before they expire)",
			field: func(c *Config) any { return &c.Node.NexletCredsTTL }},
		{key: "deploy_timeout", kind: kDuration, scope: scopeNode, group: gDaemon, def: 5 * time.Minute,
			help:  "longest a nexlet may take to start a workload while it reports progress (an artifact download); a start past it is stopped and refused",
			field: func(c *Config) any { return &c.Node.DeployTimeout }},
		{key: "startup_timeout", kind: kDuration, scope: scopeNode, group: gDaemon, def: 15 * time.Second,
			help:  "start-up bound: longest wait for local nexlets to register and send their first heartbeat (from which they bid), one bound for both (a hand-over of an unregistered nexlet starts it again), before READY, and for NATS or JetStream before a degraded READY (nexd keeps waiting); systemd's start timeout is extended while nexd waits",
			field: func(c *Config) any { return &c.Node.StartupTimeout }},
		{key: "metrics_listen", kind: kString, scope: scopeNode, group: gDaemon, defText: "off",
			help:  "host:port to serve Prometheus metrics on",
			field: func(c *Config) any { return &c.Node.MetricsListen }},
	}
}

// registry indexes the key specs of one load.
type registry struct {
	specs []*keySpec
	byKey map[string]*keySpec
	byEnv map[string]*keySpec
}

func newRegistry() *registry {
	r := &registry{specs: keySpecs(), byKey: map[string]*keySpec{}, byEnv: map[string]*keySpec{}}
	for _, s := range r.specs {
		r.byKey[s.key] = s
		r.byEnv[s.envName()] = s
		for _, a := range s.envAliases {
			r.byEnv[a] = s
		}
	}
	return r
}

// get returns the field's current value.
func (s *keySpec) get(c *Config) any {
	switch p := s.field(c).(type) {
	case *string:
		return *p
	case *bool:
		return *p
	case *int:
		return *p
	case *int64:
		return *p
	case *float64:
		return *p
	case *time.Duration:
		return *p
	case *[]string:
		return *p
	case *map[string]string:
		return *p
	case *[]Agent:
		return *p
	case *[]RemoteNexlet:
		return *p
	}
	return nil
}

// set stores a decoded value; the value's type is the one decode produced for the
// key's kind, so a mismatch is a programming error and is ignored.
func (s *keySpec) set(c *Config, v any) {
	switch p := s.field(c).(type) {
	case *string:
		if x, ok := v.(string); ok {
			*p = x
		}
	case *bool:
		if x, ok := v.(bool); ok {
			*p = x
		}
	case *int:
		if x, ok := v.(int64); ok {
			*p = int(x)
		}
	case *int64:
		if x, ok := v.(int64); ok {
			*p = x
		}
	case *float64:
		if x, ok := v.(float64); ok {
			*p = x
		}
	case *time.Duration:
		if x, ok := v.(time.Duration); ok {
			*p = x
		}
	case *[]string:
		if x, ok := v.([]string); ok {
			*p = append([]string(nil), x...)
		}
	case *map[string]string:
		if x, ok := v.(map[string]string); ok {
			m := make(map[string]string, len(x))
			for k, val := range x {
				m[k] = val
			}
			*p = m
		}
	case *[]Agent:
		if x, ok := v.([]Agent); ok {
			*p = cloneAgents(x)
		}
	case *[]RemoteNexlet:
		if x, ok := v.([]RemoteNexlet); ok {
			*p = append([]RemoteNexlet(nil), x...)
		}
	}
}

func cloneAgents(in []Agent) []Agent {
	out := make([]Agent, len(in))
	for i, a := range in {
		out[i] = Agent{URI: a.URI, Argv: append([]string(nil), a.Argv...), Limits: a.Limits, UnsignedRegistration: a.UnsignedRegistration}
		if a.Env != nil {
			out[i].Env = make(map[string]string, len(a.Env))
			for k, v := range a.Env {
				out[i].Env[k] = v
			}
		}
	}
	return out
}
