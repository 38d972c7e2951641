package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"os/user"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/logging"
	"github.com/nexd-project/nexd/internal/journalread"
	"github.com/nexd-project/nexd/internal/version"
	"github.com/nexd-project/nexd/protocol"
)

// backend is the node as the control socket sees it, swapped in only once the node is
// built and running (startupBackend answers before); the phase, config and lame duck
// deadline come from the snapshot.
type backend struct{ s *server }

var _ control.Backend = backend{}

func (b backend) Status(ctx context.Context) (control.Status, error) {
	s := b.s
	v := s.view()
	cfg := v.loaded.Config
	st := control.Status{
		NodeID:    s.id.ID(),
		Name:      cfg.Node.Name,
		Nexus:     cfg.Node.Nexus,
		Version:   version.Version,
		Commit:    version.Commit,
		StartTime: s.started.UTC(),
		Uptime:    control.Duration(time.Since(s.started).Truncate(time.Second)),
		State:     v.phase,
		Workloads: map[string]int{},
	}
	if v.phase == control.StateLameduck {
		t := v.lameduckUntil.UTC()
		st.LameduckUntil = &t
	}
	ci := s.conn.Info()
	st.NATS = control.NATSStatus{Server: ci.Server, RTT: control.Duration(ci.RTT), Reconnects: ci.Reconnects,
		Embedded: ci.Embedded, Connected: ci.Connected, JetStream: s.jetstream.status(), Leaf: s.leafStatus()}
	cg := s.nexlets.Cgroups()
	st.Cgroup = control.CgroupStatus{Driver: cfg.Node.CgroupDriver, Mode: string(cg.Mode()), Enforced: cg.Enforced(), Reason: cg.Reason()}
	st.WorkloadUsers = workloadUsers(cfg)
	st.Nexlets, _ = b.Nexlets(ctx)
	// Shared and kept (statusCount): any local user may ask for status.
	wc, err := b.s.status.count(ctx, b.s, statusMaxAge)
	if err == nil {
		st.Workloads = wc.byState
	}
	if !wc.asOf.IsZero() {
		t := wc.asOf.UTC()
		st.WorkloadsAsOf = &t
	}
	st.AuctionsNotBid = b.s.node.NotBid()
	n := b.s.node
	st.NexletDrops = &control.NexletDrops{WorkloadRenewals: n.RenewalsDropped(), UserRenewals: n.AgentRenewalsDropped(),
		Reregistrations: n.ReregistrationsDropped(), ListAnswersRefused: n.ListAnswersRefused()}
	st.Tombstones = b.s.tombstoneList()
	st.TombstoneCount = len(st.Tombstones)
	st.LocalState = b.s.disk.status()
	st.LastDrain = b.s.node.LastDrain()
	return st, nil
}

// Reexec asks the run loop to re-execute nexd in place (as SIGUSR2 does).
func (b backend) Reexec(context.Context) error {
	b.s.requestShutdown(reasonReexec)
	return nil
}

func (b backend) Reload(ctx context.Context) (control.ReloadResult, error) {
	return b.s.reload(), nil
}

func (b backend) Lameduck(ctx context.Context, delay time.Duration) (control.LameduckResult, error) {
	until, err := b.s.node.EnterLameduck(delay)
	if err != nil {
		return control.LameduckResult{}, err
	}
	return control.LameduckResult{Until: until}, nil
}

// Nexlets merges the supervisor's view (process, restarts, cgroup stats) with the
// node's (registration, health, heartbeat); remote nexlets have only the latter.
func (b backend) Nexlets(ctx context.Context) ([]control.Nexlet, error) {
	mgr := b.s.nexlets
	byID := map[string]*control.Nexlet{}
	var order []string
	for _, st := range mgr.Statuses() {
		n := &control.Nexlet{Name: st.Name, PID: st.PID, State: control.NexletState(st.State), Restarts: st.Restarts,
			LastExit: st.LastExit, MemoryBytes: st.Stats.MemoryCurrent, CPU: control.Duration(st.Stats.CPUUsageNsec),
			Health: protocol.HealthOffline}
		key := "local:" + st.Name
		if spec, ok := mgr.ByName(st.Name); ok {
			n.AgentID = spec.AgentID
			key = spec.AgentID
		}
		byID[key] = n
		order = append(order, key)
	}
	for _, a := range b.s.node.Agents() {
		n, ok := byID[a.ID]
		if !ok {
			// A remote nexlet: no process here.
			n = &control.Nexlet{Name: a.Name, AgentID: a.ID, State: control.NexletRemote}
			byID[a.ID] = n
			order = append(order, a.ID)
		}
		n.Type = a.Type
		n.Health = a.Health
		n.EndsUnheard = a.EndsUnheard
		if !a.LastHeartbeat.IsZero() {
			t := a.LastHeartbeat.UTC()
			n.LastHeartbeat = &t
		}
	}
	out := make([]control.Nexlet, 0, len(order))
	for _, k := range order {
		out = append(out, *byID[k])
	}
	return out, nil
}

