package cli

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

type doctorOut struct {
	Checks []checkResult `json:"checks"`
	Failed int           `json:"failed"`
}

func runDoctor(t *testing.T, url string) (doctorOut, int, string) {
	t.Helper()
	out, errOut, code := runCLI(t, nil, "--json", "--control-socket", filepath.Join(t.TempDir(), "none.sock"),
		"-s", url, "--nats.timeout", "2s", "doctor")
	var d doctorOut
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("doctor --json: %v: %q %q", err, out, errOut)
	}
	return d, code, errOut
}

func findCheck(d doctorOut, prefix string) checkResult {
	for _, c := range d.Checks {
		if strings.HasPrefix(c.Check, prefix) {
			return c
		}
	}
	return checkResult{}
}

// TestDoctor runs doctor against real servers: a healthy one, one without JetStream and
// one whose user may not use $NEX.*; each broken thing is a fail with a fix, exit 1.
func TestDoctor(t *testing.T) {
	t.Parallel()
	good := testnats.Start(t, testnats.Options{})
	d, code, errOut := runDoctor(t, good.ClientURL())
	if code != 0 || d.Failed != 0 || findCheck(d, "JetStream").Status != checkOK || findCheck(d, "permission: publish").Status != checkOK {
		t.Fatalf("healthy server: exit %d %+v %s", code, d, errOut)
	}
	if c := findCheck(d, "local node"); c.Status != checkWarn || c.Fix == "" {
		t.Errorf("no local node: %+v", c)
	}

	noJS := testnats.Start(t, testnats.Options{NoJetStream: true})
	d, code, _ = runDoctor(t, noJS.ClientURL())
	if c := findCheck(d, "JetStream"); code != 1 || c.Status != checkFail || c.Fix == "" {
		t.Errorf("missing JetStream: exit %d, %+v", code, c)
	}

	locked := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) {
		o.Users = []*server.User{{Username: "app", Password: "pw", Permissions: &server.Permissions{
			Publish:   &server.SubjectPermission{Allow: []string{"app.>", "$JS.API.>"}},
			Subscribe: &server.SubjectPermission{Allow: []string{"app.>", "_INBOX.>"}},
		}}}
	}})
	url := strings.Replace(locked.ClientURL(), "nats://", "nats://app:pw@", 1)
	d, code, _ = runDoctor(t, url)
	pub, sub := findCheck(d, "permission: publish"), findCheck(d, "permission: subscribe")
	if code != 1 || pub.Status != checkFail || sub.Status != checkFail || !strings.Contains(pub.Fix, "$NEX.SVC.>") {
		t.Errorf("broken permissions: exit %d, publish %+v, subscribe %+v", code, pub, sub)
	}
	if c := findCheck(d, "NATS connection"); c.Status != checkOK || strings.Contains(c.Detail, "pw") {
		t.Errorf("connection check shows the password or failed: %+v", c)
	}
}

