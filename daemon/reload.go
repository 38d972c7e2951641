package daemon

import (
	"errors"
	"fmt"
	"strings"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/natsembed"
	"github.com/nexd-project/nexd/internal/sdscope"
)

// reload re-reads every config layer with the original command line, validates it
// whole, and applies the reloadable fields. On any error the running configuration
// stays as it was. SIGHUP, `nexctl reload` and `systemctl reload` all come here.
func (s *server) reload() control.ReloadResult {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()
	s.notify.Reloading()
	s.log.Info("reloading configuration")

	res := s.applyReload()
	status := s.statusLine()
	s.metrics.Reload(res.OK)
	if res.OK {
		s.log.Info("configuration reloaded", "applied", strings.Join(res.Applied, ","))
		status = "reloaded; " + status
	} else {
		status = "reload rejected (" + strings.Join(res.Errors, "; ") + "); " + status
	}
	s.notify.Ready(status)
	return res
}

func (s *server) applyReload() control.ReloadResult {
	lo := config.DefaultLoadOptions(s.args)
	lo.CheckInats = natsembed.CheckServerConfig
	lo.CheckCgroupDriver = sdscope.CheckDriver
	loaded, err := config.Load(lo)
	if err != nil {
		var errs config.Errors
		if errors.As(err, &errs) {
			out := make([]string, 0, len(errs))
			for _, e := range errs {
				out = append(out, e.Error())
			}
			return control.ReloadResult{Errors: out}
		}
		return control.ReloadResult{Errors: []string{err.Error()}}
	}
	old := s.cfg()
	next := loaded.Config
	changes := config.Diff(old, next)
	if keys := changes.RestartOnly; len(keys) > 0 {
		msgs := make([]string, 0, len(keys))
		for _, k := range keys {
			msgs = append(msgs, fmt.Sprintf("%s changed but only takes effect on restart (systemctl restart nexd)", k))
		}
		return control.ReloadResult{Errors: msgs}
	}
	if err := s.logger.Reconfigure(s.logOptions(next, s.id.ID())); err != nil {
		return control.ReloadResult{Errors: []string{"logger: " + err.Error()}}
	}
	if err := s.node.SetTags(next.Node.Tags); err != nil {
		// Validation already rejects reserved tags; keep the old config whole anyway.
		s.logger.Reconfigure(s.logOptions(old, s.id.ID()))
		return control.ReloadResult{Errors: []string{"node.tags: " + err.Error()}}
	}
	s.nexlets.SetRestartLimit(next.Node.AgentRestartLimit)
	if old.Logger.Level != next.Logger.Level {
		s.nexlets.SetLogLevel() // the native nexlets log at nexd's level
	}
	s.goBase.apply(next.Node, s.log) // nexlets take theirs at their next start
	s.update(func(v *snapshot) { v.loaded = loaded })
	return control.ReloadResult{OK: true, Applied: changes.Applied}
}