func (b backend) RestartNexlet(ctx context.Context, name string) error {
	mgr := b.s.nexlets
	if _, ok := mgr.ByName(name); !ok {
		return fmt.Errorf("%w: nexlet %q (local nexlets: %v)", control.ErrNotFound, name, mgr.Names())
	}
	return mgr.Reset(name, "reset by nexctl")
}

func (b backend) Workloads(ctx context.Context) ([]control.Workload, error) {
	ws, missing, err := b.s.node.WorkloadList(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]control.Workload, 0, len(ws))
	for _, w := range ws {
		cw := control.Workload{ID: w.ID, Name: w.Name, Type: w.WorkloadType, Lifecycle: w.WorkloadLifecycle,
			State: string(w.WorkloadState)}
		if w.Namespace != nil {
			cw.Namespace = *w.Namespace
		}
		if t, err := time.Parse(time.RFC3339, w.StartTime); err == nil {
			cw.StartTime = t
		}
		if st, ok := b.s.nexlets.WorkloadStats(w.ID); ok {
			cw.MemoryBytes, cw.CPU = st.MemoryCurrent, control.Duration(st.CPUUsageNsec)
			cw.MemoryMax, cw.OOMKills = st.MemoryMax, st.OOMKills
		}
		cw.Restarts, _ = strconv.Atoi(w.Metadata["restarts"])
		out = append(out, cw)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].StartTime.Before(out[j].StartTime) })
	if len(missing) > 0 {
		return out, &control.PartialList{Wait: b.s.node.FanoutWait().String(), Missing: missing}
	}
	return out, nil
}

func (b backend) Logs(ctx context.Context, q control.LogQuery) ([]control.LogLine, error) {
	if q.History {
		return workloadHistory(ctx, b.s.daemon, q), nil
	}
	return recentLogs(b.s.daemon, q), nil
}

// workloadHistory is a workload's past output (q.History): from this host's journal,
// which nexd may read where its admins (members of nex) usually may not, else what the
// log buffer kept; since q.Since, the last q.Lines of it.
func workloadHistory(ctx context.Context, d *daemon, q control.LogQuery) []control.LogLine {
	ls, err := journalread.WorkloadOutput(ctx, q.Workload, os.Getuid(), q.Since, q.Lines)
	if err != nil {
		d.log.Debug("workload history: journal not read", "workload_id", q.Workload, "err", err)
	}
	var out []control.LogLine
	for _, l := range ls {
		out = append(out, control.LogLine{Time: l.Time, Level: slog.LevelInfo.String(), Msg: journalread.OutputMsg,
			WorkloadID: q.Workload, Attrs: map[string]any{"line": l.Line, "nexlet_stream": l.Stream, "source": "journal"}})
	}
	if len(out) > 0 {
		return out
	}
	for _, l := range recentLogs(d, control.LogQuery{Workload: q.Workload}) {
		if l.Msg == journalread.OutputMsg && !l.Time.Before(q.Since) {
			out = append(out, l)
		}
	}
	if q.Lines > 0 && len(out) > q.Lines {
		out = out[len(out)-q.Lines:]
	}
	return out
}

func (b backend) FollowLogs(ctx context.Context, q control.LogQuery) (<-chan control.LogLine, error) {
	return followLogs(ctx, b.s.daemon, q)
}

func (b backend) Config(ctx context.Context) (json.RawMessage, error) {
	return renderConfig(b.s.daemon)
}

