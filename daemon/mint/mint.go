package mint

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nexd-project/nexd/internal/natsurl"
	"github.com/nexd-project/nexd/protocol"
)

// Default lifetimes of minted users. Registration creds are used once, right after the
// nexlet starts, so they live only minutes.
const (
	DefaultWorkloadTTL = 24 * time.Hour
	DefaultAgentTTL    = 24 * time.Hour
	DefaultRegisterTTL = 5 * time.Minute
)

// ErrRevocationUnsupported is returned by revocation when the minter cannot revoke users
// (no account revoker configured, or a minter without per-child users).
var ErrRevocationUnsupported = errors.New("revocation is not supported by this credential minter")

// ErrUnknownWorkload is returned when revoking or renewing a workload the minter never
// minted for (or already revoked).
var ErrUnknownWorkload = errors.New("no credentials were minted for this workload")

// ErrRenewalUnsupported is returned by RenewAgent when the minter's users do not expire
// (a shared nkey, or no credentials at all): there is nothing to renew.
var ErrRenewalUnsupported = errors.New("this credential minter's nexlet users do not expire and are not renewed")

// Revoker records a revocation of a user public key in the account JWT and publishes the
// updated account (see AccountRevoker). Users issued at or before `at` are rejected.
type Revoker interface {
	RevokeUser(ctx context.Context, userPub string, at time.Time) error
}

// Options are shared by every minter.
type Options struct {
	// Servers are the URLs handed to children (nats_servers). Empty lets each child
	// fall back to its own default.
	Servers []string
	// Nexus, when set, lets nexlets answer ingress workload discovery
	// ($NEX.SVC.<nexus>.agent.PINGWORKLOAD.*).
	Nexus string
	// JSDomain is the JetStream domain workloads read artifacts from; "" is the local
	// $JS.API. Both the plain and the domain prefix are granted when set.
	JSDomain string

	WorkloadTTL time.Duration // default DefaultWorkloadTTL
	AgentTTL    time.Duration // default DefaultAgentTTL
	RegisterTTL time.Duration // default DefaultRegisterTTL

	// WorkloadSubjects lists the application subjects a workload of namespace ns may
	// publish and subscribe to. Default: DefaultWorkloadSubjects (<ns>.>). Subjects that
	// would reach nex itself ($NEX…, $SYS…, or a leading wildcard) are refused at mint.
	WorkloadSubjects func(ns string) []string
	// ArtifactBuckets lists the object-store buckets the nexlet may read a workload of
	// namespace ns's nats://<bucket>/<object> artifact from (MintArtifactReader; the
	// workload's own user has no JetStream grant).
	// Default: DefaultArtifactBuckets (the bucket named like the namespace).
	ArtifactBuckets func(ns string) []string

	// WorkloadInboxPrefix overrides a workload's private inbox prefix (default
	// protocol.WorkloadInboxPrefix(workloadID), and then also the older
	// protocol.InboxPrefix(workloadID)); the workload may subscribe to <prefix>.> and to
	// no other inbox, and connects with nats.CustomInboxPrefix(prefix) (the nexlet
	// passes it on in NEX_WORKLOAD_NATS_INBOX_PREFIX). _INBOX.> is never granted: it
	// would show a workload every reply in the account, credentials included.
	WorkloadInboxPrefix func(ns, workloadID string) string

	// Revoker, when set, lets the signing-key minter revoke the users of stopped
	// workloads. Without it revocation returns ErrRevocationUnsupported and the short
	// TTL bounds how long a stopped workload's creds stay valid.
	Revoker Revoker
}

func (o Options) withDefaults() Options {
	if o.WorkloadTTL <= 0 {
		o.WorkloadTTL = DefaultWorkloadTTL
	}
	if o.AgentTTL <= 0 {
		o.AgentTTL = DefaultAgentTTL
	}
	if o.RegisterTTL <= 0 {
		o.RegisterTTL = DefaultRegisterTTL
	}
	if o.WorkloadSubjects == nil {
		o.WorkloadSubjects = DefaultWorkloadSubjects
	}
	if o.ArtifactBuckets == nil {
		o.ArtifactBuckets = DefaultArtifactBuckets
	}
	// The node's own user:password must never reach a child.
	o.Servers = natsurl.StripAll(o.Servers)
	return o
}

// DefaultWorkloadSubjects gives a workload its namespace's subject tree, <ns>.>.
func DefaultWorkloadSubjects(ns string) []string { return []string{ns + ".>"} }

// DefaultArtifactBuckets lets a workload read the object store named like its namespace.
// Object stores are not namespaced in Nex, and NATS permissions cannot match a partial
// token (OBJ_<prefix>*), so any other bucket must be listed explicitly.
func DefaultArtifactBuckets(ns string) []string { return []string{ns} }

// Minter is what every minter here implements (the node defines the same interface).
type Minter interface {
	MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error)
	MintAgent(agentID, nodeID string, direct bool) (protocol.NatsConnectionData, error)
	MintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error)
	// WorkloadNamespaceFits reports whether a workload minted in namespace gets
	// credentials within protocol.MaxWorkloadCredentials; allocation-free, for the
	// auction path.
	WorkloadNamespaceFits(namespace string) bool
	// RenewWorkload mints fresh credentials for a running workload, refusing a
	// namespace other than the one its first credentials were minted for.
	RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error)
	// RenewAgent signs a fresh nexlet user for userPub, a public user nkey the nexlet
	// made (its seed stays with the nexlet); ErrRenewalUnsupported where users do not
	// expire.
	RenewAgent(agentID, nodeID, userPub string, direct bool) (protocol.NatsConnectionData, error)
	// RevokeSuperseded revokes a workload's users older than its newest (after a
	// renewal); ErrRevocationUnsupported where the minter cannot revoke.
	RevokeSuperseded(ctx context.Context, workloadID string) error
	// RevokeAgentBefore revokes the nexlet's users minted before userPub (after it
	// switched to userPub, or registered and got userPub); ErrRevocationUnsupported
	// where the minter cannot revoke.
	RevokeAgentBefore(ctx context.Context, agentID, userPub string) error
	// RevokeWorkload revokes every user of a workload that ended and forgets it;
	// ErrRevocationUnsupported where the minter cannot revoke.
	RevokeWorkload(ctx context.Context, workloadID string) error
	CanMint() bool
	// PrivateInboxes reports whether each minted user may subscribe only to its own
	// inbox prefix (protocol.InboxPrefix of its id), so replies must go there.
	PrivateInboxes() bool
	Describe() string
	Warning() string
}

// Connection names children report to the server (visible in connz and server logs).
func registerConnName(agentID string) string { return "nexlet:" + agentID + ":register" }
func agentConnName(agentID string) string    { return "nexlet:" + agentID }
func workloadConnName(ns, id string) string  { return "workload:" + ns + ":" + id }

// checkToken refuses a value used as one subject token: empty, or holding dots,
// wildcards or whitespace would widen (or break) the permissions built from it.
func checkToken(what, v string) error {
	if v == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if strings.ContainsAny(v, ".*> \t\r\n") {
		return fmt.Errorf("%s %q is not a single NATS subject token (no dots, wildcards or spaces)", what, v)
	}
	return nil
}

var (
	_ Minter = (*SigningKeyMinter)(nil)
	_ Minter = (*NkeyMinter)(nil)
	_ Minter = (*NoAuthMinter)(nil)
)
