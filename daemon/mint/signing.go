package mint

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/nexd-project/nexd/internal/nkeysign"
	"github.com/nexd-project/nexd/protocol"
)

// SigningKeyMinter signs a fresh, scoped, expiring user for every registration, nexlet
// and workload with an account signing key.
type SigningKeyMinter struct {
	signer    nkeys.KeyPair
	signerPub string
	account   string
	opts      Options
	mu        sync.Mutex
	workloads map[string][]string // workload id -> user public keys minted for it
	agents    map[string][]string // agent id -> registration and nexlet users, oldest first
	// regOnly are the agent ids in agents holding registration users only, and
	// pending the same ids in the order they came (an id may have left regOnly since):
	// bounded by MaxPendingRegistrations.
	regOnly    map[string]bool
	pending    []string
	namespaces map[string]string // workload id -> namespace, for renewal checks
	// longestNamespace is longestWorkloadNamespace, found at its first use.
	longestNamespace func() int
}

// NewSigningKeyMinter checks the signing seed (SA…) and the account public key (A…) the
// users are issued for.
func NewSigningKeyMinter(signingSeed, rootAccount string, opts Options) (*SigningKeyMinter, error) {
	kp, err := nkeys.FromSeed([]byte(strings.TrimSpace(signingSeed)))
	if err != nil {
		return nil, fmt.Errorf("issuer signing key: not a valid nkey seed: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("issuer signing key: %w", err)
	}
	if !nkeys.IsValidPublicAccountKey(pub) {
		return nil, fmt.Errorf("issuer signing key: the seed is for %s, want an account signing key seed (SA…)", pub[:1])
	}
	if !nkeys.IsValidPublicAccountKey(rootAccount) {
		return nil, fmt.Errorf("issuer signing key root account: %q is not an account public key (A…)", rootAccount)
	}
	signer, err := nkeysign.Cached(kp) // it signs every user JWT
	if err != nil {
		return nil, fmt.Errorf("issuer signing key: %w", err)
	}
	m := &SigningKeyMinter{
		signer:     signer,
		signerPub:  pub,
		account:    rootAccount,
		opts:       opts.withDefaults(),
		workloads:  map[string][]string{},
		agents:     map[string][]string{},
		regOnly:    map[string]bool{},
		namespaces: map[string]string{},
	}
	m.longestNamespace = sync.OnceValue(m.longestWorkloadNamespace)
	return m, nil
}

// CanMint is true: every child gets its own user.
func (m *SigningKeyMinter) CanMint() bool { return true }

// PrivateInboxes is true: every user may subscribe only to its own inbox prefix, so the
// node replies to a child only there.
func (m *SigningKeyMinter) PrivateInboxes() bool { return true }

// Warning is empty unless stopped workloads cannot be revoked.
func (m *SigningKeyMinter) Warning() string {
	if m.opts.Revoker == nil {
		return fmt.Sprintf("no account revoker configured: a stopped workload's credentials stay valid until they expire (at most %s)", m.opts.WorkloadTTL)
	}
	return ""
}

// Describe is a one-line summary for logs and --check.
func (m *SigningKeyMinter) Describe() string {
	rev := "revocation on stop"
	if m.opts.Revoker == nil {
		rev = "no revocation (expiry only)"
	}
	return fmt.Sprintf("scoped users signed by account signing key %s for account %s (workloads %s, nexlets %s, registration %s; %s)",
		m.signerPub, m.account, m.opts.WorkloadTTL, m.opts.AgentTTL, m.opts.RegisterTTL, rev)
}

// MintRegister gives a nexlet the right to register once as agentID on nodeID.
func (m *SigningKeyMinter) MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error) {
	if err := checkIDs(agentID, nodeID); err != nil {
		return protocol.NatsConnectionData{}, fmt.Errorf("mint registration credentials: %w", err)
	}
	cd, pub, err := m.mint(agentID, registerConnName(agentID), protocol.InboxPrefix(agentID), m.opts.RegisterTTL,
		registerPermissions(agentID, nodeID), []string{"nex-node:" + nodeID, "nex-role:register"})
	if err != nil {
		return cd, fmt.Errorf("mint registration credentials for nexlet %s: %w", agentID, err)
	}
	m.rememberAgent(agentID, pub, true)
	return cd, nil
}

