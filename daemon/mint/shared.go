package mint

import (
	"context"
	"fmt"
	"strings"

	"github.com/nats-io/nkeys"
	"github.com/nexd-project/nexd/protocol"
)

// NkeyMinter hands every child the same user nkey and seed. NATS cannot restrict it per
// child, so it is strictly weaker than SigningKeyMinter (see Warning).
type NkeyMinter struct {
	pub, seed string
	opts      Options
}

// NewNkeyMinter checks that userSeed (SU…) belongs to userPub (U…).
func NewNkeyMinter(userPub, userSeed string, opts Options) (*NkeyMinter, error) {
	userPub, userSeed = strings.TrimSpace(userPub), strings.TrimSpace(userSeed)
	if !nkeys.IsValidPublicUserKey(userPub) {
		return nil, fmt.Errorf("issuer nkey: %q is not a user public key (U…)", userPub)
	}
	kp, err := nkeys.FromSeed([]byte(userSeed))
	if err != nil {
		return nil, fmt.Errorf("issuer nkey seed: not a valid nkey seed: %w", err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("issuer nkey seed: %w", err)
	}
	if pub != userPub {
		return nil, fmt.Errorf("issuer nkey seed belongs to %s, not to issuer nkey %s", pub, userPub)
	}
	return &NkeyMinter{pub: userPub, seed: userSeed, opts: opts.withDefaults()}, nil
}

// CanMint is true: children get an identity, though a shared one.
func (m *NkeyMinter) CanMint() bool { return true }

// PrivateInboxes is false: a shared user cannot be kept to one inbox, so children that
// use plain _INBOX. (upstream's SDK) keep working.
func (m *NkeyMinter) PrivateInboxes() bool { return false }

// Describe is a one-line summary for logs and --check.
func (m *NkeyMinter) Describe() string {
	return "shared user nkey " + m.pub + " for every nexlet and workload (unscoped)"
}

// Warning explains the trade-off; log it at start and show it in --check.
func (m *NkeyMinter) Warning() string {
	return "issuer nkey: every nexlet and every workload connects as the same NATS user " + m.pub +
		" and receives its seed; NATS cannot scope or expire it per child, so any workload can do whatever that user may" +
		" (including the nex control plane and other namespaces' subjects) and can keep using the seed after it stops;" +
		" use issuer_signing_key + issuer_signing_key_root_account for scoped, expiring per-workload users"
}

func (m *NkeyMinter) data(connName, id string) protocol.NatsConnectionData {
	return protocol.NatsConnectionData{
		ConnName:     connName,
		InboxPrefix:  protocol.InboxPrefix(id), // nexd's children use it; nothing enforces it
		NatsServers:  append([]string(nil), m.opts.Servers...),
		NatsUserNkey: m.pub,
		NatsUserSeed: m.seed,
	}
}

// MintRegister returns the shared identity.
func (m *NkeyMinter) MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error) {
	return m.data(registerConnName(agentID), agentID), nil
}

// MintAgent returns the shared identity.
func (m *NkeyMinter) MintAgent(agentID, nodeID string, _ bool) (protocol.NatsConnectionData, error) {
	return m.data(agentConnName(agentID), agentID), nil
}

// MintWorkload returns the shared identity.
func (m *NkeyMinter) MintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	return m.data(workloadConnName(namespace, workloadID), workloadID), nil
}

// WorkloadNamespaceFits is true: the shared identity is no JWT, and the connection name
// of a namespace of up to protocol.MaxNamespaceLen characters is under 100 bytes.
func (m *NkeyMinter) WorkloadNamespaceFits(string) bool { return true }

// RenewWorkload returns the shared identity (it does not expire).
func (m *NkeyMinter) RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	return m.MintWorkload(namespace, workloadID)
}

// RevokeWorkload cannot revoke a shared identity.
func (m *NkeyMinter) RevokeWorkload(context.Context, string) error { return ErrRevocationUnsupported }

// RevokeSuperseded cannot revoke a shared identity.
func (m *NkeyMinter) RevokeSuperseded(context.Context, string) error { return ErrRevocationUnsupported }

// NoAuthMinter gives children only the server URLs: they connect without credentials,
// which works only against a NATS server without authentication. Development only.
type NoAuthMinter struct{ opts Options }

// NewNoAuthMinter builds the development-only minter.
func NewNoAuthMinter(opts Options) *NoAuthMinter { return &NoAuthMinter{opts: opts.withDefaults()} }

// CanMint is false: there is no identity to hand out, so remote nexlets are refused.
func (m *NoAuthMinter) CanMint() bool { return false }

// PrivateInboxes is false: nothing is enforced without credentials.
func (m *NoAuthMinter) PrivateInboxes() bool { return false }

// Describe is a one-line summary for logs and --check.
func (m *NoAuthMinter) Describe() string {
	return "no credentials: nexlets and workloads connect anonymously (development only)"
}

// Warning says why this is for development only.
func (m *NoAuthMinter) Warning() string {
	return "no credential issuer configured: nexlets and workloads connect without credentials, which only works on a NATS server" +
		" without authentication where every client may do everything; remote nexlets cannot register;" +
		" configure issuer_signing_key + issuer_signing_key_root_account for production"
}

func (m *NoAuthMinter) data(connName, id string) protocol.NatsConnectionData {
	return protocol.NatsConnectionData{ConnName: connName, NatsServers: append([]string(nil), m.opts.Servers...),
		InboxPrefix: protocol.InboxPrefix(id)}
}

// MintRegister returns only the servers.
func (m *NoAuthMinter) MintRegister(agentID, nodeID string) (protocol.NatsConnectionData, error) {
	return m.data(registerConnName(agentID), agentID), nil
}

// MintAgent returns only the servers.
func (m *NoAuthMinter) MintAgent(agentID, nodeID string, _ bool) (protocol.NatsConnectionData, error) {
	return m.data(agentConnName(agentID), agentID), nil
}

// MintWorkload returns only the servers.
func (m *NoAuthMinter) MintWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	return m.data(workloadConnName(namespace, workloadID), workloadID), nil
}

// WorkloadNamespaceFits is true: there are no credentials, only a connection name.
func (m *NoAuthMinter) WorkloadNamespaceFits(string) bool { return true }

// RenewWorkload returns only the servers.
func (m *NoAuthMinter) RenewWorkload(namespace, workloadID string) (protocol.NatsConnectionData, error) {
	return m.MintWorkload(namespace, workloadID)
}

// RevokeWorkload has nothing to revoke.
func (m *NoAuthMinter) RevokeWorkload(context.Context, string) error { return ErrRevocationUnsupported }

// RevokeSuperseded has nothing to revoke.
func (m *NoAuthMinter) RevokeSuperseded(context.Context, string) error {
	return ErrRevocationUnsupported
}

// RevokeAgentBefore cannot revoke a shared identity.
func (m *NkeyMinter) RevokeAgentBefore(context.Context, string, string) error {
	return ErrRevocationUnsupported
}

// RevokeAgentBefore has no users to revoke.
func (m *NoAuthMinter) RevokeAgentBefore(context.Context, string, string) error {
	return ErrRevocationUnsupported
}

// RenewAgent refuses: the shared identity does not expire.
func (m *NkeyMinter) RenewAgent(string, string, string, bool) (protocol.NatsConnectionData, error) {
	return protocol.NatsConnectionData{}, ErrRenewalUnsupported
}

// RenewAgent refuses: there are no users to renew.
func (m *NoAuthMinter) RenewAgent(string, string, string, bool) (protocol.NatsConnectionData, error) {
	return protocol.NatsConnectionData{}, ErrRenewalUnsupported
}
