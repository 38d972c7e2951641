package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"os/user"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/spf13/cobra"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/natsurl"
	"github.com/nexd-project/nexd/internal/scatter"
	"github.com/nexd-project/nexd/protocol"
)

// Check outcomes.
const (
	checkOK   = "ok"
	checkWarn = "warn"
	checkFail = "fail"
)

// checkResult is one doctor finding.
type checkResult struct {
	Check  string `json:"check"`
	Status string `json:"status"`
	Detail string `json:"detail"`
	Fix    string `json:"fix,omitempty"`
}

// maxSkew is the clock difference doctor tolerates before warning: credentials and
// heartbeats are time-based.
const maxSkew = 2 * time.Second

// doctor runs the checks; it never stops at a failure so one run shows everything.
type doctor struct {
	a       *app
	results []checkResult
}

func (d *doctor) add(check, status, detail, fix string) {
	d.results = append(d.results, checkResult{Check: check, Status: status, Detail: detail, Fix: fix})
}

func (a *app) doctorCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "doctor",
		Short: "Check this host and its NATS system for what a node needs; ok/warn/fail with the fix",
		Long: `Check what running Nex nodes needs and what operators trip over: nexctl's configuration;
NATS reachable with the configured credentials; permission to publish and subscribe on
$NEX.*; JetStream and the node's KV state bucket; clock skew against the NATS server; and,
when a node runs on this host, its credential minter, cgroup mode and enforced limits,
control socket and state directory permissions, and the systemd unit's notify and
watchdog settings. Each check prints ok, warn or fail, with the fix. Exit 1 when any
check fails.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			d := &doctor{a: a}
			d.run(cmd.Context())
			failed := 0
			for _, r := range d.results {
				if r.Status == checkFail {
					failed++
				}
			}
			if a.json {
				if err := a.printJSON(map[string]any{"checks": d.results, "failed": failed}); err != nil {
					return err
				}
			} else {
				for _, r := range d.results {
					fmt.Fprintf(a.out(), "%-4s  %s: %s\n", r.Status, r.Check, r.Detail)
					if r.Fix != "" && r.Status != checkOK {
						fmt.Fprintf(a.out(), "      fix: %s\n", r.Fix)
					}
				}
			}
			if failed > 0 {
				return exitError{ExitFailed, fmt.Errorf("%d check(s) failed", failed)}
			}
			return nil
		},
	}
}

func (d *doctor) run(ctx context.Context) {
	r := d.a.resolved()
	if r.Err != nil {
		d.add("configuration", checkFail, r.Err.Error(), "fix the setting named; 'nexctl --check' shows every source")
	} else {
		d.add("configuration", checkOK, fmt.Sprintf("%d config file(s) read", len(r.Files)), "")
	}
	st, local := d.localNode(ctx)
	d.natsChecks(ctx, st, local)
	if local {
		d.nodeChecks(ctx, st)
	}
}

// localNode asks the node on this host, if any, for its status.
func (d *doctor) localNode(ctx context.Context) (control.Status, bool) {
	c := d.a.client()
	defer c.Close()
	cctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	st, err := c.Status(cctx)
	if err != nil {
		d.add("local node", checkWarn, fmt.Sprintf("no node answers on %s: %v", d.a.socket, err),
			"on a node's host, start nexd (systemctl start nexd) or point --control-socket at its socket; elsewhere ignore this")
		return st, false
	}
	d.add("local node", checkOK, fmt.Sprintf("%s (%s), %s, version %s", st.Name, shortID(st.NodeID), st.State, st.Version), "")
	return st, true
}

func (d *doctor) natsChecks(ctx context.Context, st control.Status, local bool) {
	f, done, err := d.a.connectFleet(ctx)
	if err != nil {
		d.add("NATS connection", checkFail, err.Error(),
			"check nats.servers or the context (nexctl --check) and that the server runs; 'nats ping' with the same settings")
		return
	}
	defer done()
	d.add("NATS connection", checkOK, "connected to "+natsurl.Redact(f.nc.ConnectedUrl()), "")

	// Permissions: the server answers a violation with an error before the flush's PONG.
	ns := d.a.namespace
	// A user that may not publish on $NEX.SVC beyond a namespace's own subjects is a
	// tenant's: it is shown the tenant grants, never the admin's $NEX.SVC.> and _INBOX.>.
	before := f.nc.LastError()
	tenant := f.nc.Publish(doctorProbe, nil) == nil && scatter.FlushRefused(ctx, f.nc, before, 3*time.Second, doctorProbe) != nil
	fix := permissionFix(ns, tenant)
	perm := func(what string, op func() error) {
		before := f.nc.LastError()
		err := op()
		if err == nil {
			err = f.nc.FlushTimeout(3 * time.Second)
		}
		if last := f.nc.LastError(); err == nil && last != nil && last != before {
			err = last
		}
		if err != nil {
			status := checkFail
			if !errors.Is(err, nats.ErrPermissionViolation) && !strings.Contains(strings.ToLower(err.Error()), "permissions violation") {
				status = checkWarn
			}
			d.add("permission: "+what, status, err.Error(), fix)
			return
		}
		d.add("permission: "+what, checkOK, "allowed", "")
	}
	perm("publish "+protocol.ControlPrefix(ns)+".>", func() error {
		return f.nc.Publish(protocol.ControlPrefix(ns)+"."+doctorControlProbe, nil)
	})
	perm("subscribe "+protocol.FeedWildcard(ns, ""), func() error {
		// perm's flush brings a refusal (the connection's last error); what the feed
		// carries meanwhile is dropped.
		sub, err := scatter.Subscribe(f.nc, protocol.FeedWildcard(ns, ""))
		if err == nil {
			defer sub.Close()
			err = f.nc.FlushTimeout(3 * time.Second)
		}
		return err
	})
	perm("subscribe replies ("+f.inboxPrefix()+">)", func() error {
		before := f.nc.LastError()
		inbox := f.nc.NewInbox()
		sub, err := scatter.Subscribe(f.nc, inbox)
		if err != nil {
			return err
		}
		defer sub.Close()
		return scatter.FlushRefused(ctx, f.nc, before, 3*time.Second, inbox)
	})
	if tenant {
		// The node keeps its state with its own user; a tenant's needs no JetStream.
		d.add("JetStream", checkOK, "not checked: a tenant's user needs none (a nats:// artifact in bucket "+ns+" needs JetStream grants for OBJ_"+ns+")", "")
		return
	}

	js, err := f.jetstream()
	if err != nil {
		d.add("JetStream", checkFail, err.Error(), "")
		return
	}
	jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := js.AccountInfo(jctx); err != nil {
		fix := "enable JetStream on the server (jetstream: enabled) and for the account; without it state = \"kv\" cannot work"
		if errors.Is(err, jetstream.ErrJetStreamNotEnabledForAccount) {
			fix = "enable JetStream for this account (its JWT limits or the server's account config)"
		}
		d.add("JetStream", checkFail, err.Error(), fix)
		return
	}
	d.add("JetStream", checkOK, "available", "")
	if local && st.NodeID != "" {
		bucket := "nex-" + st.NodeID
		kv, err := js.KeyValue(jctx, bucket)
		switch {
		case errors.Is(err, jetstream.ErrBucketNotFound):
			d.add("KV state bucket", checkWarn, bucket+" does not exist: workloads are not restored after a restart",
				"set state = \"kv\" in the node's config to persist workloads")
		case err != nil:
			d.add("KV state bucket", checkFail, err.Error(), "allow the user $JS.API.> and $KV."+bucket+".>")
		default:
			if _, err := kv.Status(jctx); err != nil {
				d.add("KV state bucket", checkFail, err.Error(), "")
			} else {
				d.add("KV state bucket", checkOK, bucket+" usable", "")
			}
		}
	}
	d.clockSkew(jctx, js)
}

// doctorProbe is a $NEX.SVC subject outside every namespace that nothing serves:
// publishing there tells an admin's user (allowed) from a tenant's (refused).
const doctorProbe = "$NEX.SVC.nexctl-doctor.probe"

// doctorControlProbe is the last token of the subject in the namespace's control
// prefix that the publish check uses: no node serves it. Before, the check published a
// WPING without a reply subject, which every node on the bus answered into nowhere,
// logging "failed to send reply … request has no reply subject".
const doctorControlProbe = "nexctl-doctor-probe"

// permissionFix is the permissions to give: the tenant grants of namespace ns
// (protocol.TenantSubjects, mint.TenantPermissions) to a tenant's user, the admin's to
// others.
func permissionFix(ns string, tenant bool) string {
	switch {
	case tenant && ns == protocol.SystemNamespace:
		return "this user may not publish on $NEX.SVC.>: an admin's user needs publish $NEX.SVC.>, subscribe $NEX.FEED.> and _INBOX.>; a tenant's has only its namespace: give nexctl that (--namespace, NEX_NAMESPACE or namespace in the config) and doctor shows its grants"
	case tenant:
		pub, sub := protocol.TenantSubjects(ns)
		return fmt.Sprintf("a tenant's user of namespace %s may publish %s and subscribe %s, with inbox_prefix %s in its NATS context (nats.CustomInboxPrefix); never _INBOX.> or $NEX.SVC.> (README, Credentials)",
			ns, strings.Join(pub, ", "), strings.Join(sub, ", "), protocol.TenantInboxPrefix(ns))
	}
	return "allow the user to publish $NEX.SVC.> and subscribe $NEX.FEED.> and _INBOX.> (its account or JWT permissions); a tenant's user gets only its namespace's (--namespace)"
}

// clockSkew compares this host's clock with the server's, read from a JetStream API
// answer's timestamp.
func (d *doctor) clockSkew(ctx context.Context, js jetstream.JetStream) {
	names := js.StreamNames(ctx)
	var name string
	for n := range names.Name() {
		name = n
		break
	}
	if name == "" {
		d.add("clock skew", checkWarn, "no stream to read the server's clock from",
			"run nexctl doctor again once a node with state kv ran: its KV bucket is a stream whose info says the server's time")
		return
	}
	before := time.Now()
	s, err := js.Stream(ctx, name)
	if err != nil {
		d.add("clock skew", checkWarn, err.Error(), "")
		return
	}
	info := s.CachedInfo()
	after := time.Now()
	if info == nil || info.TimeStamp.IsZero() {
		d.add("clock skew", checkWarn, "the server does not report its time (nats-server before 2.10)",
			"upgrade nats-server to 2.10 or later for this check")
		return
	}
	mid := before.Add(after.Sub(before) / 2)
	d.add(skewFinding(info.TimeStamp.Sub(mid), after.Sub(before)))
}

// skewFinding judges the server's clock minus this host's, read within rtt: a skew
// beyond maxSkew (and the read's own uncertainty) warns, saying which clock is ahead
// and how to keep both synchronised.
func skewFinding(skew, rtt time.Duration) (check, status, detail, fix string) {
	abs := skew
	if abs < 0 {
		abs = -abs
	}
	if abs <= maxSkew+rtt {
		return "clock skew", checkOK, abs.Round(time.Millisecond).String(), ""
	}
	side := "behind"
	if skew < 0 {
		side = "ahead of"
	}
	return "clock skew", checkWarn,
		fmt.Sprintf("this host's clock is %s %s the NATS server's (tolerated: %s)", abs.Round(time.Millisecond), side, maxSkew),
		"synchronise both clocks with NTP: on this host `timedatectl set-ntp true` (systemd-timesyncd; " +
			"or install chrony and `systemctl enable --now chronyd`), until `timedatectl status` says " +
			"'System clock synchronized: yes'; the same on the NATS server's host. " +
			"Credential expiry and nexlet heartbeats are judged by these clocks"
}

// nodeChecks look at the node on this host.
func (d *doctor) nodeChecks(ctx context.Context, st control.Status) {
	c := d.a.client()
	defer c.Close()
	var cfg struct {
		Settings map[string]struct {
			Value any `json:"value"`
		} `json:"settings"`
	}
	raw, err := c.Config(ctx)
	if err == nil {
		err = json.Unmarshal(raw, &cfg)
	}
	val := func(k string) string {
		if s, ok := cfg.Settings[k].Value.(string); ok {
			return s
		}
		return ""
	}
	switch {
	case err != nil:
		d.add("credential minter", checkWarn, "the node's config is unreadable: "+err.Error(), "")
	case st.NATS.Embedded && val("inats_config") == "":
		// The zero-config embedded server: nexd mints with its own account's signing
		// key whatever issuer_* say (daemon newMinter).
		d.add("credential minter", checkOK, "the embedded NATS server's own account signing key: workloads and nexlets get scoped, expiring user JWTs, revoked when they stop", "")
	case val("issuer_signing_key") != "":
		d.add("credential minter", checkOK, "account signing key: workloads and nexlets get scoped, expiring user JWTs", "")
	case val("issuer_nkey") != "":
		d.add("credential minter", checkWarn, "user nkey: workloads share one identity", "prefer issuer_signing_key with issuer_signing_key_root_account")
	default:
		d.add("credential minter", checkWarn, "none: nexlets and workloads connect without credentials (development only)",
			"set issuer_signing_key and issuer_signing_key_root_account for a secured NATS system")
	}

	cg := st.Cgroup
	switch {
	case cg.Driver == "systemd":
		d.add("cgroups", checkOK, fmt.Sprintf("%s, enforced for nexlets: %s; %s", cg.Mode, orDash(strings.Join(cg.Enforced, ",")), orDash(cg.Reason)), "")
	case cg.Mode == "" || cg.Mode == "none":
		d.add("cgroups", checkWarn, "no cgroup isolation: "+orDash(cg.Reason),
			"run nexd under systemd with Delegate=yes (the shipped unit does)")
	case len(cg.Enforced) < 3:
		d.add("cgroups", checkWarn, fmt.Sprintf("%s, enforced: %s; %s", cg.Mode, orDash(strings.Join(cg.Enforced, ",")), cg.Reason),
			"enable the missing controllers (cgroup v2 with Delegate=yes gives memory, cpu and pids)")
	default:
		d.add("cgroups", checkOK, fmt.Sprintf("%s, enforced: %s", cg.Mode, strings.Join(cg.Enforced, ",")), "")
	}
	switch cg.Driver {
	case "systemd":
		d.add("cgroup driver", checkOK, "systemd: each workload in its own transient scope nex-<id>.scope in nex-workloads.slice (systemctl status, systemd-cgtop)", "")
	default:
		d.add("cgroup driver", checkOK, "cgroupfs: workloads in nexd's delegated subtree (workloads/<id> under nexd.service)", "")
	}

	// control_allow_others = "status" (the default) makes the socket 0666 on purpose:
	// others may read the status and nothing else (control.Server authorises each
	// call from SO_PEERCRED).
	sockMode, sockFix := fs.FileMode(0o660), "the socket should be 0660, group nex"
	if others := val("control_allow_others"); others == "" || others == "status" {
		sockMode, sockFix = 0o666, "the socket should be at most 0666 (control_allow_others = \"status\": others may read the status only)"
	}
	d.pathMode("control socket", d.a.socket, sockMode, sockFix)
	d.nexGroup()
	if dir := val("state_dir"); dir != "" {
		d.pathMode("state directory", dir, 0o750, "chmod 0700 (or 0750) the state directory: it holds the node's seeds")
	}
	d.unit()
}

// nexGroup warns when group nex, whose members may use every control command, does not
// exist: only root can then operate the node.
func (d *doctor) nexGroup() {
	if _, err := user.LookupGroup("nex"); err != nil {
		d.add("group nex", checkWarn, "no group nex on this host: only root may use the control socket's admin commands ("+err.Error()+")",
			"groupadd --system nex, then add operators to it (usermod -aG nex NAME); the packages create it")
		return
	}
	d.add("group nex", checkOK, "exists: its members may use every control command", "")
}

// pathMode warns when path grants more than allowed to others.
func (d *doctor) pathMode(check, path string, allowed fs.FileMode, fix string) {
	fi, err := os.Stat(path)
	if err != nil {
		d.add(check, checkWarn, err.Error(), "")
		return
	}
	mode := fi.Mode().Perm()
	owner := ""
	if s, ok := fi.Sys().(*syscall.Stat_t); ok {
		owner = fmt.Sprintf(", uid %d gid %d", s.Uid, s.Gid)
	}
	detail := fmt.Sprintf("%s mode %#o%s", path, mode, owner)
	if mode&^allowed != 0 {
		d.add(check, checkFail, detail+": too open", fix)
		return
	}
	d.add(check, checkOK, detail, "")
}

// unit reads the nexd unit's notify and watchdog settings from systemd.
func (d *doctor) unit() {
	out, err := exec.Command("systemctl", "show", "nexd.service", "--property=LoadState,Type,NotifyAccess,WatchdogUSec").Output()
	if err != nil {
		d.add("systemd unit", checkWarn, "systemctl is not available: "+err.Error(), "run nexd as the shipped nexd.service")
		return
	}
	p := map[string]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		if k, v, ok := strings.Cut(l, "="); ok {
			p[k] = v
		}
	}
	switch {
	case p["LoadState"] != "loaded":
		d.add("systemd unit", checkWarn, "nexd.service is "+orDash(p["LoadState"]), "install contrib/systemd/nexd.service (the packages do)")
	case p["Type"] != "notify" && p["Type"] != "notify-reload":
		d.add("systemd unit", checkFail, "Type="+p["Type"]+": systemd does not wait for readiness", "Type=notify in nexd.service")
	case p["WatchdogUSec"] == "" || p["WatchdogUSec"] == "0" || p["WatchdogUSec"] == "infinity":
		d.add("systemd unit", checkWarn, "Type="+p["Type"]+", no watchdog", "WatchdogSec=30s in nexd.service restarts a hung node")
	default:
		d.add("systemd unit", checkOK, fmt.Sprintf("Type=%s, NotifyAccess=%s, WatchdogSec=%s", p["Type"], p["NotifyAccess"], p["WatchdogUSec"]), "")
	}
}