// MintAgent gives a registered nexlet its agent-plane subjects, its feeds through the
// node's relay and, when direct, every namespace's feeds too (see agentPermissions).
func (m *SigningKeyMinter) MintAgent(agentID, nodeID string, direct bool) (protocol.NatsConnectionData, error) {
	if err := checkIDs(agentID, nodeID); err != nil {
		return protocol.NatsConnectionData{}, fmt.Errorf("mint nexlet credentials: %w", err)
	}
	cd, pub, err := m.mint(agentID, agentConnName(agentID), protocol.InboxPrefix(agentID), m.opts.AgentTTL,
		agentPermissions(agentID, nodeID, m.opts.Nexus, direct), []string{"nex-node:" + nodeID, "nex-role:nexlet"})
	if err != nil {
		return cd, fmt.Errorf("mint credentials for nexlet %s: %w", agentID, err)
	}
	m.rememberAgent(agentID, pub, false)
	return cd, nil
}

// RenewAgent signs a fresh nexlet user (AgentTTL) for userPub, a user nkey the nexlet
// made itself: the reply holds no seed, so whoever reads it cannot connect. direct
// as its registration was minted (MintAgent), so a renewal neither takes an older
// supervised nexlet's feeds away nor grants them to one minted without. A key
// already minted for is refused (a replayed request must not make the node revoke the
// nexlet's current user as superseded).
func (m *SigningKeyMinter) RenewAgent(agentID, nodeID, userPub string, direct bool) (protocol.NatsConnectionData, error) {
	if err := checkIDs(agentID, nodeID); err != nil {
		return protocol.NatsConnectionData{}, fmt.Errorf("renew nexlet credentials: %w", err)
	}
	if !nkeys.IsValidPublicUserKey(userPub) {
		return protocol.NatsConnectionData{}, fmt.Errorf("renew credentials for nexlet %s: %q is not a public user nkey (U…)", agentID, userPub)
	}
	m.mu.Lock()
	used := slices.Contains(m.agents[agentID], userPub)
	m.mu.Unlock()
	if used {
		return protocol.NatsConnectionData{}, fmt.Errorf("renew credentials for nexlet %s: key %s was used before; make a fresh one", agentID, userPub)
	}
	cd, err := m.sign(userPub, agentID, agentConnName(agentID), protocol.InboxPrefix(agentID), m.opts.AgentTTL,
		agentPermissions(agentID, nodeID, m.opts.Nexus, direct), []string{"nex-node:" + nodeID, "nex-role:nexlet"})
	if err != nil {
		return cd, fmt.Errorf("renew credentials for nexlet %s: %w", agentID, err)
	}
	m.rememberAgent(agentID, userPub, false)
	return cd, nil
}

// MaxPendingRegistrations bounds the agent ids the minter remembers that hold
// registration users only (MintRegister, and no nexlet user since): a nexlet
// registers within seconds of getting one, and RREGISTER hands one to whoever may
// ask it. Beyond it the oldest are forgotten; their users expire within RegisterTTL.
const MaxPendingRegistrations = 1024

// rememberAgentLimit bounds the users remembered per agent id (a nexlet that never
// registers is restarted with fresh registration users).
const rememberAgentLimit = 64

// rememberAgent keeps pub, a registration user's (registration) or a nexlet user's,
// among agentID's users. Agent ids holding registration users only are bounded
// (MaxPendingRegistrations), the oldest forgotten: RREGISTER mints for whoever asks,
// and before, every id it handed out was remembered for good
// (TestAttackRemoteRegisterFloodBounded).
func (m *SigningKeyMinter) rememberAgent(agentID, pub string, registration bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	_, known := m.agents[agentID]
	users := append(m.agents[agentID], pub)
	if len(users) > rememberAgentLimit {
		users = users[len(users)-rememberAgentLimit:]
	}
	m.agents[agentID] = users
	switch {
	case !registration:
		delete(m.regOnly, agentID)
	case !known:
		m.regOnly[agentID] = true
		m.pending = append(m.pending, agentID)
		for len(m.pending) > MaxPendingRegistrations {
			old := m.pending[0]
			m.pending = m.pending[1:]
			if m.regOnly[old] {
				delete(m.regOnly, old)
				delete(m.agents, old)
			}
		}
	}
}

// AgentsRemembered is the number of agent ids whose users the minter remembers, to
// revoke them once superseded.
func (m *SigningKeyMinter) AgentsRemembered() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return len(m.agents)
}

// RevokeAgentBefore revokes the users minted for agentID before userPub (a renewed
// nexlet switched to userPub; a registration handed it userPub: its registration
// users and its previous starts' users, whose process is gone). Users minted after
// userPub stay. Unknown keys revoke nothing: they were revoked already. Without a
// Revoker they expire instead.
func (m *SigningKeyMinter) RevokeAgentBefore(ctx context.Context, agentID, userPub string) error {
	if m.opts.Revoker == nil {
		return ErrRevocationUnsupported
	}
	m.mu.Lock()
	users := m.agents[agentID]
	i := slices.Index(users, userPub)
	var old []string
	if i > 0 {
		old = append(old, users[:i]...)
		m.agents[agentID] = slices.Clone(users[i:])
	}
	m.mu.Unlock()
	var errs []error
	for _, u := range old {
		if err := m.Revoke(ctx, u); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("revoke users of nexlet %s before %s: %w", agentID, userPub, errors.Join(errs...))
	}
	return nil
}

