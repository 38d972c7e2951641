package cli

import (
	"encoding/json"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/internal/testnats"
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