// recentLogs are the last lines the logger kept that match q.
func recentLogs(d *daemon, q control.LogQuery) []control.LogLine {
	recs := d.logger.Recent(logFilter(q))
	if q.Lines > 0 && len(recs) > q.Lines {
		recs = recs[len(recs)-q.Lines:]
	}
	out := make([]control.LogLine, 0, len(recs))
	for _, r := range recs {
		out = append(out, toLogLine(r))
	}
	return out
}

// followLogs streams new lines matching q until ctx ends, from a goroutine the daemon
// owns.
func followLogs(ctx context.Context, d *daemon, q control.LogQuery) (<-chan control.LogLine, error) {
	in := d.logger.Follow(ctx)
	filter := logFilter(q)
	out := make(chan control.LogLine, 64)
	started := d.own.goFn(func() {
		defer close(out)
		for r := range in {
			if !filter(r) {
				continue
			}
			select {
			case out <- toLogLine(r):
			case <-ctx.Done():
				return
			}
		}
	})
	if !started {
		return nil, fmt.Errorf("%w: nexd is stopping", control.ErrConflict)
	}
	return out, nil
}

func logFilter(q control.LogQuery) func(logging.Record) bool {
	return func(r logging.Record) bool {
		if q.Nexlet != "" && r.Attrs["nexlet"] != q.Nexlet {
			return false
		}
		if q.Workload != "" && r.Attrs["workload_id"] != q.Workload {
			return false
		}
		return true
	}
}

func toLogLine(r logging.Record) control.LogLine {
	attrs := map[string]any{}
	for k, v := range r.Attrs {
		if k != "nexlet" && k != "workload_id" {
			attrs[k] = v
		}
	}
	return control.LogLine{Time: r.Time, Level: r.Level.String(), Msg: r.Msg,
		Nexlet: r.Attrs["nexlet"], WorkloadID: r.Attrs["workload_id"], Attrs: attrs}
}

// renderConfig is the current config with secrets redacted.
func renderConfig(d *daemon) (json.RawMessage, error) {
	b2, err := d.view().loaded.RenderJSON()
	if err != nil {
		return nil, err
	}
	return json.RawMessage(b2), nil
}

func (b backend) Secrets() control.SecretStore {
	if b.s.secrets.dir == "" {
		return nil
	}
	return b.s.secrets
}

func (b backend) Metrics() http.Handler { return b.s.metrics.Handler() }

// NATSAccess gives local admins the node's client URLs (an embedded server's real
// address included) so nexctl on this host needs no NATS configuration.
// With the zero-config embedded server it adds a short-lived admin credential: that
// server admits nobody without a user JWT nexd signed.
func (b backend) NATSAccess(_ context.Context, ttl time.Duration) (control.NATSAccess, error) {
	acc := control.NATSAccess{Servers: b.s.conn.ClientURLs(), Embedded: b.s.conn.InProcess() != nil}
	if t := b.s.embeddedTrust(); t != nil {
		name := "local-admin"
		if ttl <= 0 {
			ttl = localAdminTTL
		} else {
			name = "admin"
		}
		creds, exp, err := t.AdminCreds(name, ttl)
		if err != nil {
			return control.NATSAccess{}, err
		}
		acc.Creds, acc.Expires = creds, &exp
	}
	return acc, nil
}

// localAdminTTL is how long the admin credential nexctl gets from the control socket
// lives: one command's worth, with room for a long `logs --follow` reconnect.
const localAdminTTL = time.Hour

// workloadUsers says who native workloads run as: without root nexd cannot switch
// users, so they run as whoever started it.
func workloadUsers(cfg *config.Config) string {
	if os.Geteuid() != 0 {
		name := strconv.Itoa(os.Geteuid())
		if u, err := user.Current(); err == nil {
			name = u.Username
		}
		return fmt.Sprintf("the invoking user %s (uid %d): nexd does not run as root", name, os.Geteuid())
	}
	s := "dynamic uids " + cfg.Node.WorkloadUIDRange
	if len(cfg.Node.WorkloadUsers) > 0 {
		s += "; may ask for " + strings.Join(cfg.Node.WorkloadUsers, ", ")
	}
	if cfg.Node.AllowRootWorkloads {
		s += "; root allowed"
	}
	return s
}
