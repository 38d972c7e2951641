package native

import (
	"bytes"
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	artifacts "github.com/nexd-project/nexd/internal/artifact"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/nexlet/secrets"
	"github.com/nexd-project/nexd/protocol"
)

// StartRequestSchema is the JSON Schema of the native nexlet's run_request, sent to the
// node at registration; the node validates deploys against it.
//
//go:embed start_request.schema.json
var StartRequestSchema string

// StartRequest is the native nexlet's run_request: upstream's fields plus nexd's
// optional extensions, which upstream clients never send.
type StartRequest struct {
	URI                  string            `json:"uri"`
	Argv                 []string          `json:"argv,omitempty"`
	Environment          map[string]string `json:"environment,omitempty"`
	Description          string            `json:"description,omitempty"`
	ExposePorts          []int             `json:"expose_ports,omitempty"`
	Workdir              string            `json:"workdir,omitempty"`
	Limits               *LimitsSpec       `json:"limits,omitempty"`
	StopGrace            string            `json:"stop_grace,omitempty"`
	Restart              *RestartSpec      `json:"restart,omitempty"`
	EncryptedEnvironment *protocol.EncEnv  `json:"encrypted_environment,omitempty"`
	// User is a named user to run as; only users the node allows (workload_users,
	// allow_root_workloads). Empty: a dynamic uid of its own.
	User string `json:"user,omitempty"`
}

// LimitsSpec is the wire form of a workload's resource limits.
type LimitsSpec struct {
	// MemoryMax is bytes as a JSON number, or a string such as "256M".
	MemoryMax json.RawMessage `json:"memory_max,omitempty"`
	CPUMax    float64         `json:"cpu_max,omitempty"`
	PidsMax   int64           `json:"pids_max,omitempty"`
}

// RestartSpec is the wire form of a restart policy.
type RestartSpec struct {
	Policy  string `json:"policy,omitempty"`
	Max     *int   `json:"max,omitempty"`
	Backoff string `json:"backoff,omitempty"`
}

