package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/artifact"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// NativeNexletName is the supervisor's name for the built-in native nexlet.
const NativeNexletName = "native"

// nexletSpec is one local nexlet: what to run and the agent id it registers with.
type nexletSpec struct {
	name    string
	agentID string
	spec    supervise.Spec
}

// startNexlets detects cgroups, starts the supervisor and every local nexlet.
func (d *daemon) startNexlets(ctx context.Context, cfg *config.Config) error {
	cg, err := cgroup.Detect(cfg.Node.CgroupRoot, d.log)
	if err != nil {
		return fmt.Errorf("cgroups: %w", err)
	}
	if err := cg.EnterSupervisor(); err != nil {
		d.log.Warn("could not move nexd into its supervisor cgroup; running nexlets without limits", "err", err)
		cg = cgroup.Disabled("entering the supervisor cgroup failed: "+err.Error(), d.log)
	}
	d.cg = cg
	d.log.Info("cgroups", "mode", string(cg.Mode()), "enforced", strings.Join(cg.Enforced(), ","), "reason", cg.Reason())

	specs, err := d.nexletSpecs(ctx, cfg)
	if err != nil {
		return err
	}
	d.nexlets = specs
	d.sup = supervise.New(supervise.Options{
		Cgroups:      cg.Sub("nexlets"),
		RestartLimit: cfg.Node.AgentRestartLimit,
		Grace:        cfg.Node.StopGrace,
		Logger:       d.log,
		Env:          d.nexletEnv,
		OnExit:       d.onNexletExit,
		OnFailed:     d.onNexletFailed,
	})
	for _, s := range specs {
		d.node.ExpectAgent(s.agentID, s.name)
		if err := d.sup.Start(ctx, s.spec); err != nil {
			return fmt.Errorf("nexlet %s: %w", s.name, err)
		}
	}
	return nil
}

// nexletSpecs resolves the native nexlet and the configured agents into specs.
func (d *daemon) nexletSpecs(ctx context.Context, cfg *config.Config) ([]nexletSpec, error) {
	var out []nexletSpec
	used := map[string]int{}
	name := func(base string) string {
		used[base]++
		if used[base] == 1 {
			return base
		}
		return fmt.Sprintf("%s-%d", base, used[base])
	}
	if !cfg.Node.DisableNativeStart {
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("native nexlet: find own executable: %w", err)
		}
		n := name(NativeNexletName)
		out = append(out, nexletSpec{name: n, agentID: nuid.Next(), spec: supervise.Spec{
			Name:   n,
			Path:   exe,
			Args:   []string{"nexlet", "native"},
			Limits: toCgroupLimits(cfg.Node.NativeLimits),
		}})
	}
	var js jetstream.JetStream
	for i, a := range cfg.Node.Agents {
		ref, err := artifact.Parse(a.URI)
		if err != nil {
			return nil, fmt.Errorf("agents[%d]: %w", i, err)
		}
		if ref.Scheme == "nats" && js == nil {
			if js, err = d.jetstream(cfg); err != nil {
				return nil, fmt.Errorf("agents[%d]: %w", i, err)
			}
		}
		path, err := artifact.Resolve(ctx, ref, js, filepath.Join(d.runtimeDir(), "nexlets"))
		if err != nil {
			return nil, fmt.Errorf("agents[%d] (%s): %w", i, a.URI, err)
		}
		base := filepath.Base(path)
		if ref.Scheme == "nats" {
			base = strings.SplitN(ref.Object, "_", 2)[0]
		}
		n := name(sanitizeName(base))
		out = append(out, nexletSpec{name: n, agentID: nuid.Next(), spec: supervise.Spec{
			Name:   n,
			Path:   path,
			Args:   a.Argv,
			Env:    a.Env,
			Limits: toCgroupLimits(a.Limits),
		}})
	}
	return out, nil
}

func (d *daemon) jetstream(cfg *config.Config) (jetstream.JetStream, error) {
	if cfg.NATS.JSDomain != "" {
		return jetstream.NewWithDomain(d.conn.NC, cfg.NATS.JSDomain)
	}
	return jetstream.New(d.conn.NC)
}

// runtimeDir holds fetched nexlet binaries: systemd's RuntimeDirectory when set, else
// under the state directory, else a temp dir.
func (d *daemon) runtimeDir() string {
	if rd := firstDir(lookup(d.env, "RUNTIME_DIRECTORY")); rd != "" {
		return rd
	}
	if d.stateDir != "" {
		return filepath.Join(d.stateDir, "run")
	}
	return filepath.Join(os.TempDir(), "nexd-"+d.id.ID()[:12])
}