// MintWorkload gives a workload its namespace's subjects. The user is remembered so it
// can be revoked when the workload stops.
func (m *SigningKeyMinter) MintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	cd, pub, err := m.mintWorkload(namespace, workloadID)
	if err != nil {
		return cd, err
	}
	m.mu.Lock()
	m.workloads[workloadID] = append(m.workloads[workloadID], pub)
	m.namespaces[workloadID] = namespace
	m.mu.Unlock()
	return cd, nil
}

// WorkloadNamespaceFits reports whether a workload deployed into namespace gets
// credentials within protocol.MaxWorkloadCredentials, as the node checks them at
// deploy. Allocation-free after the first call, for the auction path.
func (m *SigningKeyMinter) WorkloadNamespaceFits(namespace string) bool {
	return len(namespace) <= m.longestNamespace()
}

// longestWorkloadNamespace finds, by minting (nothing is remembered), the longest
// namespace up to protocol.MaxNamespaceLen whose workload credentials fit. Their size
// depends on the namespace's length only: its characters (letters, digits, '-', '_')
// need no escaping in the JWT's JSON, and the other variable parts (the user key, the
// workload id, the times) have fixed lengths (TestWorkloadNamespaceFitsAsMinted). A
// mint that fails counts as fitting: the deploy then says why.
func (m *SigningKeyMinter) longestWorkloadNamespace() int {
	probe := strings.Repeat("n", protocol.MaxNamespaceLen)
	fits := func(n int) bool {
		cd, _, err := m.mintWorkload(probe[:n], nuid.Next())
		if err != nil || protocol.WorkloadCredentialsSize(cd) > protocol.MaxWorkloadCredentials {
			return err != nil
		}
		// Its artifact reader names the JetStream domain in each grant.
		cd, _, err = m.mintArtifactReader(probe[:n], nuid.Next())
		return err != nil || protocol.WorkloadCredentialsSize(cd) <= protocol.MaxWorkloadCredentials
	}
	if fits(len(probe)) {
		return len(probe) // the usual case: one mint
	}
	lo, hi := 0, len(probe) // lo fits (or is 0), hi does not
	for hi-lo > 1 {
		if mid := (lo + hi) / 2; fits(mid) {
			lo = mid
		} else {
			hi = mid
		}
	}
	return lo
}

// mintWorkload is MintWorkload without remembering the user.
func (m *SigningKeyMinter) mintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, string, error) {
	if err := checkToken("namespace", namespace); err != nil {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint workload credentials: %w", err)
	}
	if !protocol.IsToken(namespace) { // as the deploy checks: no $KV, $JS…
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint workload credentials: namespace %q is not letters, digits, - or _", namespace)
	}
	if err := checkToken("workload id", workloadID); err != nil {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint workload credentials: %w", err)
	}
	inboxPrefix := protocol.WorkloadInboxPrefix(workloadID)
	if m.opts.WorkloadInboxPrefix != nil {
		inboxPrefix = m.opts.WorkloadInboxPrefix(namespace, workloadID)
	}
	perms, err := workloadPermissions(namespace, m.opts.WorkloadSubjects(namespace), inboxPrefix)
	if err != nil {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint credentials for workload %s: %w", workloadID, err)
	}
	tags := []string{"nex-namespace:" + namespace, "nex-role:workload"}
	if m.opts.WorkloadInboxPrefix == nil {
		// A workload an older nexd started keeps the prefix its environment gave it,
		// _INBOX_<id>, while it runs across upgrades, and this nexd renews its users. It
		// is its own: agent ids, the only other _INBOX_<nuid>, are never a workload's id.
		// Granted where the user still fits (only many configured WorkloadSubjects
		// leave no room: a 64-character namespace's user is far within the bound).
		legacy := perms
		legacy.Sub.Allow = append(slices.Clone(perms.Sub.Allow), protocol.InboxPrefix(workloadID)+".>")
		cd, pub, err := m.mint(workloadID, workloadConnName(namespace, workloadID), inboxPrefix, m.opts.WorkloadTTL, legacy, tags)
		if err != nil {
			return cd, "", fmt.Errorf("mint credentials for workload %s: %w", workloadID, err)
		}
		if protocol.WorkloadCredentialsSize(cd) <= protocol.MaxWorkloadCredentials {
			return cd, pub, nil
		}
	}
	cd, pub, err := m.mint(workloadID, workloadConnName(namespace, workloadID), inboxPrefix, m.opts.WorkloadTTL, perms, tags)
	if err != nil {
		return cd, "", fmt.Errorf("mint credentials for workload %s: %w", workloadID, err)
	}
	return cd, pub, nil
}

