package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps keeps nexctl a client: it dials NATS (daemon/natsconn) and never links
// the server nexd embeds (daemon/natsembed), which would add about 16 packages
// and a third of the binary.
func TestDeps(t *testing.T) {
	forbidden := []string{
		"github.com/nats-io/nats-server/v2/server",
		"github.com/nexd-project/nexd/daemon/natsembed",
	}
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go toolchain on PATH")
	}
	out, err := exec.Command(gobin, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	deps := strings.Fields(string(out))
	if len(deps) < 10 {
		t.Fatalf("go list -deps listed only %v", deps)
	}
	for _, d := range deps {
		for _, f := range forbidden {
			if d == f {
				t.Errorf("cmd/nexctl links %s; nexctl must only dial NATS (use daemon/natsconn)", f)
			}
		}
	}
}
