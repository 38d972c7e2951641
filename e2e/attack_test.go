package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/nexlet/native"
	"github.com/nexd-project/nexd/protocol"
)

// The attacker suite: each test plays one attacker against the real binaries and
// asserts that the attack fails. Where the attack needs a mechanism that could silently
// break (a script that cannot tell success from failure), a control run with the
// privilege the node refuses by default shows that the same attack succeeds.

// attackScript tries each attack and prints "ATTACK-OK <what>" or "DENIED <what>".
// Arguments: pairs of <what> <shell command>.
const attackScript = `#!/bin/sh
while [ $# -ge 2 ]; do
	if sh -c "$2" >/dev/null 2>&1; then echo "ATTACK-OK $1"; else echo "DENIED $1"; fi
	shift 2
done
echo "ATTACKS-DONE"
`

// attackLines runs the attack script as a job and returns its output lines.
func attackLines(t *testing.T, n *node, nc *nats.Conn, ns string, ctlArgs []string, attacks [][2]string) []string {
	t.Helper()
	script := filepath.Join(testkit.PublicDir(t), "attack.sh")
	testkit.WriteFile(t, script, attackScript)
	if err := os.Chmod(script, 0o755); err != nil {
		t.Fatal(err)
	}
	sub, err := nc.SubscribeSync("$NEX.FEED." + ns + ".logs.*.stdout")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	flush(t, nc)
	args := append(append([]string{}, ctlArgs...), "--namespace", ns, "--json", "workload", "run", "--lifecycle", "job", "--name", "attacker", "--", script)
	for _, a := range attacks {
		args = append(args, a[0], a[1])
	}
	out, errOut, code := n.ctl(t, args...)
	if code != 0 {
		t.Fatalf("nexctl workload run: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	var lines []string
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		m, err := sub.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		l := string(m.Data)
		if l == "ATTACKS-DONE" {
			return lines
		}
		lines = append(lines, l)
	}
	t.Fatalf("attack script did not finish; got %q\nnexd:\n%s", lines, n.out.String())
	return nil
}

// TestAttackWorkloadReachesNoSecret: a workload (deploy rights in one namespace) tries
// to read every secret on the node and to signal nexd and its nexlet. Before issue 12
// every workload ran as nexd's uid (root) and each of these succeeded; the control run
// as root (allow_root_workloads) shows they still would.
func TestAttackWorkloadReachesNoSecret(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads switch to dynamic uids only under a root nexd")
	}
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	nodeCreds := op.CredsFile(t, "nexd-node")
	dir := t.TempDir()
	// A secret-holding config file where nexd reads it (./config.json).
	cfgFile := testkit.WriteFile(t, filepath.Join(dir, "config.json"),
		fmt.Sprintf(`{"issuer_signing_key": %q, "issuer_signing_key_root_account": %q, "allow_root_workloads": true}`, op.SigningSeed, op.Account))
	if err := os.Chmod(cfgFile, 0o600); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, nodeOpts{external: op.Server.ClientURL(), dir: dir, extra: []string{"--nats.creds-file", nodeCreds}})
	st := n.waitReady(t)
	nc, err := nats.Connect(op.Server.ClientURL(), nats.UserCredentials(nodeCreds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	ctlArgs := []string{"--nats.creds-file", nodeCreds}

	// A victim workload in another namespace, holding its own creds file.
	sub, _ := nc.SubscribeSync("$NEX.FEED.victim.logs.*.stdout")
	flush(t, nc)
	n.mustCtl(t, append(ctlArgs, "--namespace", "victim", "--json", "workload", "run", "--name", "victim", "--",
		"/bin/sh", "-c", `echo "creds=$NEX_WORKLOAD_NATS_CREDS_FILE pid=$$"; exec sleep 600`)...)
	m, err := sub.NextMsg(30 * time.Second)
	if err != nil || !strings.HasPrefix(string(m.Data), "creds=/") {
		t.Fatalf("victim's creds file: %v %v", m, err)
	}
	victimCreds, victimPID, _ := strings.Cut(strings.TrimPrefix(string(m.Data), "creds="), " pid=")

	nexletPID := 0
	for _, x := range st.Nexlets {
		if x.Name == "native" {
			nexletPID = x.PID
		}
	}
	if nexletPID == 0 {
		t.Fatalf("no native nexlet pid in %+v", st.Nexlets)
	}
	nexdPID := strconv.Itoa(n.cmd.Process.Pid)
	attacks := [][2]string{
		{"read-node-seed", "cat " + filepath.Join(n.stateDir, "node.seed")},
		{"list-state-dir", "ls " + n.stateDir},
		{"read-config", "cat " + cfgFile},
		{"read-victim-creds", "cat " + victimCreds},
		{"read-nexd-environ", "cat /proc/" + nexdPID + "/environ"},
		{"read-nexlet-environ", "cat /proc/" + strconv.Itoa(nexletPID) + "/environ"},
		{"signal-nexd", "kill -0 " + nexdPID},
		{"signal-nexlet", "kill -0 " + strconv.Itoa(nexletPID)},
		{"signal-victim", "kill -0 " + victimPID},
		{"read-victim-environ", "cat /proc/" + victimPID + "/environ"},
	}
	if _, err := os.Stat(filepath.Join(n.stateDir, "node.seed")); err != nil {
		t.Fatalf("the node seed the attack targets is not there: %v", err)
	}
	// Its own cgroup: raise its memory limit, move into the parent (out of its limits,
	// into what nexd counts as its nexlet's or the node's), make a group below it. The
	// files are root's (nexd delegates nothing to a workload's uid).
	if g := workloadCgroup(victimPID); g != "" {
		own := `g=$(sed -n 's/^[0-9]*:memory://p' /proc/self/cgroup); d=/sys/fs/cgroup/memory$g; ` +
			`[ -n "$g" ] || { g=$(sed -n 's/^0:://p' /proc/self/cgroup); d=/sys/fs/cgroup$g; }; `
		attacks = append(attacks,
			[2]string{"cgroup-raise-own-memory-limit", own + `if [ -f $d/memory.max ]; then echo max > $d/memory.max; else echo -1 > $d/memory.limit_in_bytes; fi`},
			[2]string{"cgroup-move-to-parent", own + `echo $$ > $(dirname $d)/cgroup.procs`},
			[2]string{"cgroup-make-child", own + `mkdir $d/escape && rmdir $d/escape`},
			// Every workload's cgroup is named for its id: listing the directory that
			// holds them gave every other tenant's workload ids on the node (and led to
			// their usage files); it may be passed through, not read.
			[2]string{"cgroup-list-other-workloads", own + `ls $(dirname $d) | grep -qx ` + filepath.Base(g)})
	} else {
		t.Logf("the victim workload runs in no cgroup of its own here (%s): cgroup attacks left out", victimPID)
	}

	lines := attackLines(t, n, nc, "tenant", ctlArgs, attacks)
	for _, a := range attacks {
		if !contains(lines, "DENIED "+a[0]) {
			t.Errorf("attack %s not denied: output %q", a[0], lines)
		}
	}

	// Control: the same attacks as root (which the node allows here) succeed, so the
	// script does tell success from failure.
	lines = attackLines(t, n, nc, "tenant", append(ctlArgs, "--user", "root"), attacks)
	for _, a := range attacks {
		if !contains(lines, "ATTACK-OK "+a[0]) {
			t.Errorf("control run as root: %s did not succeed: %q", a[0], lines)
		}
	}
}

// workloadCgroup is the directory of the memory (v1) or unified (v2) cgroup of the
// workload with pid, or "" when it runs in none of its own (no cgroups here).
func workloadCgroup(pid string) string {
	b, err := os.ReadFile("/proc/" + pid + "/cgroup")
	if err != nil {
		return ""
	}
	dir := ""
	for _, l := range strings.Split(string(b), "\n") {
		parts := strings.SplitN(l, ":", 3)
		switch {
		case len(parts) < 3:
		case parts[1] == "memory":
			dir = "/sys/fs/cgroup/memory" + parts[2]
		case parts[0] == "0" && parts[2] != "/" && dir == "":
			dir = "/sys/fs/cgroup" + parts[2]
		}
	}
	if !strings.Contains(dir, "/workloads/") {
		return ""
	}
	if _, err := os.Stat(dir); err != nil {
		return ""
	}
	return dir
}

// TestAttackNodePasswordNeverReachesChildren: nexd's own NATS user:password given in
// --nats.servers (the workload could log in as the node with it). Before issue 12 it
// was in every nexlet's and workload's environment (NEX_WORKLOAD_NATS_SERVERS). The
// same URL without its scheme (nats.go adds nats://, and so connects with it): net/url
// read "admin:PASSWORD@host:port" as the scheme "admin" with no user, so it was handed
// to every child whole, and shown whole in `nexctl status`, readable by every local
// user; now every server URL loses its userinfo however it is spelled.
func TestAttackNodePasswordNeverReachesChildren(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	t.Run("with scheme", func(t *testing.T) { nodePasswordNeverReachesChildren(t, "nats://admin:") })
	t.Run("without scheme", func(t *testing.T) { nodePasswordNeverReachesChildren(t, "admin:") })
}

func nodePasswordNeverReachesChildren(t *testing.T, userPrefix string) {
	t.Parallel()
	const password = "n0de-s3cret-pw"
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) {
		// The node logs in as admin; children get the anonymous user.
		o.Users = []*server.User{{Username: "admin", Password: password}, {Username: "anon"}}
		o.NoAuthUser = "anon"
	}})
	u := strings.Replace(s.ClientURL(), "nats://", userPrefix+password+"@", 1)
	n := startNode(t, nodeOpts{external: u})
	st := n.waitReady(t)
	nc, err := nats.Connect(u)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	sub, _ := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	flush(t, nc)
	n.mustCtl(t, "--json", "workload", "run", "--lifecycle", "job", "--name", "envdump", "--", "/usr/bin/env")
	var env []string
	wait := 30 * time.Second
	for {
		m, err := sub.NextMsg(wait)
		if err != nil {
			break
		}
		env = append(env, string(m.Data))
		wait = 3 * time.Second // the rest of the dump follows at once
	}
	all := strings.Join(env, "\n")
	if !strings.Contains(all, "NEX_WORKLOAD_NATS_SERVERS=") {
		t.Fatalf("no environment from the workload: %q", all)
	}
	if strings.Contains(all, password) {
		t.Errorf("the node's NATS password reached the workload's environment:\n%s", all)
	}
	for _, x := range st.Nexlets {
		b, err := os.ReadFile("/proc/" + strconv.Itoa(x.PID) + "/environ")
		if err != nil {
			t.Fatalf("nexlet %s environ: %v", x.Name, err)
		}
		if strings.Contains(string(b), password) {
			t.Errorf("the node's NATS password is in nexlet %s's environment", x.Name)
		}
	}
	// Nor does --check, nexctl config or the public status show it.
	cfg := n.mustCtl(t, "--json", "config")
	if strings.Contains(cfg, password) {
		t.Errorf("nexctl config shows the password")
	}
	if status := n.mustCtl(t, "--json", "status"); strings.Contains(status, password) {
		t.Errorf("nexctl status shows the password:\n%s", status)
	}
	var raw map[string]any
	if err := json.Unmarshal([]byte(cfg), &raw); err != nil {
		t.Fatalf("nexctl config --json: %v", err)
	}
}