// MintArtifactReader mints the user a nexlet fetches a workload's nats:// artifact
// with: read-only JetStream on ArtifactBuckets(namespace) and its own inbox
// (protocol.ArtifactInboxPrefix), for the nexlet alone (the start request's
// nexd_artifact_creds). It is revoked with the workload's users, and at their first
// renewal (it is kept as the oldest).
func (m *SigningKeyMinter) MintArtifactReader(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	cd, pub, err := m.mintArtifactReader(namespace, workloadID)
	if err != nil {
		return cd, err
	}
	m.mu.Lock()
	m.workloads[workloadID] = append([]string{pub}, m.workloads[workloadID]...)
	m.mu.Unlock()
	return cd, nil
}

// mintArtifactReader is MintArtifactReader without remembering the user.
func (m *SigningKeyMinter) mintArtifactReader(namespace, workloadID string) (protocol.NatsConnectionData, string, error) {
	if err := checkToken("namespace", namespace); err != nil || !protocol.IsToken(namespace) {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint artifact reader: namespace %q is not letters, digits, - or _", namespace)
	}
	if err := checkToken("workload id", workloadID); err != nil {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint artifact reader: %w", err)
	}
	inboxPrefix := protocol.ArtifactInboxPrefix(workloadID)
	perms, err := artifactPermissions(namespace, m.opts.ArtifactBuckets(namespace), m.opts.JSDomain, inboxPrefix)
	if err != nil {
		return protocol.NatsConnectionData{}, "", fmt.Errorf("mint artifact reader for workload %s: %w", workloadID, err)
	}
	cd, pub, err := m.mint(workloadID, "artifact:"+namespace+":"+workloadID, inboxPrefix, m.opts.WorkloadTTL,
		perms, []string{"nex-namespace:" + namespace, "nex-role:artifact"})
	if err != nil {
		return cd, "", fmt.Errorf("mint artifact reader for workload %s: %w", workloadID, err)
	}
	return cd, pub, nil
}

// RenewWorkload mints fresh credentials for a running workload (call it before the
// previous ones expire). The older users stay valid until they expire or are revoked.
func (m *SigningKeyMinter) RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	m.mu.Lock()
	ns, known := m.namespaces[workloadID]
	m.mu.Unlock()
	if known && ns != namespace {
		return protocol.NatsConnectionData{}, fmt.Errorf("renew credentials for workload %s: it runs in namespace %q, not %q", workloadID, ns, namespace)
	}
	return m.MintWorkload(namespace, workloadID)
}

// RevokeSuperseded revokes every user of a workload but the newest: after a renewal the
// old credentials stop working (the workload reconnects with the renewed creds file).
// Without a Revoker they expire within the TTL instead. Each user stays on the
// workload's list until its revocation is done, so that the workload's end while it is
// under way revokes it too (RevokeWorkload). Before, they left the list first: an end
// then revoked the newest user only and was done while an older one still connected,
// and that one was never revoked if its revocation failed
// (TestStoppedWhileSupersededRevokedIsRevoked).
func (m *SigningKeyMinter) RevokeSuperseded(ctx context.Context, workloadID string) error {
	if m.opts.Revoker == nil {
		return ErrRevocationUnsupported
	}
	m.mu.Lock()
	var old []string
	if users := m.workloads[workloadID]; len(users) > 1 {
		old = slices.Clone(users[:len(users)-1])
	}
	m.mu.Unlock()
	var errs []error
	for _, u := range old {
		if err := m.Revoke(ctx, u); err != nil {
			errs = append(errs, err) // it stays for a later attempt (or RevokeWorkload)
			continue
		}
		m.mu.Lock()
		if cur, ok := m.workloads[workloadID]; ok {
			m.workloads[workloadID] = slices.DeleteFunc(cur, func(p string) bool { return p == u })
		}
		m.mu.Unlock()
	}
	if len(errs) > 0 {
		return fmt.Errorf("revoke superseded users of workload %s: %w", workloadID, errors.Join(errs...))
	}
	return nil
}

// WorkloadUsers returns the user public keys minted for a workload and not yet revoked.
func (m *SigningKeyMinter) WorkloadUsers(workloadID string) []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]string(nil), m.workloads[workloadID]...)
}

