package mint

import (
	"fmt"
	"strings"

	"github.com/nats-io/jwt/v2"
	"github.com/nexd-project/nexd/protocol"
)

// TenantInboxPrefix is the private inbox prefix of namespace ns's tenant user,
// _INBOX_tenant-<ns>: an _INBOX_ prefix, so nodes answer requests made with it, and
// never one nexd mints for a child (_INBOX_<nuid>, and a nuid has no dash). The tenant
// connects with it (nats.CustomInboxPrefix, or inbox_prefix in its NATS context).
func TenantInboxPrefix(ns string) string { return protocol.InboxPrefix("tenant-" + ns) }

// TenantPermissions are the permissions an operator gives the NATS user of a tenant
// with deploy rights in namespace ns (nexd mints no such user): what nexctl needs to
// run, list, stop and clone there and follow its logs, metrics and events, and its
// application subjects. Never _INBOX.> (every client's replies, nexctl's lists and
// deploy answers among them), never $NEX.SVC.> (start requests carry workload
// credentials), never another namespace or JetStream.
func TenantPermissions(ns string) (jwt.Permissions, error) {
	var p jwt.Permissions
	if !protocol.IsToken(ns) || ns == protocol.SystemNamespace || strings.HasPrefix(ns, "_INBOX") {
		return p, fmt.Errorf("tenant namespace %q: want a single subject token, not system, not an inbox", ns)
	}
	p.Pub.Allow.Add(protocol.ControlPrefix(ns)+".>", ns+".>")
	p.Sub.Allow.Add("$NEX.FEED."+ns+".>", TenantInboxPrefix(ns)+".>", ns+".>")
	return p, nil
}