func contains(list []string, s string) bool { return slices.Contains(list, s) }

// TestAttackLocalUserCannotTakeOverEmbeddedNATS: a local user outside group nex, on a
// node with the zero-config embedded server. Before issue 12 that server had no
// authentication: `nexctl --nats.servers nats://127.0.0.1:4222 workload run -- /usr/bin/id`
// printed uid=0 and `nexctl node lameduck` stopped the node for good.
func TestAttackLocalUserCannotTakeOverEmbeddedNATS(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	t.Parallel()
	n := startNode(t, nodeOpts{publicSocket: true})
	st := n.waitReady(t)
	mallory := testkit.NewUser(t)
	ctl := nexctlBin(t)
	as := func(args ...string) (string, int) {
		cmd := mallory.Command(ctl, args...)
		out, err := cmd.CombinedOutput()
		code := 0
		if err != nil {
			ee, ok := err.(*exec.ExitError)
			if !ok {
				t.Fatalf("nexctl as %s: %v", mallory.Name, err)
			}
			code = ee.ExitCode()
		}
		return string(out), code
	}

	// No credentials, no connection.
	if nc, err := nats.Connect(n.natsURL, nats.Timeout(5*time.Second)); err == nil {
		nc.Close()
		t.Error("an unauthenticated client connected to the embedded NATS server")
	} else if !strings.Contains(strings.ToLower(err.Error()), "authorization") {
		t.Errorf("unauthenticated connect: %v, want an authorization error", err)
	}
	for _, args := range [][]string{
		{"--nats.servers", n.natsURL, "--nats.timeout", "3s", "workload", "run", "--lifecycle", "job", "--", "/usr/bin/id"},
		{"--control-socket", n.socket, "--nats.timeout", "3s", "workload", "run", "--lifecycle", "job", "--", "/usr/bin/id"},
		{"--nats.servers", n.natsURL, "--nats.timeout", "3s", "node", "lameduck", st.NodeID, "--delay", "1s"},
		{"--control-socket", n.socket, "lameduck", "--delay", "1s"},
	} {
		if out, code := as(args...); code == 0 {
			t.Errorf("as %s, nexctl %v succeeded:\n%s", mallory.Name, args, out)
		}
	}
	// The node is still up and took no workload.
	time.Sleep(2 * time.Second)
	if cur := n.waitReady(t); cur.State != "running" || len(n.workloads(t)) != 0 {
		t.Errorf("after the attacks: state %s, workloads %v", cur.State, n.workloads(t))
	}
	if out, code := as("--control-socket", n.socket, "creds", "issue", "--admin", "--ttl", "1h"); code == 0 {
		t.Errorf("as %s, nexctl creds issue succeeded:\n%s", mallory.Name, out)
	}
	// Control: root (a local admin) needs no set-up for the same deploy, and can hand a
	// remote operator a credential that works.
	n.mustCtl(t, "workload", "run", "--lifecycle", "job", "--", "/usr/bin/id")
	creds := testkit.WriteFile(t, filepath.Join(t.TempDir(), "admin.creds"), n.mustCtl(t, "creds", "issue", "--admin", "--ttl", "1h"))
	nc, err := nats.Connect(n.natsURL, nats.UserCredentials(creds))
	if err != nil {
		t.Fatalf("connect with the issued admin creds: %v", err)
	}
	nc.Close()
}

