package native

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackNamedUserOfAdminGroup: the operator lists a named user in workload_users
// that is also in the node's admin group (nex, here a group of the test's own): its
// members are the control socket's admins, which hands them the node's NATS admin
// credential, and the packaged configuration file is 0640 root:nex, holding the
// issuer keys. A tenant who deploys as that user could read that file (here a stand-in
// 0640 root:<group> file with a secret): before, the workload ran with the group and
// printed it; now the start is refused, naming the group and allow_root_workloads, as
// a start as root is. A named user outside the group still runs.
func TestAttackNamedUserOfAdminGroup(t *testing.T) {
	needRoot(t)
	admins := testkit.NewGroup(t)
	admin := testkit.NewUser(t, admins)
	plain := testkit.NewUser(t)
	const secret = "issuer-signing-key-stand-in"
	cfg := filepath.Join(publicDir(t), "config.json")
	if err := os.WriteFile(cfg, []byte(secret+"\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(cfg, 0, int(admins.GID)); err != nil {
		t.Fatal(err)
	}
	fn := newFakeNode(t)
	fn.startNexlet(Config{Users: UserPolicy{Allowed: []string{admin.Name, plain.Name}, AdminGroup: admins.Name}})
	uri := script(t, "cat "+cfg+" 2>&1; echo done")

	r := fn.start("admin", startReq(protocol.LifecycleJob, "admin", map[string]any{"uri": uri, "user": admin.Name}, fn.creds()))
	if r.code == "" {
		fn.waitLog("admin", "stdout", "done")
		t.Fatalf("a workload ran as %s, a member of the admin group %s; it printed %q", admin.Name, admins.Name, fn.logLines("admin", "stdout"))
	}
	if !strings.Contains(r.errText, admins.Name) || !strings.Contains(r.errText, "allow_root_workloads") {
		t.Errorf("refusal %q names neither the group %s nor allow_root_workloads", r.errText, admins.Name)
	}

	fn.mustStart("plain", startReq(protocol.LifecycleJob, "plain", map[string]any{"uri": uri, "user": plain.Name}, fn.creds()))
	fn.waitLog("plain", "stdout", "done")
	for _, l := range fn.logLines("plain", "stdout") {
		if strings.Contains(l, secret) {
			t.Errorf("a user outside the group read the file: %q", l)
		}
	}
}

// TestReplayedAdminUserKeepsRunning: a workload deployed as a named user of the admin
// group before such starts were refused is replayed to the nexlet (a restart of nexd
// or of its host): it runs on, with a warning logged (refused, it would be listed as
// failed and left unmanaged); new starts are refused (TestAttackNamedUserOfAdminGroup).
func TestReplayedAdminUserKeepsRunning(t *testing.T) {
	needRoot(t)
	admins := testkit.NewGroup(t)
	admin := testkit.NewUser(t, admins)
	fn := newFakeNode(t)
	req := startReq(protocol.LifecycleService, "oldadmin", map[string]any{
		"uri": script(t, `echo "running as $(id -un)"; exec sleep 1000`), "user": admin.Name}, fn.creds())
	fn.replayWith(Config{Users: UserPolicy{Allowed: []string{admin.Name}, AdminGroup: admins.Name}}, "oldadmin", req)
	fn.waitLog("oldadmin", "stdout", "running as "+admin.Name)
	if s, ok := fn.summary("oldadmin"); !ok || s.WorkloadState != protocol.WorkloadRunning {
		t.Errorf("replayed workload: %+v %v; want running", s, ok)
	}
}
