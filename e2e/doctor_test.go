package e2e

import (
	"encoding/json"
	"strings"
	"testing"
	"time"
)

// TestDoctorOnQuickstartNode runs `nexctl doctor` against the README's first node (no
// NATS configured: the zero-config embedded server, default control_allow_others) as
// its admin. Nothing fails: the control socket is 0666 by that default (others get the
// status only) and the credential minter is the embedded server's own signing key.
// Before, doctor failed the socket as "too open" and called the minter "none:
// connecting without credentials", exit 1; and its publish check sent a WPING without a
// reply subject that the node answered into nowhere, logging a warning.
func TestDoctorOnQuickstartNode(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{})
	n.waitReady(t)
	n.waitNative(t)
	out, errOut, code := run(t, nil, nexctlBin(t), "--control-socket", n.socket, "--json", "doctor")
	var d struct {
		Checks []struct{ Check, Status, Detail, Fix string } `json:"checks"`
		Failed int                                           `json:"failed"`
	}
	if err := json.Unmarshal([]byte(out), &d); err != nil {
		t.Fatalf("doctor --json: %v\nstdout: %s\nstderr: %s", err, out, errOut)
	}
	status := map[string]string{}
	for _, c := range d.Checks {
		status[c.Check] = c.Status
		if c.Status == "fail" {
			t.Errorf("doctor fails on the quickstart node: %+v", c)
		}
	}
	if code != 0 || d.Failed != 0 {
		t.Errorf("doctor exit %d, %d failed\n%s", code, d.Failed, out)
	}
	for _, c := range []string{"credential minter", "control socket", "NATS connection", "permission: publish $NEX.SVC.system.control.>"} {
		if status[c] != "ok" {
			t.Errorf("check %q: %q, want ok\n%s", c, status[c], out)
		}
	}
	// The node logs a reply it could not send when the bus hands it a request without a
	// reply subject; doctor's probe must not be one. Give a stray answer time to land.
	time.Sleep(200 * time.Millisecond)
	if log := n.out.String(); strings.Contains(log, "failed to send reply") {
		t.Errorf("doctor made the node log a reply it could not send:\n%s", log)
	}
}