// Restart policies.
const (
	RestartNever     = "never"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// Defaults of the extensions.
const (
	DefaultStopGrace   = 10 * time.Second
	DefaultMaxRestarts = 3
	DefaultBackoff     = 100 * time.Millisecond
	MaxBackoff         = 30 * time.Second
)

// Limits are a workload's resource limits; zero means unlimited.
type Limits struct {
	MemoryMax int64
	CPUMax    float64
	PidsMax   int64
}

// artifact is where the executable comes from.
type artifact struct {
	scheme string // "file" or "nats"
	path   string // file: absolute path
	bucket string // nats: object store bucket
	object string // nats: object name, <name>_<tag>
}

// plan is a validated start request.
type plan struct {
	req         StartRequest
	art         artifact
	limits      Limits
	grace       time.Duration
	policy      string
	maxRestarts int
	backoff     time.Duration
}

// reservedEnv are set by the nexlet and may not come from the request.
var reservedEnv = []string{"NEX_WORKLOAD_NATS_SERVERS", "NEX_WORKLOAD_NATS_NKEY", "NEX_WORKLOAD_NATS_B64_JWT", EnvCredsFile,
	protocol.EnvWorkloadInboxPrefix,
	"NEX_WORKLOAD_ID", "NEX_NAMESPACE"}

// Compiled on first use, not at init: every package's init runs in nexd and in the
// native nexlet alike, used or not.
var (
	envKeyRE = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^[^=\x00]+$`) })
	memRE    = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`^([0-9]+(?:\.[0-9]+)?)\s*([KkMmGgTt]?)(i?)([Bb]?)$`) })
)

// parseStartRequest decodes and validates a run_request; every error names the field.
// Nothing is started and nothing is written on disk here, except that file:// paths are
// checked for existence.
func parseStartRequest(runRequest string, lifecycle protocol.Lifecycle) (*plan, error) {
	var p plan
	dec := json.NewDecoder(strings.NewReader(runRequest))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&p.req); err != nil {
		return nil, fmt.Errorf("run_request: %w", err)
	}
	if dec.More() {
		return nil, errors.New("run_request: trailing data after the JSON object")
	}
	r := &p.req
	art, err := parseURI(r.URI)
	if err != nil {
		return nil, err
	}
	p.art = art
	for k := range r.Environment {
		if !envKeyRE().MatchString(k) {
			return nil, fmt.Errorf("run_request: environment: key %q is not a valid variable name", k)
		}
		for _, res := range reservedEnv {
			if k == res {
				return nil, fmt.Errorf("run_request: environment: %s is set by the nexlet and may not be given", k)
			}
		}
	}
	for _, port := range r.ExposePorts {
		if port < 1 || port > 65535 {
			return nil, fmt.Errorf("run_request: expose_ports: %d is not a TCP port", port)
		}
	}
	if r.Workdir != "" {
		if !filepath.IsAbs(r.Workdir) {
			return nil, fmt.Errorf("run_request: workdir: %q is not an absolute path", r.Workdir)
		}
		// What it is is looked at once the workload's user may reach it (Nexlet.begin):
		// the nexlet's stat, as root, told a tenant what lies in directories only root
		// may search (TestAttackTenantProbesRootOnlyFiles).
	}
	if p.limits, err = parseLimits(r.Limits); err != nil {
		return nil, err
	}
	p.grace = DefaultStopGrace
	if r.StopGrace != "" {
		g, err := time.ParseDuration(r.StopGrace)
		if err != nil {
			return nil, fmt.Errorf("run_request: stop_grace: %w", err)
		}
		if g < 0 {
			return nil, fmt.Errorf("run_request: stop_grace: %q must not be negative", r.StopGrace)
		}
		p.grace = g
	}
	if err := p.parseRestart(lifecycle); err != nil {
		return nil, err
	}
	if e := r.EncryptedEnvironment; e != nil && (e.Base64EncryptedEnv == "" || e.EncryptedBy == "") {
		return nil, errors.New("run_request: encrypted_environment: base64_encrypted_env and encrypted_by are both required")
	}
	return &p, nil
}

func parseURI(uri string) (artifact, error) {
	if uri == "" {
		return artifact{}, errors.New("run_request: uri is required (file:///absolute/path or nats://bucket/name[:tag])")
	}
	if rest, ok := strings.CutPrefix(uri, "file://"); ok {
		if !filepath.IsAbs(rest) {
			return artifact{}, fmt.Errorf("run_request: uri %q: the path must be absolute (file:///path)", uri)
		}
		// Checked once the workload's user may reach it, as the workdir.
		return artifact{scheme: "file", path: filepath.Clean(rest)}, nil
	}
	if strings.HasPrefix(uri, "nats://") {
		bucket, object, err := artifacts.ParseNATS(uri)
		if err != nil {
			return artifact{}, fmt.Errorf("run_request: uri %q: %w", uri, err)
		}
		return artifact{scheme: "nats", bucket: bucket, object: object}, nil
	}
	scheme, _, ok := strings.Cut(uri, "://")
	if !ok {
		return artifact{}, fmt.Errorf("run_request: uri %q: no scheme; use file:///absolute/path or nats://bucket/name[:tag]", uri)
	}
	return artifact{}, fmt.Errorf("run_request: uri %q: unsupported scheme %q; use file:// or nats://", uri, scheme)
}

func parseLimits(l *LimitsSpec) (Limits, error) {
	var out Limits
	if l == nil {
		return out, nil
	}
	if len(l.MemoryMax) > 0 && !bytes.Equal(l.MemoryMax, []byte("null")) {
		m, err := parseMemory(l.MemoryMax)
		if err != nil {
			return out, fmt.Errorf("run_request: limits.memory_max: %w", err)
		}
		out.MemoryMax = m
	}
	if l.CPUMax < 0 || math.IsNaN(l.CPUMax) || math.IsInf(l.CPUMax, 0) {
		return out, fmt.Errorf("run_request: limits.cpu_max: %v must be a positive number of CPUs", l.CPUMax)
	}
	out.CPUMax = l.CPUMax
	if l.PidsMax < 0 {
		return out, fmt.Errorf("run_request: limits.pids_max: %d must be positive", l.PidsMax)
	}
	out.PidsMax = l.PidsMax
	cl := cgroup.Limits{MemoryMax: out.MemoryMax, CPUMax: out.CPUMax, PidsMax: out.PidsMax}
	if err := cl.Validate(); err != nil {
		return out, fmt.Errorf("run_request: limits: %w", err)
	}
	return out, nil
}

// parseMemory accepts a byte count or a size with a binary unit (K, M, G, T; an optional
// "i" and "B" are allowed, as in systemd and Kubernetes notation).
func parseMemory(raw json.RawMessage) (int64, error) {
	var n json.Number
	if err := json.Unmarshal(raw, &n); err == nil {
		v, err := strconv.ParseInt(string(n), 10, 64)
		if err != nil || v <= 0 {
			return 0, fmt.Errorf("%s is not a positive whole number of bytes", raw)
		}
		return v, nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return 0, fmt.Errorf("%s: want bytes as a number or a string like \"256M\"", raw)
	}
	m := memRE().FindStringSubmatch(strings.TrimSpace(s))
	if m == nil {
		return 0, fmt.Errorf("%q: want a size like 268435456, \"256M\" or \"1.5G\"", s)
	}
	f, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		return 0, fmt.Errorf("%q: %w", s, err)
	}
	mult := map[string]float64{"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[strings.ToUpper(m[2])]
	v := f * mult
	if v < 1 || v > math.MaxInt64/2 {
		return 0, fmt.Errorf("%q is out of range", s)
	}
	return int64(v), nil
}

func (p *plan) parseRestart(lc protocol.Lifecycle) error {
	switch lc {
	case protocol.LifecycleJob:
		p.policy = RestartNever
	case protocol.LifecycleService:
		p.policy = RestartOnFailure
	default:
		return fmt.Errorf("workload_lifecycle %q is not supported by the native nexlet (job, service)", lc)
	}
	p.maxRestarts, p.backoff = DefaultMaxRestarts, DefaultBackoff
	rs := p.req.Restart
	if rs == nil {
		return nil
	}
	switch rs.Policy {
	case "":
	case RestartNever, RestartOnFailure, RestartAlways:
		p.policy = rs.Policy
	default:
		return fmt.Errorf("run_request: restart.policy: %q is not one of never, on-failure, always", rs.Policy)
	}
	if rs.Max != nil {
		if *rs.Max < 0 {
			return fmt.Errorf("run_request: restart.max: %d must not be negative", *rs.Max)
		}
		p.maxRestarts = *rs.Max
	}
	if rs.Backoff != "" {
		b, err := time.ParseDuration(rs.Backoff)
		if err != nil {
			return fmt.Errorf("run_request: restart.backoff: %w", err)
		}
		if b <= 0 {
			return fmt.Errorf("run_request: restart.backoff: %q must be positive", rs.Backoff)
		}
		p.backoff = min(b, MaxBackoff)
	}
	return nil
}

// argvSecret is the index of the first secret:// argument in argv, or -1. New starts
// with one are refused: every local user reads a process's arguments in /proc.
func argvSecret(argv []string) int {
	for i, a := range argv {
		if strings.HasPrefix(a, secrets.Scheme) {
			return i
		}
	}
	return -1
}
