// Package config resolves nexd's configuration from its layers (built-in defaults,
// JSON files, NEX_* environment variables and command-line flags), validates it as a
// whole, renders it for --check and `nexctl config`, and says which changes a reload
// can apply.
package config

import (
	"log/slog"
	"strings"
	"time"
)

// Config is the resolved configuration of one nexd node. The JSON key of every
// setting is its flag name with dashes as underscores (see KEYS.md).
type Config struct {
	// Namespace is the global --namespace; "system" is the administrative namespace.
	Namespace string
	Node      NodeConfig
	NATS      NATSConfig
	Logger    LoggerConfig

	// TrustedNodes (trusted_nodes) are the node ids (server public keys) whose signed
	// bids count (nexctl's placement, nexd's CLONE re-seal); empty: any signer.
	TrustedNodes []string
}

// DefaultGoGCPercent is the GOGC nexd and its native nexlet run with when go_gc_percent
// is 0 and nexd's environment has no $GOGC: a small daemon's heap is mostly long-lived
// records, and Go's 100 lets it grow to twice that between collections.
const DefaultGoGCPercent = 50

// NodeConfig holds the settings of `node up` and of the daemon itself.
type NodeConfig struct {
	Name                         string            // node_name (default: the host name)
	Seed                         string            // node_seed, a server seed SN…
	XKeySeed                     string            // node_xkey_seed, a curve seed SX…
	Nexus                        string            // nexus
	Tags                         map[string]string // tags
	AllowRemoteAgentRegistration bool              // allow_remote_agent_registration
	AllowNexletDirectFeeds       bool              // allow_nexlet_direct_feeds: $NEX.FEED grant for nexlets that cannot relay
	AgentRestartLimit            int               // agent_restart_limit
	DisableNativeStart           bool              // disable_native_start
	WorkloadUsers                []string          // workload_users: named users start requests may ask for
	AllowRootWorkloads           bool              // allow_root_workloads
	WorkloadUIDRange             string            // workload_uid_range: dynamic uids MIN-MAX
	Agents                       []Agent           // agents
	RemoteNexlets                []RemoteNexlet    // remote_nexlets
	NativeLimits                 Limits            // native_limits
	WorkloadDefaults             Limits            // workload_default_memory_max, workload_default_pids_max
	WorkloadsPidsMax             int64             // workloads_pids_max: 0 auto, -1 none
	ArtifactMaxSize              int64             // artifact_max_size: largest nats:// artifact fetched
	NativeMaxWorkloads           int               // native_max_workloads: 0 = no bound
	State                        string            // state: "" or "kv"
	StateReplicas                int               // state_replicas: 0 = by cluster size
	LogStream                    bool              // log_stream: keep workload output in NEX_LOGS
	LogStreamMaxAge              time.Duration     // log_stream_max_age
	LogStreamMaxBytes            int64             // log_stream_max_bytes
	ShowWorkloadLogs             bool              // show_workload_logs
	Events                       string            // events: "", "nats" or "logs"
	InatsConfig                  string            // inats_config: nats-server config file
	EmbeddedNATSPort             int               // embedded_nats_port: -1 = any free port
	IssuerSigningKey             string            // issuer_signing_key, an account seed SA…
	IssuerSigningKeyRootAccount  string            // issuer_signing_key_root_account, A…
	IssuerNkey                   string            // issuer_nkey, a public user key U…
	IssuerNkeySeed               string            // issuer_nkey_seed, a user seed SU…
	AuctionTTL                   time.Duration     // auction_ttl
	StateDir                     string            // state_dir
	LiveRestore                  bool              // live_restore: workloads outlive a stopping nexd
	RuntimeDir                   string            // runtime_dir ("" = a temp dir per node id)
	ControlSocket                string            // control_socket
	CgroupRoot                   string            // cgroup_root ("" = detect)
	CgroupDriver                 string            // cgroup_driver: "cgroupfs" or "systemd" (transient scopes)
	GoGCPercent                  int               // go_gc_percent: GOGC of nexd and the native nexlet; 0 = DefaultGoGCPercent or $GOGC
	GoMemoryLimit                int64             // go_memory_limit: GOMEMLIMIT of each; 0 = Go's
	KeepStartupPages             bool              // keep_startup_pages: do not unmap the binary's start-up pages once ready
	StopGrace                    time.Duration     // stop_grace
	WorkloadCredsTTL             time.Duration     // workload_creds_ttl: lifetime of minted workload users
	NexletCredsTTL               time.Duration     // nexlet_creds_ttl: lifetime of minted nexlet users
	StartupTimeout               time.Duration     // startup_timeout: wait for nexlets before READY
	DeployTimeout                time.Duration     // deploy_timeout: longest start of one workload
	ControlAllowOthers           string            // control_allow_others: "status" or "none"
	MetricsListen                string            // metrics_listen: host:port, "" = off
}

