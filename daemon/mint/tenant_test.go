package mint

import "testing"

// TestTenantPermissionsRefuseWideNamespaces: a namespace that is not one plain token,
// is system, or is an inbox would widen the tenant's user (_INBOX.> reads every
// client's replies).
func TestTenantPermissionsRefuseWideNamespaces(t *testing.T) {
	for _, ns := range []string{"", "system", "_INBOX", "_INBOX_x", "a.b", "*", ">", "$NEX"} {
		if _, err := TenantPermissions(ns); err == nil {
			t.Errorf("TenantPermissions(%q) accepted", ns)
		}
	}
	p, err := TenantPermissions("team-a")
	if err != nil {
		t.Fatal(err)
	}
	if len(p.Pub.Allow) != 2 || !p.Pub.Allow.Contains("$NEX.SVC.team-a.control.>") ||
		len(p.Sub.Allow) != 3 || !p.Sub.Allow.Contains("_INBOX_tenant-team-a.>") || p.Sub.Allow.Contains("_INBOX.>") {
		t.Errorf("team-a: %+v", p)
	}
}