// floodScript opens many control connections that announce a body and never send it,
// then reports how many the server still holds after a while.
const floodScript = `
import socket, sys, time
path, n, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns = []
for i in range(n):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        s.sendall(b"GET /v1/status HTTP/1.1\r\nHost: nexd\r\nContent-Length: 1000\r\n\r\n")
    except OSError:
        continue
    s.settimeout(0.01)
    conns.append(s)
print("opened", len(conns), flush=True)
live = set(range(len(conns)))
deadline = time.time() + wait
while live and time.time() < deadline:
    for i in list(live):
        try:
            if conns[i].recv(65536) == b"":
                live.discard(i)
        except socket.timeout:
            pass
        except OSError:
            live.discard(i)
    time.sleep(0.1)
print("held", len(live), flush=True)
`

// TestAttackSlowBodyFloodLeavesSocketServing: a local user outside group nex opens 300
// control connections that send Content-Length: 1000 and no body. Before issue 12 all
// 300 were held for over three minutes; now a user gets a few connections, each
// dropped after the read timeout, and admins are served throughout.
func TestAttackSlowBodyFloodLeavesSocketServing(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	py := "/usr/bin/python3" // the system's: every user can run it
	if _, err := os.Stat(py); err != nil {
		t.Skip("needs /usr/bin/python3 to play the flooding client")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{publicSocket: true})
	n.waitReady(t)
	mallory := testkit.NewUser(t)
	cmd := mallory.Command(py, "-c", floodScript, n.socket, "300", "30")
	var out testkit.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	testkit.EventuallyWithin(t, 30*time.Second, "flood opened", func() bool { return strings.Contains(out.String(), "opened") })
	// Admins are served during the flood.
	c := control.NewClient(n.socket)
	defer c.Close()
	for range 5 {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		_, err := c.Status(ctx)
		cancel()
		if err != nil {
			t.Fatalf("status during the flood: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("flood client: %v\n%s", err, out.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("flood client did not finish")
	}
	if !strings.Contains(out.String(), "held 0\n") {
		t.Errorf("connections still held by the server after 30s: %s", out.String())
	}
}

// TestAttackControlCharactersInNames: a tenant, as the NATS user an operator gives it
// (mint.TenantPermissions, through a NATS context with its inbox prefix, no control
// socket), names a workload "\x1b[31m…" to drive the operator's terminal. Before issue
// 12 the name was accepted and printed raw by nexctl. Now the node refuses it at
// deploy, and nexctl never prints control characters it got from the network. The
// same user runs and lists a plainly named workload.
func TestAttackControlCharactersInNames(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	n := startNode(t, nodeOpts{external: op.Server.ClientURL(), extra: []string{"--nats.creds-file", op.CredsFile(t, "nexd-node"),
		"--insecure-argv", "--issuer-signing-key", op.SigningSeed, "--issuer-signing-key-root-account", op.Account}})
	n.waitReady(t)
	tenant := tenantNexctl(t, op, "tenant-a")
	if out, errOut, code := tenant("--json", "workload", "run", "--name", "plain", "--", "/bin/sleep", "600"); code != 0 {
		t.Fatalf("the tenant's own deploy: exit %d\nstdout: %s\nstderr: %s\nnexd:\n%s", code, out, errOut, n.out.String())
	}
	if out, errOut, code := tenant("workload", "list"); code != 0 || !strings.Contains(out, "plain") {
		t.Fatalf("the tenant's own list: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	out, errOut, code := tenant("workload", "run", "--name", "\x1b[31mred\x1b[0m", "--", "/bin/true")
	if code == 0 || !strings.Contains(errOut, "workload name") {
		t.Errorf("control characters in a name: exit %d\nstdout: %q\nstderr: %q", code, out, errOut)
	}
	if strings.ContainsRune(out+errOut, 0x1b) {
		t.Errorf("nexctl printed a raw ESC: %q %q", out, errOut)
	}
	if ws := n.workloads(t); len(ws) != 1 {
		t.Errorf("workloads %+v, want only the plain one", ws)
	}
}

// TestAttackArtifactOfAnotherNamespace: tenant A knows the digest of tenant B's
// nats:// artifact (the artifact is B's, in bucket tenant-b, which A's workloads may
// not read). A puts an object of its own into its bucket and rewrites the object's
// metadata to claim B's digest, then deploys it. The node must not hand A the copy of
// B's artifact it holds for B: A's deploy downloads A's own bytes, whose digest does not
// match, and fails. (Before the store was keyed by namespace, A ran B's artifact.) A
// control deploy shows A's workload credentials cannot read bucket tenant-b directly.
func TestAttackArtifactOfAnotherNamespace(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads under dynamic uids")
	}
	t.Parallel()
	n, creds, nc := signingNode(t)
	n.waitNative(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	put := func(bucket, name string, body []byte) *jetstream.ObjectInfo {
		t.Helper()
		obs, err := js.CreateObjectStore(t.Context(), jetstream.ObjectStoreConfig{Bucket: bucket})
		if err != nil {
			t.Fatal(err)
		}
		info, err := obs.PutBytes(t.Context(), name, body)
		if err != nil {
			t.Fatal(err)
		}
		return info
	}
	const token = "token=B-SECRET-42"
	secret := put("tenant-b", "secret_v1", []byte("#!/bin/sh\necho "+token+"\nexec sleep 600\n"))
	n.natsRun(t, creds, "tenant-b", "--name", "secret", "--start-request", `{"uri":"nats://tenant-b/secret:v1"}`)

	deployA := func(name, uri string) (string, string, int) {
		return run(t, nil, nexctlBin(t), "--control-socket", n.socket, "--nats.servers", n.natsURL,
			"--nats.creds-file", creds, "--namespace", "tenant-a", "--json",
			"workload", "run", "--name", name, "--start-request", `{"uri":"`+uri+`"}`)
	}
	// Control (in the background): A's workloads cannot read B's bucket, and the deploy
	// says so with the server's refusal. Before, the nexlet's fetch heard no answer and
	// the deploy failed on its deadline only, after nexctl's whole deploy timeout.
	control := make(chan string, 1)
	go func() {
		start := time.Now()
		out, errOut, code := deployA("direct", "nats://tenant-b/secret:v1")
		t.Logf("tenant-a's deploy from tenant-b's bucket: exit %d after %v: %s", code, time.Since(start).Round(time.Millisecond), strings.TrimSpace(errOut))
		switch {
		case code == 0:
			control <- fmt.Sprintf("tenant-a deployed tenant-b's artifact from tenant-b's bucket:\n%s\n%s", out, errOut)
		case !strings.Contains(out+errOut, "Permissions Violation"):
			control <- fmt.Sprintf("tenant-a's deploy from tenant-b's bucket failed without the server's refusal:\n%s\n%s", out, errOut)
		}
		close(control)
	}()
	defer func() {
		if msg := <-control; msg != "" {
			t.Error(msg)
		}
	}()

	// A's own object, its metadata rewritten to claim B's digest.
	own := put("tenant-a", "thief_v1", []byte("#!/bin/sh\necho mine\nexec sleep 600\n"))
	own.Digest, own.ModTime = secret.Digest, time.Time{}
	meta, err := json.Marshal(own)
	if err != nil {
		t.Fatal(err)
	}
	m := nats.NewMsg("$O.tenant-a.M." + base64.URLEncoding.EncodeToString([]byte("thief_v1")))
	m.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	m.Data = meta
	if _, err := js.PublishMsg(t.Context(), m); err != nil {
		t.Fatal(err)
	}
	aObs, err := js.ObjectStore(t.Context(), "tenant-a")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := aObs.GetInfo(t.Context(), "thief_v1"); err != nil || got.Digest != secret.Digest {
		t.Fatalf("forged metadata not in place: %v %+v", err, got)
	}

	out, errOut, code := deployA("thief", "nats://tenant-a/thief:v1")
	if code == 0 {
		var r runResult
		_ = json.Unmarshal([]byte(out), &r)
		var o, e string
		for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
			if o, e, _ = n.ctl(t, "--nats.creds-file", creds, "workload", "logs", r.ID, "--tail", "5"); strings.Contains(o, token) {
				t.Fatalf("tenant-a's workload %s ran tenant-b's artifact: %q", r.ID, o)
			}
		}
		t.Fatalf("the deploy of an object whose digest is not its content's succeeded: %s\nits logs: %s %s", out, o, e)
	}
	if !strings.Contains(errOut+out, "digest") {
		t.Errorf("the refused deploy does not say the digest is wrong:\n%s\n%s", out, errOut)
	}
}

// TestAttackUnsignedBidderPosesAsTrustedNode: with trusted_nodes naming the real node,
// a client on the bus answers an auction the real node does not bid on (a tag it
// lacks) with an unsigned bid that claims the real node's id. Unsigned bids cannot be
// checked against the list, so nexctl must refuse them when trusted_nodes is set: else
// the fake takes the deploy (its argv and artifact), answers "started", and the user is
// told the workload runs on the trusted node while nothing runs. The control run,
// without trusted_nodes, shows the fake does get the deploy (as an upstream node would).
func TestAttackUnsignedBidderPosesAsTrustedNode(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	st := n.waitReady(t)
	nc := testnats.Connect(t, s)
	schema := `{"type":"object","properties":{"uri":{"type":"string"},"argv":{"type":"array"}}}`
	var deploys atomic.Int64
	subs := map[string]nats.MsgHandler{
		protocol.AuctionSubject("tenant"): func(m *nats.Msg) {
			b := protocol.AuctionResponse{BidderID: "fake-unsigned", StartRequestSchema: schema,
				SupportedLifecycles: []protocol.Lifecycle{protocol.LifecycleService, protocol.LifecycleJob}, NodeID: st.NodeID, NodeName: "e2e"}
			out, _ := json.Marshal(b)
			_ = m.Respond(out)
		},
		protocol.DeploySubject("tenant", "fake-unsigned"): func(m *nats.Msg) {
			deploys.Add(1)
			_ = m.Respond([]byte(`{"id":"stolen","name":"stolen"}`))
		},
	}
	for subj, h := range subs {
		if _, err := nc.Subscribe(subj, h); err != nil {
			t.Fatal(err)
		}
	}
	flush(t, nc)
	deploy := func(extra ...string) (string, string, int) {
		args := append([]string{"--control-socket", n.socket, "--nats.servers", s.ClientURL(), "--namespace", "tenant", "--json"}, extra...)
		return run(t, nil, nexctlBin(t), append(args, "workload", "run", "--name", "job", "--tags", "site=nowhere",
			"--", "/bin/sh", "-c", "echo api-token-in-argv")...)
	}
	// Control: without trusted_nodes an unsigned bid is used (upstream nodes do not sign).
	if out, errOut, code := deploy(); code != 0 || deploys.Load() != 1 || !strings.Contains(out, "stolen") {
		t.Fatalf("control run: the unsigned fake did not get the deploy (exit %d, %d deploys)\n%s\n%s", code, deploys.Load(), out, errOut)
	}
	out, errOut, code := deploy("--trusted-node", st.NodeID)
	if deploys.Load() != 1 {
		t.Fatalf("with --trusted-node the unsigned bid claiming %s got the deploy (exit %d): %s\n%s", st.NodeID, code, out, errOut)
	}
	if code == 0 || !strings.Contains(errOut, "trusted_nodes") {
		t.Errorf("refused unsigned bid: exit %d, want a failure that names trusted_nodes\n%s\n%s", code, out, errOut)
	}
}

// TestAttackWorkloadInheritsNoDescriptor: a workload lists its open descriptors. The
// nexlet holds the node's socket pair, its NATS connection, every other workload's
// output FIFOs and pidfds, and the v1 fork pool forks from descriptor tables of the
// nexlet's own: a workload must hold only its stdio (and ls its directory), whether
// it was forked from a pool thread or, with the pool taken by concurrent deploys,
// from the nexlet's own table.
func TestAttackWorkloadInheritsNoDescriptor(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	nc := testnats.Connect(t, s)
	logs, err := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	const count = 8
	res := n.runWorkloads(t, count, func(i int) []string {
		return []string{"--name", fmt.Sprintf("fds%d", i), "--lifecycle", "job", "--", "/bin/sh", "-c", "ls -l /proc/self/fd/; echo FD-DONE"}
	})
	fds := map[string][]string{} // workload id -> "fd -> target"
	done := 0
	deadline := time.Now().Add(60 * time.Second)
	for done < count && time.Now().Before(deadline) {
		m, err := logs.NextMsg(time.Until(deadline))
		if err != nil {
			break
		}
		id := strings.Split(m.Subject, ".")[4]
		line := string(m.Data)
		if line == "FD-DONE" {
			done++
			continue
		}
		if f := strings.Fields(line); len(f) >= 3 && slices.Contains(f, "->") {
			i := slices.Index(f, "->")
			fds[id] = append(fds[id], f[i-1]+" -> "+strings.Join(f[i+1:], " "))
		}
	}
	if done != count {
		t.Fatalf("%d of %d workloads listed their descriptors: %v", done, count, fds)
	}
	for _, r := range res {
		var nums []string
		for _, l := range fds[r.ID] {
			nums = append(nums, strings.Fields(l)[0])
		}
		slices.Sort(nums)
		// ls's own directory is 3.
		if !slices.Equal(nums, []string{"0", "1", "2", "3"}) {
			t.Errorf("workload %s holds descriptors %q, want 0-2 and ls's 3", r.ID, fds[r.ID])
		}
	}
}

// tokenAuth admits a client with the node's token, and the node's children (which get
// the server's URL without it) anonymously; a wrong token is refused, so the token is
// what makes a client the node.
type tokenAuth struct {
	token string
	seen  atomic.Int64 // clients admitted with the token
}

func (a *tokenAuth) Check(c server.ClientAuthentication) bool {
	switch c.GetOpts().Token {
	case a.token:
		a.seen.Add(1)
		return true
	case "":
		return true
	}
	return false
}

// TestAttackLocalUserReadsNodeNATSToken: nats.go takes the user name of a URL without a
// password as a token (nats://TOKEN@host). A local user outside group nex (and so a
// workload: the socket admits its uids to status too) asks the public `nexctl status`,
// which named the node's server with Go's url.Redacted: it hides a password only, so
// the token was printed in full. The same URL went to nexd's log ("connected to NATS").
func TestAttackLocalUserReadsNodeNATSToken(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	t.Parallel()
	const token = "n0de-t0ken-s3cret"
	auth := &tokenAuth{token: token}
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) {
		o.CustomClientAuthentication = auth
	}})
	u := strings.Replace(s.ClientURL(), "nats://", "nats://"+token+"@", 1)
	n := startNode(t, nodeOpts{external: u, publicSocket: true})
	st := n.waitReady(t)
	if auth.seen.Load() == 0 {
		t.Fatalf("the node did not connect with its token")
	}
	if !st.NATS.Connected || !strings.Contains(st.NATS.Server, strings.TrimPrefix(s.ClientURL(), "nats://")) {
		t.Fatalf("status names no server: %+v", st.NATS)
	}
	mallory := testkit.NewUser(t)
	out, err := mallory.Command(nexctlBin(t), "--control-socket", n.socket, "--json", "status").CombinedOutput()
	if err != nil {
		t.Fatalf("nexctl status as %s (a public route): %v\n%s", mallory.Name, err, out)
	}
	if !strings.Contains(string(out), strings.TrimPrefix(s.ClientURL(), "nats://")) {
		t.Fatalf("nexctl status as %s names no server:\n%s", mallory.Name, out)
	}
	if strings.Contains(string(out), token) {
		t.Errorf("nexctl status as %s (outside group nex) shows the node's NATS token:\n%s", mallory.Name, out)
	}
	if strings.Contains(n.out.String(), token) {
		t.Errorf("nexd's log shows the node's NATS token")
	}
}

// snoopSocket is a local user's stand-in for nexd's control socket: it takes over the
// path, records what each client sends and answers 503 (perl: on every host, and any
// user may run it).
const snoopSocket = `use IO::Socket::UNIX; $| = 1;
my ($path, $log) = @ARGV;
my $l = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Local => $path, Listen => 8) or die "listen: $!";
print "LISTENING\n";
while (my $c = $l->accept) {
	open(my $f, ">>", $log) or die; my $buf = "";
	$c->blocking(0);
	for (1 .. 20) { my $n = sysread($c, my $b, 65536); $buf .= $b if $n; select(undef, undef, undef, 0.05); }
	print $f $buf; close $f;
	print $c "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"; close $c;
}`

// TestAttackControlSocketInAnotherUsersDir: control_socket names a path in a directory
// another local user made (mallory's, say, under a public directory) and so may rename
// in. nexd took it (checking the state and runtime directories' way, not the socket's),
// so she moved nexd's socket away and listened at its path herself: an admin's nexctl
// then sent her what it sends nexd (here `nexctl secret set`, a tenant's secret in the
// body; she could also answer GET /v1/nats with a server of hers). Now nexd refuses such
// a control_socket at start, naming the directory and its owner.
func TestAttackControlSocketInAnotherUsersDir(t *testing.T) {
	mallory, pub := socketAttacker(t)
	if err := os.Chmod(pub, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	hers := filepath.Join(pub, "nex")
	if out, err := mallory.Command("/bin/mkdir", "-m", "0755", hers).CombinedOutput(); err != nil {
		t.Fatalf("mkdir as %s: %v: %s", mallory.Name, err, out)
	}
	moveControlSocket(t, mallory, hers, hers+" is owned by uid "+strconv.Itoa(int(mallory.UID)))
}

// TestAttackControlSocketInGroupWritableDir: control_socket names a path in root's
// directory, but one a group may write in (`root:staff 0775`, as /var/local is on
// Debian), and mallory is in that group: she may rename in it as in her own, moved
// nexd's socket away and read an admin's `nexctl secret set`. Before, nexd's check
// refused a directory others may write in only when every user could; now it refuses a
// group-writable one too, naming the directory, its group and mode (unless the group is
// root's, nexd's own when it is not root, or the control group nex: daemon
// TestGroupWritableDirs).
func TestAttackControlSocketInGroupWritableDir(t *testing.T) {
	staff := testkit.NewGroup(t)
	mallory, pub := socketAttacker(t, staff)
	shared := filepath.Join(pub, "nex")
	if err := os.Mkdir(shared, 0o775); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(shared, 0, int(staff.GID)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(shared, 0o775); err != nil {
		t.Fatal(err)
	}
	moveControlSocket(t, mallory, shared, fmt.Sprintf("%s (mode 0775, group %s (gid %d)) is writable by its group", shared, staff.Name, staff.GID))
}

// socketAttacker makes mallory, in groups, and a public directory for the control
// socket and state directory attacks.
func socketAttacker(t *testing.T, groups ...*testkit.Group) (*testkit.User, string) {
	t.Helper()
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	t.Parallel()
	return testkit.NewUser(t, groups...), testkit.PublicDir(t)
}

// moveControlSocket starts a node with its control socket in dir and plays mallory's
// attack: move the socket away, listen at its path, read an admin's secret set. It
// passes when nexd refuses to start with refusal in its output.
func moveControlSocket(t *testing.T, mallory *testkit.User, dir, refusal string) {
	t.Helper()
	hers := dir
	sock := filepath.Join(hers, "nexd.sock")
	n := startNode(t, nodeOpts{extra: []string{"--control-socket", sock}})
	n.socket = sock // the later flag wins
	up := testkit.WaitFor(60*time.Second, func() bool {
		select {
		case <-n.done:
			return true
		default:
		}
		st, err := os.Stat(sock)
		return err == nil && st.Mode()&os.ModeSocket != 0
	})
	select {
	case <-n.done:
		out := n.out.String()
		if !strings.Contains(out, refusal) {
			t.Fatalf("nexd exited without %q:\n%s", refusal, out)
		}
		if _, err := os.Lstat(sock); err == nil {
			t.Errorf("nexd made its socket in %s before it refused it", hers)
		}
		return
	default:
	}
	if !up {
		t.Fatalf("no control socket at %s", sock)
	}
	n.waitReady(t)
	// The attack: her directory, her names.
	logf := filepath.Join(hers, "seen")
	if out, err := mallory.Command("/bin/mv", sock, filepath.Join(hers, "away.sock")).CombinedOutput(); err != nil {
		t.Fatalf("mv as %s: %v: %s", mallory.Name, err, out)
	}
	snoop := mallory.Command("/usr/bin/perl", "-e", snoopSocket, sock, logf)
	stdout, err := snoop.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := snoop.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = snoop.Process.Kill(); _ = snoop.Wait() })
	line := make([]byte, 10)
	if _, err := io.ReadFull(stdout, line); err != nil || string(line) != "LISTENING\n" {
		t.Fatalf("%s's listener: %q %v", mallory.Name, line, err)
	}
	const secret = "tenant-s3cret-value"
	_, _, _ = n.ctl(t, "secret", "set", "--insecure-argv", "system", "DB_PASS", secret)
	seen, _ := os.ReadFile(logf)
	if strings.Contains(string(seen), secret) {
		t.Errorf("nexd took a control socket in %s, where %s may rename: she moved it away and read an admin's secret set:\n%s", hers, mallory.Name, seen)
	} else {
		t.Errorf("nexd took a control socket in %s, where %s may rename (her listener read %q)", hers, mallory.Name, seen)
	}
}

// TestAttackRootWorkloadsAfterRestartWithoutThem: an operator takes allow_root_workloads
// away and restarts nexd, as a reload that names it says to (`systemctl restart nexd`).
// With live_restore the native nexlet, started by the first nexd with the old policy in
// its environment, ran on and was adopted: nexd's status said root was no longer
// allowed while the nexlet still ran a start request's `user: root` as root, for every
// tenant that may deploy. Now a native nexlet started with another workload policy than
// the configuration's is ended at start and a new one started (its workloads are
// adopted by the new one, as after its crash).
func TestAttackRootWorkloadsAfterRestartWithoutThem(t *testing.T) {
	rootWorkloadsAfterRestart(t, nil)
}

// TestAttackRootWorkloadsAfterUpgradeFromUndigestedRecord: as
// TestAttackRootWorkloadsAfterRestartWithoutThem, but the native nexlet's record is as a
// nexd older than the workload policy digest wrote it (no workload_policy). Such a record
// was adopted unchecked, at this restart and every later one (a record is written when a
// nexlet starts, not when it is adopted): the nexlet kept running `user: root` as root.
// Now a record without the digest counts as another policy: the nexlet is replaced. Its
// environment cannot stand in for the digest: a pre-started nexlet gets its policy over
// the hand-off pair, not in /proc/<pid>/environ (logged below).
func TestAttackRootWorkloadsAfterUpgradeFromUndigestedRecord(t *testing.T) {
	rootWorkloadsAfterRestart(t, func(t *testing.T, state string, nativePID int) {
		if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", nativePID)); err == nil {
			t.Logf("the native nexlet's /proc/%d/environ holds %s: %t", nativePID, native.EnvAllowRoot, bytes.Contains(env, []byte(native.EnvAllowRoot+"=")))
		}
		path := filepath.Join(state, "nexlets", "native", "process.json")
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var rec map[string]any
		if err := json.Unmarshal(b, &rec); err != nil {
			t.Fatal(err)
		}
		meta, _ := rec["meta"].(map[string]any)
		if _, ok := meta["workload_policy"]; !ok {
			t.Fatalf("record %s has no workload_policy to take away: %s", path, b)
		}
		delete(meta, "workload_policy")
		if b, err = json.Marshal(rec); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	})
}

// rootWorkloadsAfterRestart plays the root workload attack across a restart that takes
// allow_root_workloads away; edit, when not nil, changes the state directory while no
// nexd runs (the first nexd's native nexlet, pid nativePID, still does).
func rootWorkloadsAfterRestart(t *testing.T, edit func(t *testing.T, state string, nativePID int)) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	out := t.TempDir() // root's 0700: only a root workload writes here
	base := nodeOpts{external: s.ClientURL(), stateDir: state, extra: []string{"--state", "kv", "--live-restore"}}
	withRoot := base
	withRoot.extra = append([]string{"--allow-root-workloads"}, base.extra...)
	n := startNode(t, withRoot)
	st := n.waitReady(t)
	idAs := func(n *node, file string) (string, int) {
		n.waitNative(t)
		o, e, code := n.ctl(t, "workload", "run", "--lifecycle", "job", "--user", "root", "--name", "whoami",
			"--", "/bin/sh", "-c", "id -u > "+file)
		return o + e, code
	}
	// Control: allowed, it runs as root.
	before := filepath.Join(out, "before")
	if o, code := idAs(n, before); code != 0 {
		t.Fatalf("root workload with allow_root_workloads: exit %d: %s", code, o)
	}
	testkit.Eventually(t, "the root job's output", func() bool {
		b, err := os.ReadFile(before)
		return err == nil && strings.TrimSpace(string(b)) == "0"
	})
	nativePID := 0
	for _, x := range st.Nexlets {
		if x.Name == "native" {
			nativePID = x.PID
		}
	}
	running := n.runWorkload(t, "--name", "keeps", "--", "/bin/sleep", "600")

	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("nexd exited %d after SIGTERM\n%s", code, n.out.String())
	}
	if edit != nil {
		edit(t, state, nativePID)
	}
	base.cgroup = n.cgroup // the same node: the same cgroup root
	n2 := startNode(t, base)
	st2 := n2.waitReady(t)
	if !strings.Contains(st2.WorkloadUsers, "dynamic uids") || strings.Contains(st2.WorkloadUsers, "root") {
		t.Fatalf("status after the restart: workload users %q", st2.WorkloadUsers)
	}
	after := filepath.Join(out, "after")
	o, code := idAs(n2, after)
	time.Sleep(2 * time.Second) // a job that was started has written by now
	if b, err := os.ReadFile(after); err == nil {
		adopted := ""
		for _, x := range st2.Nexlets {
			if x.Name == "native" && x.PID == nativePID {
				adopted = " (the native nexlet adopted, same pid)"
			}
		}
		t.Fatalf("allow_root_workloads off after a restart, but a start request ran as uid %s%s: nexctl exit %d: %s",
			strings.TrimSpace(string(b)), adopted, code, o)
	}
	if code == 0 || !strings.Contains(o, "allow_root_workloads") {
		t.Errorf("root workload without allow_root_workloads: exit %d, %q; want refused naming allow_root_workloads", code, o)
	}
	// The workload the first nexd started runs on, under the new nexlet.
	if ws := n2.workloads(t); !slices.ContainsFunc(ws, func(w control.Workload) bool { return w.ID == running.ID }) {
		t.Errorf("workload %s not running after the restart: %+v", running.ID, ws)
	}
}