// Agent is one local nexlet that nexd starts and supervises.
type Agent struct {
	URI    string            `json:"uri"`
	Argv   []string          `json:"argv,omitempty"`
	Env    map[string]string `json:"env,omitempty"`
	Limits Limits            `json:"limits"`
	// UnsignedRegistration accepts this nexlet's registration without the per-start
	// signature (nexlets built on upstream's SDK cannot sign); its agent id is then
	// the only proof, so a process that learns it can take the nexlet's place.
	UnsignedRegistration bool `json:"unsigned_registration,omitempty"`
}

// RemoteNexlet is a remote nexlet allowed to register with this node: it must sign
// its registration with the nkey whose public key is listed, under this name and type.
type RemoteNexlet struct {
	Name      string `json:"name"`
	Type      string `json:"type"`
	PublicKey string `json:"public_key"`
}

// Limits bound a nexlet's cgroup. Zero means no limit.
type Limits struct {
	MemoryMax  int64   // memory_max in bytes (JSON: bytes, or "256M", "1G", "max")
	MemoryHigh int64   // memory_high in bytes, the throttling threshold
	CPUMax     float64 // cpu_max as a number of CPUs: 0.5 is half of one CPU
	PidsMax    int64   // pids_max
}

// NATSConfig is how nexd connects to NATS. With nothing set (and no inats_config)
// the daemon runs an embedded server.
type NATSConfig struct {
	Context    string        // nats.context: a NATS CLI context name
	Servers    []string      // nats.servers
	CredsFile  string        // nats.creds_file
	LeafRemote string        // nats.leaf_remote: hub URL the embedded server joins as a leaf node
	LeafCreds  string        // nats.leaf_creds: credentials file for nats.leaf_remote
	Nkey       string        // nats.nkey: public user nkey U…, used with nats.seed
	Seed       string        // nats.seed: user seed SU…
	JWT        string        // nats.jwt, used with nats.seed
	User       string        // nats.user
	Password   string        // nats.password
	TLSCert    string        // nats.tlscert
	TLSKey     string        // nats.tlskey
	TLSCA      string        // nats.tlsca
	TLSFirst   bool          // nats.tlsfirst
	ConnName   string        // nats.conn_name
	Timeout    time.Duration // nats.timeout
	JSDomain   string        // nats.jsdomain
}

// Configured reports whether any way to reach an external NATS server is set.
func (n NATSConfig) Configured() bool {
	return n.Context != "" || len(n.Servers) > 0
}

// LoggerConfig is the node's logging.
type LoggerConfig struct {
	Level   string   // logger.level: debug|info|warn|error
	Target  []string // logger.target: std|file|journal|nats; empty = automatic (see logging.Options)
	WithPID bool     // logger.with_pid
	Format  string   // logger.format: text|json
	File    string   // logger.file: where the file target writes
}

// SlogLevel maps Level to a slog.Level (info when unrecognised; Load rejects those).
func (l LoggerConfig) SlogLevel() slog.Level {
	switch l.Level {
	case "debug":
		return slog.LevelDebug
	case "warn":
		return slog.LevelWarn
	case "error":
		return slog.LevelError
	}
	return slog.LevelInfo
}

// LogTargets returns the configured log targets; none means automatic, which the
// logging package resolves (journal when stderr is the journal stream, else std).
func (c *Config) LogTargets() []string {
	return append([]string(nil), c.Logger.Target...)
}

// lookupEnv returns the last value of name in env ("" when absent), as the process
// environment would.
func lookupEnv(env []string, name string) string {
	val := ""
	for _, kv := range env {
		if k, v, ok := strings.Cut(kv, "="); ok && k == name {
			val = v
		}
	}
	return val
}
