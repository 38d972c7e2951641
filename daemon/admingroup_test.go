package daemon

import (
	"testing"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/nexlet/native"
)

// TestAdminGroupAgrees: the native nexlet refuses a named workload user in the group
// whose members the control socket takes for admins; both must name the same group.
func TestAdminGroupAgrees(t *testing.T) {
	if native.DefaultAdminGroup != control.DefaultGroup {
		t.Errorf("native nexlet's admin group %q, the control socket's %q", native.DefaultAdminGroup, control.DefaultGroup)
	}
}