// TestAttackLocalUserReadsArgvSecret: a start request names secret://KEY in its argv.
// The native nexlet resolved it into the workload's command line, which every local user
// reads in /proc/<pid>/cmdline (mode 0444; only a hidepid mount of /proc hides it, and
// nexd.service's ProtectProc= changes nexd's own view of /proc, not other users'): mallory,
// a local user outside group nex, found the tenant's secret there. Now such a start is
// refused, naming the argument and the environment as the place for secrets. The same
// secret in the environment is in /proc/<pid>/environ, mode 0400 and owned by the
// workload's own dynamic uid: neither mallory nor a workload of another namespace (another
// dynamic uid) reads it; root does (the control: the value is there to find).
func TestAttackLocalUserReadsArgvSecret(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root: workloads switch to dynamic uids only under a root nexd")
	}
	testkit.RequireUsers(t)
	t.Parallel()
	const secret = "argv-s3cret-4f9c2e"
	// The pattern every scan looks for: a regular expression that matches the secret but
	// is not the secret, so that the scanning grep's own command line never matches.
	const pattern = "argv-s3cret-4f9c2[e]"
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL()})
	n.waitReady(t)
	n.waitNative(t)
	nc := testnats.Connect(t, s)
	mallory := testkit.NewUser(t)
	// Set in-process: `nexctl secret set --insecure-argv NS KEY VALUE` would put the value
	// in nexctl's own command line (TestAttackLocalUserReadsSecretSetArgv).
	c := control.NewClient(n.socket)
	defer c.Close()
	if err := c.SetSecret(t.Context(), "tenant", "DB_PASS", []byte(secret)); err != nil {
		t.Fatal(err)
	}
	// scan is mallory's attack: every process's command line and environment.
	scan := func() string {
		out, _ := mallory.Command("/bin/sh", "-c",
			"grep -l -a -e '"+pattern+"' /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null").Output()
		return strings.TrimSpace(string(out))
	}

	// In argv: refused, naming the argument.
	out, errOut, code := n.ctl(t, "--namespace", "tenant", "--json", "workload", "run", "--name", "argv",
		"--", "/bin/sh", "-c", "sleep 600; :", "sh", "--password", "secret://DB_PASS")
	if found := scan(); found != "" {
		t.Errorf("%s (outside group nex) read the tenant's secret in %s", mallory.Name, found)
	}
	if code == 0 || !strings.Contains(errOut, "argv[4]") || !strings.Contains(errOut, "environment") {
		t.Errorf("secret:// in argv: exit %d, %s%s; want refused, naming argv[4] and the environment", code, out, errOut)
	}

	// In the environment (sealed, as nexctl sends it): only the workload's uid and root.
	env := n.runWorkload(t, "--namespace", "tenant", "--name", "env", "--env", "DB_PASS=secret://DB_PASS",
		"--", "/bin/sh", "-c", "sleep 600; :")
	var pid int
	testkit.Eventually(t, "the workload's process", func() bool {
		p := workloadPIDs(t, env.ID)
		if len(p) > 0 {
			pid = slices.Min(p)
		}
		return pid != 0
	})
	environ := "/proc/" + strconv.Itoa(pid) + "/environ"
	b, err := os.ReadFile(environ)
	if err != nil || !strings.Contains(string(b), "DB_PASS="+secret) {
		t.Fatalf("control: root reads no DB_PASS=%s in %s: %v", secret, environ, err)
	}
	var uid int
	for l := range strings.SplitSeq(string(mustRead(t, "/proc/"+strconv.Itoa(pid)+"/status")), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[0] == "Uid:" {
			uid, _ = strconv.Atoi(f[1])
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(environ, &st); err != nil {
		t.Fatal(err)
	}
	if uid == 0 || int(st.Uid) != uid || st.Mode&0o777 != 0o400 {
		t.Errorf("%s: owner %d mode %o; want the workload's own uid %d (not root), mode 400", environ, st.Uid, st.Mode&0o777, uid)
	}
	if found := scan(); found != "" {
		t.Errorf("%s (outside group nex) read the tenant's secret in %s", mallory.Name, found)
	}
	attacks := [][2]string{
		{"read-victim-cmdline", "grep -q -a -e '" + pattern + "' /proc/" + strconv.Itoa(pid) + "/cmdline"},
		{"read-victim-environ", "grep -q -a -e '" + pattern + "' /proc/" + strconv.Itoa(pid) + "/environ"},
		{"read-own-environ", "grep -q -a NEX_WORKLOAD_ID /proc/self/environ"},
	}
	lines := attackLines(t, n, nc, "other", nil, attacks)
	for _, a := range attacks[:2] {
		if !contains(lines, "DENIED "+a[0]) {
			t.Errorf("a workload of another namespace: %s not denied: %q", a[0], lines)
		}
	}
	// Control: the script does read an environment it may read.
	if !contains(lines, "ATTACK-OK read-own-environ") {
		t.Errorf("the attacking workload cannot read its own environment: %q", lines)
	}
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestAttackLocalUserReadsSecretSetArgv: an admin sets a tenant's secret as nexctl's
// usage said, `nexctl secret set NS KEY VALUE`, while the node is slow to answer (here a
// control socket that takes the connection and says nothing). Every local user may read
// a process's command line (/proc/<pid>/cmdline, 0444): mallory, outside group nex, read
// the value there for as long as nexctl waited. Now a value in the command line is
// refused before nexctl connects (unless --insecure-argv), and the value comes from
// stdin, where she finds it in neither the command line nor the environment while
// nexctl waits. (The refused command line itself lived for the moment nexctl took to
// refuse it.)
func TestAttackLocalUserReadsSecretSetArgv(t *testing.T) {
	const secret = "setargv-s3cret-7d1a"
	const pattern = "setargv-s3cret-7d1[a]" // matches the secret, not the grep's own command line
	mallory, _ := socketAttacker(t)
	sock := filepath.Join(t.TempDir(), "nexd.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var connected atomic.Int32
	held := make(chan net.Conn, 16)
	accepted := make(chan struct{})
	go func() {
		defer close(accepted)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			connected.Add(1)
			held <- c // kept open, unanswered, until the test ends
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		<-accepted
		close(held)
		for c := range held {
			c.Close()
		}
	})
	// set runs nexctl's secret set against the silent node while mallory looks at every
	// process's command line and environment for 3 s; it returns what she found, and
	// nexctl's exit code and stderr (-1: still waiting on the node, killed).
	set := func(stdin string, args ...string) (found string, code int, stderr string) {
		t.Helper()
		connected.Store(0)
		cmd := exec.Command(nexctlBin(t), append([]string{"--control-socket", sock, "secret", "set", "tenant", "DB_PASS"}, args...)...)
		cmd.Stdin = strings.NewReader(stdin)
		var errOut bytes.Buffer
		cmd.Stderr = &errOut
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan int, 1)
		go func() {
			_ = cmd.Wait()
			exited <- cmd.ProcessState.ExitCode()
		}()
		out, _ := mallory.Command("/bin/sh", "-c", `end=$(($(date +%s) + 3)); while [ "$(date +%s)" -lt "$end" ]; do
grep -l -a -e '`+pattern+`' /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null && exit 0; done; exit 1`).Output()
		// Under load nexctl may not have reached the socket within the 3 s scan: wait for
		// it to connect or exit (bounded) before reading what it did.
		for end := time.Now().Add(30 * time.Second); connected.Load() == 0 && time.Now().Before(end); {
			select {
			case code = <-exited:
				return strings.TrimSpace(string(out)), code, errOut.String()
			case <-time.After(20 * time.Millisecond):
			}
		}
		select {
		case code = <-exited:
		default:
			_ = cmd.Process.Kill()
			<-exited
			code = -1
		}
		return strings.TrimSpace(string(out)), code, errOut.String()
	}

	// As the usage said before: the value as the third argument.
	found, code, stderr := set("", secret)
	if code == -1 || connected.Load() > 0 {
		t.Errorf("nexctl waited on the node with the secret in its command line (connected %d times, exit %d): %s (outside group nex) read it in %q",
			connected.Load(), code, mallory.Name, found)
	} else if code != 2 || !strings.Contains(stderr, "--insecure-argv") || !strings.Contains(stderr, "/proc/<pid>/cmdline") {
		t.Errorf("a value in the command line: exit %d, %q; want refused (2) naming /proc/<pid>/cmdline and --insecure-argv", code, stderr)
	}
	// The way now: stdin (or a prompt on a terminal), with '-' or without a third argument.
	for _, args := range [][]string{{"-"}, nil} {
		found, code, stderr := set(secret+"\n", args...)
		if found != "" {
			t.Errorf("secret set %q with the value on stdin: %s read it in %s", args, mallory.Name, found)
		}
		if code != -1 || connected.Load() == 0 {
			t.Errorf("secret set %q with the value on stdin: exit %d (%s), connected %d times; want it waiting on the node", args, code, stderr, connected.Load())
		}
	}
}

// TestAttackWorkloadForksPastTheNode: a tenant (its own minted NATS user) deploys a
// workload whose start request asks for a pids_max of its choosing, 100,000, and that
// forks 300 processes. Each workload's limits are its request's, and nothing bounded
// the workloads together (the package's unit has TasksMax=infinity), so one workload
// could take every pid of the host: nexd, its nexlets and every other workload then
// fail to fork. workloads_pids_max bounds them together (here 64; by default three
// quarters of the kernel's): the fork bomb is held there, the nexlet runs on under the
// same pid, and once the bomb is stopped a tenant's next workload starts.
func TestAttackWorkloadForksPastTheNode(t *testing.T) {
	needCgroupV1(t, "pids (root)")
	if _, err := os.Stat("/sys/fs/cgroup/pids"); err != nil {
		t.Skip("no cgroup v1 pids hierarchy")
	}
	t.Parallel()
	const bound, forks = 64, 300
	op := testnats.StartOperator(t, nil)
	creds := op.CredsFile(t, "nexd-node")
	n := startNode(t, nodeOpts{external: op.Server.ClientURL(), extra: []string{"--nats.creds-file", creds,
		"--insecure-argv", "--issuer-signing-key", op.SigningSeed, "--issuer-signing-key-root-account", op.Account,
		"--workloads-pids-max", strconv.Itoa(bound)}})
	n.waitReady(t)
	nexlet := nexletPID(n.cmd.Process.Pid)
	tenant := tenantNexctl(t, op, "tenant-a")
	// bash, not sh: dash exits at its first refused fork, and its group (where v1
	// counts the refusal) goes with it, maybe before the test looks; bash retries
	// and goes on, held at the bound.
	req, err := json.Marshal(map[string]any{"uri": "file:///bin/bash",
		"argv":   []string{"-c", fmt.Sprintf("i=0; while [ $i -lt %d ]; do /bin/sleep 600 & i=$((i+1)); done; wait", forks)},
		"limits": map[string]any{"pids_max": 100000}})
	if err != nil {
		t.Fatal(err)
	}
	out, errOut, code := tenant("--json", "workload", "run", "--name", "bomb", "--start-request", string(req))
	var bomb runResult
	if code != 0 || json.Unmarshal([]byte(out), &bomb) != nil || bomb.ID == "" {
		t.Fatalf("tenant-a's run: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	root := filepath.Join("/sys/fs/cgroup/pids", filepath.Base(n.cgroup), "workloads")
	count := func(file string) int {
		b, _ := os.ReadFile(filepath.Join(root, file))
		f := strings.Fields(string(b))
		if len(f) == 0 {
			return 0
		}
		v, _ := strconv.Atoi(f[len(f)-1]) // pids.current: "N"; pids.events: "max N"
		return v
	}
	// Either the bomb holds all it forked (the attack worked) or the kernel refused a
	// fork at the workloads' bound (pids.events counts those).
	testkit.EventuallyWithin(t, 90*time.Second, "the bomb forked all or was refused", func() bool {
		// cgroup v1 counts a refused fork in the forking task's group, v2 in the group
		// whose limit refused it.
		return count(filepath.Join(bomb.ID, "pids.current")) > forks || count(filepath.Join(bomb.ID, "pids.events")) > 0 || count("pids.events") > 0
	})
	if got := count(filepath.Join(bomb.ID, "pids.current")); got > bound {
		t.Fatalf("the tenant's workload holds %d processes, past the node's bound of %d for all workloads", got, bound)
	}
	if got := count("pids.current"); got > bound {
		t.Fatalf("workloads hold %d processes together, past the bound of %d", got, bound)
	}
	if got := nexletPID(n.cmd.Process.Pid); got != nexlet || got == 0 {
		t.Fatalf("the native nexlet changed from pid %d to %d under the fork bomb", nexlet, got)
	}
	if out, errOut, code := tenant("workload", "stop", bomb.ID); code != 0 {
		t.Fatalf("tenant-a's stop of the bomb: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
	if out, errOut, code := tenant("--json", "workload", "run", "--name", "after", "--", "/bin/sleep", "600"); code != 0 {
		t.Fatalf("tenant-a's run after the bomb: exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
	}
}

// TestAttackLocalUserReadsNodeSeedArgv: nexd took its secrets as flags too (the node's
// seed, the issuer signing key, NATS passwords; README Every key lists a flag for
// each), and every local user may read a process's command line (/proc/<pid>/cmdline,
// 0444) for as long as it runs: mallory, outside group nex, read the node's seed there
// while the node ran. A secret flag is now refused at start, naming the flag, the
// environment variable to use and --insecure-argv; given in the environment (0400,
// nexd's own uid) she finds it nowhere while the node runs under that identity.
func TestAttackLocalUserReadsNodeSeedArgv(t *testing.T) {
	mallory, _ := socketAttacker(t)
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	seed, _ := kp.Seed()
	pub, _ := kp.PublicKey()
	// A regular expression that matches the seed and not the scanning grep's own
	// command line.
	pattern := string(seed[:len(seed)-1]) + "[" + string(seed[len(seed)-1:]) + "]"
	scan := func() string {
		out, _ := mallory.Command("/bin/sh", "-c",
			"grep -l -a -e '"+pattern+"' /proc/[0-9]*/cmdline /proc/[0-9]*/environ 2>/dev/null").Output()
		return strings.TrimSpace(string(out))
	}

	n := startNode(t, nodeOpts{extra: []string{"--node-seed", string(seed)}})
	up := testkit.WaitFor(60*time.Second, func() bool {
		select {
		case <-n.done:
			return true
		default:
		}
		_, err := os.Stat(n.socket)
		return err == nil
	})
	select {
	case <-n.done:
		if out := n.out.String(); !strings.Contains(out, "--node-seed") || !strings.Contains(out, "NEX_NODE_SEED") ||
			!strings.Contains(out, "/proc/<pid>/cmdline") || !strings.Contains(out, "--insecure-argv") {
			t.Errorf("nexd with --node-seed exited without naming the flag, NEX_NODE_SEED, /proc/<pid>/cmdline and --insecure-argv:\n%s", out)
		}
	default:
		if !up {
			t.Fatalf("nexd with --node-seed neither served nor exited:\n%s", n.out.String())
		}
		if found := scan(); found != "" {
			t.Errorf("the node ran with its seed on its command line: %s (outside group nex) read it in %s", mallory.Name, found)
		} else {
			t.Errorf("the node ran with its seed on its command line (%s did not find it)", mallory.Name)
		}
	}

	// The way that keeps it: the environment.
	n = startNode(t, nodeOpts{env: []string{"NEX_NODE_SEED=" + string(seed)}})
	if id := n.waitReady(t).NodeID; id != pub {
		t.Fatalf("node id %s, want %s from NEX_NODE_SEED", id, pub)
	}
	if found := scan(); found != "" {
		t.Errorf("with NEX_NODE_SEED, %s (outside group nex) read the node's seed in %s", mallory.Name, found)
	}
}