func (d *daemon) nexletNames() []string {
	names := make([]string, 0, len(d.nexlets))
	for _, s := range d.nexlets {
		names = append(names, s.name)
	}
	return names
}

func (d *daemon) nexletAgentIDs() []string {
	ids := make([]string, 0, len(d.nexlets))
	for _, s := range d.nexlets {
		ids = append(ids, s.agentID)
	}
	return ids
}

// nexletNamesOf maps agent ids of local nexlets back to their names.
func (d *daemon) nexletNamesOf(ids []string) []string {
	var out []string
	for _, id := range ids {
		for _, s := range d.nexlets {
			if s.agentID == id {
				out = append(out, s.name)
			}
		}
	}
	return out
}

func (d *daemon) nexletByName(name string) (nexletSpec, bool) {
	for _, s := range d.nexlets {
		if s.name == name {
			return s, true
		}
	}
	return nexletSpec{}, false
}

// nexletEnv is called before every (re)start of a nexlet: the configured env plus the
// NEX_AGENT_* variables with freshly minted registration credentials.
func (d *daemon) nexletEnv(name string) map[string]string {
	s, ok := d.nexletByName(name)
	if !ok {
		return nil
	}
	creds, err := d.minter.MintRegister(s.agentID, d.id.ID())
	if err != nil {
		// The nexlet starts without credentials, fails to register and is restarted.
		d.log.Error("cannot mint registration credentials", "nexlet", name, "err", err)
	}
	env := map[string]string{}
	for k, v := range s.spec.Env {
		env[k] = v
	}
	for k, v := range agentEnv(creds, d.id.ID(), s.agentID) {
		env[k] = v
	}
	if name == NativeNexletName || strings.HasPrefix(name, NativeNexletName+"-") {
		cfg := d.cfg()
		_ = cfg
		env[native.EnvRuntimeDir] = filepath.Join(d.runtimeDir(), name)
		if d.stateDir != "" {
			env[native.EnvStateDir] = d.stateDir
		}
	}
	return env
}

// agentEnv is the NEX_AGENT_* environment upstream's SDK reads.
func agentEnv(c protocol.NatsConnectionData, nodeID, agentID string) map[string]string {
	return map[string]string{
		"NEX_AGENT_NATS_SERVERS":   strings.Join(c.NatsServers, ","),
		"NEX_AGENT_NATS_USER_SEED": c.NatsUserSeed,
		"NEX_AGENT_NATS_B64_JWT":   b64(c.NatsUserJWT),
		"NEX_AGENT_NATS_USER":      c.NatsUserName,
		"NEX_AGENT_NATS_PASSWORD":  c.NatsUserPassword,
		"NEX_AGENT_NATS_USER_NKEY": c.NatsUserNkey,
		"NEX_AGENT_NODE_ID":        nodeID,
		"NEX_AGENT_ASSIGNED_ID":    agentID,
	}
}

// onNexletExit drops the nexlet's registration: a restarted nexlet registers again.
func (d *daemon) onNexletExit(name string, exit supervise.ExitInfo) {
	s, ok := d.nexletByName(name)
	if !ok {
		return
	}
	d.metrics.nexletExit(name, exit.OOM)
	d.node.RemoveAgent(s.agentID, exit.Reason)
	d.node.SetAgentProcessInfo(s.agentID, d.nexletRestarts(name), exit.Reason, false)
}

// onNexletFailed marks a given-up nexlet offline in node info and in STATUS.
func (d *daemon) onNexletFailed(name string, last supervise.ExitInfo) {
	s, ok := d.nexletByName(name)
	if !ok {
		return
	}
	d.node.SetAgentProcessInfo(s.agentID, d.nexletRestarts(name), "failed: "+last.Reason, true)
	d.notify.Status(d.statusLine())
}

func (d *daemon) nexletRestarts(name string) int {
	if d.sup == nil {
		return 0
	}
	for _, st := range d.sup.Statuses() {
		if st.Name == name {
			return st.Restarts
		}
	}
	return 0
}

func toCgroupLimits(l config.Limits) cgroup.Limits {
	return cgroup.Limits{MemoryMax: l.MemoryMax, MemoryHigh: l.MemoryHigh, CPUMax: l.CPUMax, PidsMax: l.PidsMax}
}

func sanitizeName(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	if b.Len() == 0 {
		return "nexlet"
	}
	return b.String()
}
