package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/logging"
	"github.com/nexd-project/nexd/internal/cgroup"
	"github.com/nexd-project/nexd/internal/version"
	"github.com/nexd-project/nexd/protocol"
)

// backend is the daemon as the control socket sees it.
type backend struct{ d *daemon }

var _ control.Backend = backend{}

func (b backend) Status(ctx context.Context) (control.Status, error) {
	d := b.d
	cfg := d.cfg()
	st := control.Status{
		NodeID:    d.id.ID(),
		Name:      cfg.Node.Name,
		Nexus:     cfg.Node.Nexus,
		Version:   version.Version,
		Commit:    version.Commit,
		StartTime: d.started.UTC(),
		Uptime:    control.Duration(time.Since(d.started).Truncate(time.Second)),
		State:     d.getPhase(),
		Workloads: map[string]int{},
	}
	d.mu.Lock()
	if st.State == "lameduck" {
		t := d.lameduckTill.UTC()
		st.LameduckUntil = &t
	}
	d.mu.Unlock()
	if d.conn != nil {
		ci := d.conn.Info()
		st.NATS = control.NATSStatus{Server: ci.Server, RTT: control.Duration(ci.RTT), Reconnects: ci.Reconnects,
			Embedded: ci.Embedded, Connected: ci.Connected}
	}
	if d.nexlets != nil {
		cg := d.nexlets.Cgroups()
		st.Cgroup = control.CgroupStatus{Mode: string(cg.Mode()), Enforced: cg.Enforced(), Reason: cg.Reason()}
	}
	st.Nexlets, _ = b.Nexlets(ctx)
	ws, err := b.Workloads(ctx)
	if err == nil {
		for _, w := range ws {
			st.Workloads[w.State]++
		}
	}
	return st, nil
}

func (b backend) Reload(ctx context.Context) (control.ReloadResult, error) {
	return b.d.reload(ctx), nil
}

func (b backend) Lameduck(ctx context.Context, delay time.Duration) (control.LameduckResult, error) {
	until, err := b.d.node.EnterLameduck(delay)
	if err != nil {
		return control.LameduckResult{}, err
	}
	return control.LameduckResult{Until: until}, nil
}

// Nexlets merges the supervisor's view (process, restarts, cgroup stats) with the
// node's (registration, health, heartbeat); remote nexlets have only the latter.
func (b backend) Nexlets(ctx context.Context) ([]control.Nexlet, error) {
	d := b.d
	byID := map[string]*control.Nexlet{}
	var order []string
	if d.nexlets != nil {
		for _, s := range d.nexlets.Statuses() {
			n := &control.Nexlet{Name: s.Name, PID: s.PID, State: string(s.State), Restarts: s.Restarts,
				LastExit: s.LastExit, MemoryBytes: s.Stats.MemoryCurrent, CPU: control.Duration(s.Stats.CPUUsageNsec),
				Health: protocol.HealthOffline}
			key := "local:" + s.Name
			if spec, ok := d.nexlets.ByName(s.Name); ok {
				n.AgentID = spec.AgentID
				key = spec.AgentID
			}
			byID[key] = n
			order = append(order, key)
		}
	}
	if d.node != nil {
		for _, a := range d.node.Agents() {
			n, ok := byID[a.ID]
			if !ok {
				// A remote nexlet: no process here.
				n = &control.Nexlet{Name: a.Name, AgentID: a.ID, State: "remote"}
				byID[a.ID] = n
				order = append(order, a.ID)
			}
			n.Type = a.Type
			n.Health = a.Health
			if !a.LastHeartbeat.IsZero() {
				t := a.LastHeartbeat.UTC()
				n.LastHeartbeat = &t
			}
		}
	}
	out := make([]control.Nexlet, 0, len(order))
	for _, k := range order {
		out = append(out, *byID[k])
	}
	return out, nil
}

func (b backend) RestartNexlet(ctx context.Context, name string) error {
	if b.d.nexlets == nil {
		return fmt.Errorf("%w: no supervised nexlets", control.ErrNotFound)
	}
	if _, ok := b.d.nexlets.ByName(name); !ok {
		return fmt.Errorf("%w: nexlet %q (local nexlets: %v)", control.ErrNotFound, name, b.d.nexlets.Names())
	}
	return b.d.nexlets.Reset(name, "reset by nexctl")
}

func (b backend) Workloads(ctx context.Context) ([]control.Workload, error) {
	if b.d.node == nil {
		return nil, nil
	}
	ws, err := b.d.node.Workloads(ctx)
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
		if s, ok := b.d.workloadStats(w.ID); ok {
			cw.MemoryBytes, cw.CPU = s.MemoryCurrent, control.Duration(s.CPUUsageNsec)
		}
		out = append(out, cw)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].StartTime.Before(out[j].StartTime) })
	return out, nil
}

func (b backend) Logs(ctx context.Context, q control.LogQuery) ([]control.LogLine, error) {
	recs := b.d.logger.Recent(logFilter(q))
	if q.Lines > 0 && len(recs) > q.Lines {
		recs = recs[len(recs)-q.Lines:]
	}
	out := make([]control.LogLine, 0, len(recs))
	for _, r := range recs {
		out = append(out, toLogLine(r))
	}
	return out, nil
}

func (b backend) FollowLogs(ctx context.Context, q control.LogQuery) (<-chan control.LogLine, error) {
	in := b.d.logger.Follow(ctx)
	filter := logFilter(q)
	out := make(chan control.LogLine, 64)
	go func() {
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
	}()
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

func (b backend) Config(ctx context.Context) (json.RawMessage, error) {
	b.d.mu.Lock()
	l := b.d.loaded
	b.d.mu.Unlock()
	b2, err := l.RenderJSON()
	if err != nil {
		return nil, err
	}
	return json.RawMessage(b2), nil
}

func (b backend) Secrets() control.SecretStore {
	if b.d.secrets == nil || b.d.secrets.dir == "" {
		return nil
	}
	return b.d.secrets
}

func (b backend) Metrics() http.Handler { return b.d.metrics.Handler() }

func (d *daemon) workloadStats(id string) (cgroup.Stats, bool) {
	if d.nexlets == nil {
		return cgroup.Stats{}, false
	}
	return d.nexlets.WorkloadStats(id)
}

// NATSAccess gives local admins the node's client URLs (an embedded server's real
// address included) so nexctl on this host needs no NATS configuration.
func (b backend) NATSAccess(context.Context) (control.NATSAccess, error) {
	if b.d.conn == nil {
		return control.NATSAccess{}, fmt.Errorf("NATS is not connected yet: %w", control.ErrConflict)
	}
	return control.NATSAccess{Servers: b.d.conn.ClientURLs(), Embedded: b.d.conn.InProcess() != nil}, nil
}