// TestDoctorTenant: a tenant's user (mint.TenantPermissions on an operator-mode server)
// gets the tenant grants of its namespace as the fix, never the admin's $NEX.SVC.> and
// _INBOX.>; with its grants and inbox prefix it passes (no JetStream asked of it); without
// its inbox prefix, or missing a grant, the fix names the tenant's subjects. Before, the
// fix was the admin's, and a well-configured tenant failed the JetStream check.
func TestDoctorTenant(t *testing.T) {
	t.Parallel()
	op := testnats.StartOperator(t, nil)
	dir := t.TempDir()
	user := func(name string, p jwt.Permissions, prefix string) string {
		return userContext(t, op, dir, name, p, prefix)
	}
	doctor := func(ctxFile string) (doctorOut, int, string) {
		t.Helper()
		out, errOut, code := runCLI(t, nil, "--json", "--control-socket", filepath.Join(dir, "none.sock"),
			"--nats.context", ctxFile, "--namespace", "shop", "--nats.timeout", "2s", "doctor")
		var d doctorOut
		if err := json.Unmarshal([]byte(out), &d); err != nil {
			t.Fatalf("doctor --json: %v: %q %q", err, out, errOut)
		}
		return d, code, errOut
	}
	adminFix := "subscribe $NEX.FEED.> and _INBOX.>"
	p, err := mint.TenantPermissions("shop")
	if err != nil {
		t.Fatal(err)
	}
	d, code, errOut := doctor(user("good", p, protocol.TenantInboxPrefix("shop")))
	if code != 0 || d.Failed != 0 {
		t.Errorf("a tenant with its grants: exit %d %+v %s", code, d, errOut)
	}

	d, code, _ = doctor(user("noprefix", p, ""))
	c := findCheck(d, "permission: subscribe replies")
	if code != 1 || c.Status != checkFail || !strings.Contains(c.Fix, "inbox_prefix _INBOX_tenant-shop") || strings.Contains(c.Fix, adminFix) {
		t.Errorf("a tenant without its inbox prefix: exit %d, %+v", code, c)
	}

	var nofeed jwt.Permissions
	nofeed.Pub.Allow = p.Pub.Allow
	nofeed.Sub.Allow.Add(protocol.TenantInboxPrefix("shop")+".>", "shop.>")
	d, code, _ = doctor(user("nofeed", nofeed, protocol.TenantInboxPrefix("shop")))
	c = findCheck(d, "permission: subscribe $NEX.FEED")
	if code != 1 || c.Status != checkFail || !strings.Contains(c.Fix, "$NEX.FEED.shop.>") || strings.Contains(c.Fix, adminFix) {
		t.Errorf("a tenant missing its feed grant: exit %d, %+v", code, c)
	}
}

// userContext writes a NATS context (in dir) for a new user name of op's application
// account restricted to p, with inbox prefix prefix unless empty, and returns its file.
func userContext(t *testing.T, op *testnats.Operator, dir, name string, p jwt.Permissions, prefix string) string {
	t.Helper()
	tok, seed := op.UserWith(t, name, nil, p)
	creds, err := jwt.FormatUserConfig(tok, []byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	ctx := map[string]string{"url": op.Server.ClientURL(), "creds": filepath.Join(dir, name+".creds")}
	if prefix != "" {
		ctx["inbox_prefix"] = prefix
	}
	if err := os.WriteFile(ctx["creds"], creds, 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(ctx)
	file := filepath.Join(dir, name+".json")
	if err := os.WriteFile(file, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return file
}

// TestClockSkewNamesTheFix: a skew beyond the tolerance warns with which clock is
// ahead and the commands that fix it (NTP through systemd-timesyncd or chrony,
// timedatectl to check), on this host and the server's; before, the fix said only
// "synchronise clocks (systemd-timesyncd or chrony)".
func TestClockSkewNamesTheFix(t *testing.T) {
	rtt := 2 * time.Millisecond
	for _, tc := range []struct {
		skew   time.Duration
		status string
		side   string
	}{
		{5 * time.Second, checkWarn, "behind"},
		{-90 * time.Second, checkWarn, "ahead of"},
		{time.Second, checkOK, ""},
		{-maxSkew, checkOK, ""},
	} {
		check, status, detail, fix := skewFinding(tc.skew, rtt)
		if check != "clock skew" || status != tc.status {
			t.Errorf("skew %s: %s %s, want clock skew %s", tc.skew, check, status, tc.status)
		}
		if status == checkOK {
			if fix != "" {
				t.Errorf("skew %s: ok with a fix %q", tc.skew, fix)
			}
			continue
		}
		if !strings.Contains(detail, tc.side+" the NATS server's") {
			t.Errorf("skew %s: detail %q does not say this host's clock is %s the server's", tc.skew, detail, tc.side)
		}
		for _, want := range []string{"timedatectl set-ntp true", "systemd-timesyncd", "chrony", "systemctl enable --now chronyd", "timedatectl status", "the NATS server's host"} {
			if !strings.Contains(fix, want) {
				t.Errorf("skew %s: fix %q does not name %q", tc.skew, fix, want)
			}
		}
	}
}
