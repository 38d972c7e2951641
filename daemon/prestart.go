package daemon

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/nexlets"
	"github.com/nexd-project/nexd/daemon/supervise"
	"github.com/nexd-project/nexd/internal/earlynexlet"
	"github.com/nexd-project/nexd/internal/profdump"
	"github.com/nexd-project/nexd/nexlet/native"
)

// envPrestart set to "off" makes nexd fork its native nexlet when it starts it, as
// before the pre-start: nexbench ready's A/B switch.
const envPrestart = earlynexlet.EnvPrestart

// prestartNexlet makes the native nexlet's process ahead of its first start, when cfg
// runs one: its runtime start and package init then overlap with nexd's set-up, and its
// first start hands it what it needs (supervise.Prestart; docs/performance-notes.md, Ready). The process
// nexd's package init exec'd (early) is used when its runtime variables are what cfg
// asks for; else one is exec'd now. Not after a re-exec, nor when the state directory
// records a running one: the running nexlet is adopted (early is killed). What else
// turns out not to use it (a start abandoned, an adoption found later, a group that
// refuses it) discards it: the closer kills it if nothing took it.
func (d *daemon) prestartNexlet(cfg *config.Config, early Early) {
	if early.Err != nil {
		d.log.Info("native nexlet not pre-started at init", "err", early.Err)
	}
	e := early.Nexlet
	defer func() { e.Discard() }() // unless taken below
	if cfg.Node.DisableNativeStart || os.Getenv(envPrestart) == "off" {
		return
	}
	if _, reexec := os.LookupEnv(envHandover); reexec {
		return
	}
	if _, reexec := os.LookupEnv(envDirLocks); reexec {
		return
	}
	if dir := cfg.Node.StateDir; dir != "" {
		if _, running := supervise.ReadRecord(filepath.Join(dir, "nexlets"), nexlets.NativeName); running {
			return
		}
	}
	path, args, err := nexlets.NativeCommand()
	if err != nil {
		d.log.Debug("native nexlet not pre-started", "err", err)
		return
	}
	// What its runtime reads at exec, as the start's environment will say it
	// (nexlets.Manager's env), and the state directory, which names its node in
	// /proc/<pid>/environ (the init's cannot: it does not know it); nothing secret:
	// the rest comes with the hand-off.
	env := map[string]string{}
	if cfg.Node.GoMemoryLimit > 0 {
		env["GOMEMLIMIT"] = strconv.FormatInt(cfg.Node.GoMemoryLimit, 10)
	}
	if g, ok := profdump.PassOn(os.Getenv)["GODEBUG"]; ok {
		env["GODEBUG"] = g
	}
	if cfg.Node.StateDir != "" {
		env[native.EnvStateDir] = cfg.Node.StateDir
	}
	var p *supervise.Prestarted
	if e != nil && e.Path == path && slices.Equal(e.Args, args) {
		var differs string
		p, differs, err = supervise.PrestartedEarly(e, env)
		switch {
		case err != nil:
			d.log.Warn("native nexlet started at init not used", "pid", e.Pid, "err", err)
		case p == nil:
			d.log.Info("native nexlet started at init not used: the configuration sets a variable its runtime read otherwise", "pid", e.Pid, "var", differs)
		default:
			e = nil // p's now
			d.log.Info("native nexlet pre-started; its start follows once nexd has built itself", "pid", p.Pid(), "at", "init")
		}
	}
	if p == nil {
		e.Discard()
		e = nil
		stderr, _ := d.stderr.(*os.File)
		if p, err = supervise.Prestart(path, args, env, stderr, d.log); err != nil {
			d.log.Warn("native nexlet not pre-started; it is started when nexd has built itself", "err", err)
			return
		}
		d.log.Info("native nexlet pre-started; its start follows once nexd has built itself", "pid", p.Pid(), "at", "main")
	}
	d.prestarted = p
	d.closers.push("pre-started nexlet", func(context.Context) error {
		p.Discard() // nothing, once its start took it
		return nil
	})
}
