package mint

import (
	"fmt"
	"strings"

	"github.com/nats-io/jwt/v2"
	"github.com/nexd-project/nexd/protocol"
)

// TenantPermissions are the permissions an operator gives the NATS user of a tenant
// with deploy rights in namespace ns (nexd mints no such user): protocol.TenantSubjects,
// for a namespace that is a single token, not system and not an inbox.
func TenantPermissions(ns string) (jwt.Permissions, error) {
	var p jwt.Permissions
	if !protocol.IsToken(ns) || ns == protocol.SystemNamespace || strings.HasPrefix(ns, "_INBOX") {
		return p, fmt.Errorf("tenant namespace %q: want a single subject token, not system, not an inbox", ns)
	}
	pub, sub := protocol.TenantSubjects(ns)
	p.Pub.Allow.Add(pub...)
	p.Sub.Allow.Add(sub...)
	return p, nil
}
