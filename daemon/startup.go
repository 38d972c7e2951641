package daemon

import (
	"context"
	"encoding/json"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/version"
)

// switchBackend is what the control socket serves: the start-up backend while the node
// is built, then (swapped in once, when everything runs) the full one. Neither ever sees
// a half-built node.
type switchBackend struct {
	cur atomic.Pointer[control.Backend]
}

func newSwitchBackend(first control.Backend) *switchBackend {
	sw := &switchBackend{}
	sw.set(first)
	return sw
}

func (sw *switchBackend) set(b control.Backend) { sw.cur.Store(&b) }
func (sw *switchBackend) get() control.Backend  { return *sw.cur.Load() }

var _ control.Backend = (*switchBackend)(nil)

func (sw *switchBackend) Status(ctx context.Context) (control.Status, error) {
	return sw.get().Status(ctx)
}
func (sw *switchBackend) Reload(ctx context.Context) (control.ReloadResult, error) {
	return sw.get().Reload(ctx)
}
func (sw *switchBackend) Lameduck(ctx context.Context, d time.Duration) (control.LameduckResult, error) {
	return sw.get().Lameduck(ctx, d)
}
func (sw *switchBackend) Nexlets(ctx context.Context) ([]control.Nexlet, error) {
	return sw.get().Nexlets(ctx)
}
func (sw *switchBackend) RestartNexlet(ctx context.Context, name string) error {
	return sw.get().RestartNexlet(ctx, name)
}
func (sw *switchBackend) Workloads(ctx context.Context) ([]control.Workload, error) {
	return sw.get().Workloads(ctx)
}
func (sw *switchBackend) Logs(ctx context.Context, q control.LogQuery) ([]control.LogLine, error) {
	return sw.get().Logs(ctx, q)
}
func (sw *switchBackend) FollowLogs(ctx context.Context, q control.LogQuery) (<-chan control.LogLine, error) {
	return sw.get().FollowLogs(ctx, q)
}
func (sw *switchBackend) Config(ctx context.Context) (json.RawMessage, error) {
	return sw.get().Config(ctx)
}
func (sw *switchBackend) Reexec(ctx context.Context) error { return sw.get().Reexec(ctx) }
func (sw *switchBackend) Secrets() control.SecretStore     { return sw.get().Secrets() }
func (sw *switchBackend) Metrics() http.Handler            { return sw.get().Metrics() }
func (sw *switchBackend) NATSAccess(ctx context.Context, ttl time.Duration) (control.NATSAccess, error) {
	return sw.get().NATSAccess(ctx, ttl)
}

// startupBackend answers while the node is being built, from the snapshot and the
// parts that exist before everything else (identity, logger): status says starting
// (or degraded, once the start-up bound passed), the config and logs are readable, and
// everything that needs the running node is refused as a conflict.
type startupBackend struct {
	d      *daemon
	nodeID string
}

// errStarting refuses what needs the running node. A type, not a package-level
// fmt.Errorf, so that the package has no init: the native nexlet runs daemon.Main too.
var errStarting error = startingError{}

type startingError struct{}

func (startingError) Error() string {
	return control.ErrConflict.Error() + ": nexd is starting; try again once it is running"
}
func (startingError) Unwrap() error { return control.ErrConflict }

func (b startupBackend) Status(context.Context) (control.Status, error) {
	v := b.d.view()
	cfg := v.loaded.Config
	st := control.Status{
		NodeID:    b.nodeID,
		Name:      cfg.Node.Name,
		Nexus:     cfg.Node.Nexus,
		Version:   version.Version,
		Commit:    version.Commit,
		StartTime: b.d.started.UTC(),
		Uptime:    control.Duration(time.Since(b.d.started).Truncate(time.Second)),
		State:     v.phase,
		Detail:    v.waiting,
		Nexlets:   []control.Nexlet{},
		Workloads: map[string]int{},
	}
	if v.natsInfo != nil {
		ci := v.natsInfo()
		st.NATS = control.NATSStatus{Server: ci.Server, RTT: control.Duration(ci.RTT), Reconnects: ci.Reconnects,
			Embedded: ci.Embedded, Connected: ci.Connected}
	}
	return st, nil
}

func (b startupBackend) Reload(context.Context) (control.ReloadResult, error) {
	return control.ReloadResult{}, errStarting
}
func (b startupBackend) Lameduck(context.Context, time.Duration) (control.LameduckResult, error) {
	return control.LameduckResult{}, errStarting
}
func (b startupBackend) Nexlets(context.Context) ([]control.Nexlet, error) {
	return []control.Nexlet{}, nil
}
func (b startupBackend) RestartNexlet(context.Context, string) error { return errStarting }
func (b startupBackend) Reexec(context.Context) error                { return errStarting }
func (b startupBackend) Workloads(context.Context) ([]control.Workload, error) {
	return []control.Workload{}, nil
}
func (b startupBackend) Logs(ctx context.Context, q control.LogQuery) ([]control.LogLine, error) {
	if q.History {
		return workloadHistory(ctx, b.d, q), nil
	}
	return recentLogs(b.d, q), nil
}
func (b startupBackend) FollowLogs(ctx context.Context, q control.LogQuery) (<-chan control.LogLine, error) {
	return followLogs(ctx, b.d, q)
}
func (b startupBackend) Config(context.Context) (json.RawMessage, error) {
	return renderConfig(b.d)
}
func (b startupBackend) Secrets() control.SecretStore { return nil }
func (b startupBackend) Metrics() http.Handler        { return nil }
func (b startupBackend) NATSAccess(context.Context, time.Duration) (control.NATSAccess, error) {
	return control.NATSAccess{}, errStarting
}