// Revoke revokes one user (every JWT issued to it until now).
func (m *SigningKeyMinter) Revoke(ctx context.Context, userPub string) error {
	if m.opts.Revoker == nil {
		return ErrRevocationUnsupported
	}
	if !nkeys.IsValidPublicUserKey(userPub) {
		return fmt.Errorf("revoke: %q is not a user public key", userPub)
	}
	if err := m.opts.Revoker.RevokeUser(ctx, userPub, time.Now()); err != nil {
		return fmt.Errorf("revoke user %s: %w", userPub, err)
	}
	return nil
}

// RevokeWorkload revokes every user minted for a stopped workload and forgets it, those
// whose revocation by RevokeSuperseded is under way included. Without a Revoker it only
// forgets and returns ErrRevocationUnsupported.
func (m *SigningKeyMinter) RevokeWorkload(ctx context.Context, workloadID string) error {
	m.mu.Lock()
	users, ok := m.workloads[workloadID]
	delete(m.workloads, workloadID)
	delete(m.namespaces, workloadID)
	m.mu.Unlock()
	if m.opts.Revoker == nil {
		return ErrRevocationUnsupported
	}
	if !ok {
		return fmt.Errorf("revoke workload %s: %w", workloadID, ErrUnknownWorkload)
	}
	var errs []error
	for i, u := range users {
		if err := m.Revoke(ctx, u); err != nil {
			errs = append(errs, err)
			// Keep what failed so a later call can retry.
			m.mu.Lock()
			m.workloads[workloadID] = append(m.workloads[workloadID], users[i])
			m.mu.Unlock()
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("revoke workload %s: %w", workloadID, errors.Join(errs...))
	}
	return nil
}

func (m *SigningKeyMinter) mint(name, connName, inboxPrefix string, ttl time.Duration, perms jwt.Permissions, tags []string) (protocol.NatsConnectionData, string, error) {
	pub, seed, err := newUserKey()
	if err != nil {
		return protocol.NatsConnectionData{}, "", err
	}
	cd, err := m.sign(pub, name, connName, inboxPrefix, ttl, perms, tags)
	if err != nil {
		return cd, "", err
	}
	cd.NatsUserSeed = string(seed)
	return cd, pub, nil
}

// newUserKey makes a user nkey: its public key and its seed. nkeys.CreateUser keeps only
// the seed, and its PublicKey derives the key from it again: a third of a mint's CPU.
func newUserKey() (pub string, seed []byte, err error) {
	pk, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", nil, fmt.Errorf("create user nkey: %w", err)
	}
	p, err := nkeys.Encode(nkeys.PrefixByteUser, pk)
	if err != nil {
		return "", nil, fmt.Errorf("create user nkey: %w", err)
	}
	if seed, err = nkeys.EncodeSeed(nkeys.PrefixByteUser, sk.Seed()); err != nil {
		return "", nil, fmt.Errorf("create user nkey: %w", err)
	}
	return string(p), seed, nil
}

// sign issues a user JWT for pub; the connection data carries no seed.
func (m *SigningKeyMinter) sign(pub, name, connName, inboxPrefix string, ttl time.Duration, perms jwt.Permissions, tags []string) (protocol.NatsConnectionData, error) {
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.Expires = time.Now().Add(ttl).Unix()
	uc.Permissions = perms
	uc.Tags.Add(tags...)
	if m.signerPub != m.account {
		uc.IssuerAccount = m.account
	}
	vr := jwt.CreateValidationResults()
	uc.Validate(vr)
	if errs := vr.Errors(); len(errs) > 0 {
		return protocol.NatsConnectionData{}, fmt.Errorf("invalid user claims: %w", errors.Join(errs...))
	}
	token, err := uc.Encode(m.signer)
	if err != nil {
		return protocol.NatsConnectionData{}, fmt.Errorf("sign user JWT: %w", err)
	}
	return protocol.NatsConnectionData{
		ConnName:    connName,
		NatsServers: append([]string(nil), m.opts.Servers...),
		NatsUserJWT: token,
		InboxPrefix: inboxPrefix,
	}, nil
}

func checkIDs(agentID, nodeID string) error {
	if err := checkToken("agent id", agentID); err != nil {
		return err
	}
	if protocol.InboxPrefix(agentID) == protocol.NodeInboxRoot {
		// Its user would read every answer to the node (protocol.NodeInboxRoot).
		return fmt.Errorf("agent id %q names the node's own inboxes (%s.>)", agentID, protocol.NodeInboxRoot)
	}
	return checkToken("node id", nodeID)
}
