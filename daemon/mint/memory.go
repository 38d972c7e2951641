package mint

import (
	"errors"
	"fmt"
	"slices"

	"github.com/nats-io/nkeys"
)

// Users is what a minter remembers of the workload users it minted and has not revoked
// yet: the users that a workload's stop or its next renewal revokes. A re-executing
// nexd hands it to its next image, so that those revocations still reach the users
// minted before the exec (the new image would otherwise know only the users it mints
// itself, and the older ones would stay valid until they expire). Nexlet users are
// not handed over: an adopted nexlet keeps the connection of its old user, which a
// remembered user list would revoke at its next registration (they expire instead,
// nexlet_creds_ttl).
type Users struct {
	Workloads  map[string][]string `json:"workloads,omitempty"`  // workload id -> user public keys, oldest first
	Namespaces map[string]string   `json:"namespaces,omitempty"` // workload id -> namespace
}

// Remembering is a minter whose memory of minted users can be handed over.
type Remembering interface {
	// Users is a copy of what the minter remembers; empty when it cannot revoke (then
	// there is nothing worth handing over).
	Users() Users
	// Remember adds users minted by an earlier image before those minted since (they
	// are older). It refuses an invalid Users as a whole.
	Remember(Users) error
}

// maxUsersPerID bounds a handed-over list (renewals trim it; a longer one is corrupt).
const maxUsersPerID = 1024

// Check reports the first thing in u that cannot come from a minter.
func (u Users) Check() error {
	for id, pubs := range u.Workloads {
		if err := checkToken("workload id", id); err != nil {
			return err
		}
		if len(pubs) > maxUsersPerID {
			return fmt.Errorf("workload %s: %d users, at most %d", id, len(pubs), maxUsersPerID)
		}
		for _, p := range pubs {
			if !nkeys.IsValidPublicUserKey(p) {
				return fmt.Errorf("workload %s: %q is not a user public key", id, p)
			}
		}
	}
	for id, ns := range u.Namespaces {
		if err := errors.Join(checkToken("workload id", id), checkToken("namespace", ns)); err != nil {
			return err
		}
	}
	return nil
}

// Users implements Remembering.
func (m *SigningKeyMinter) Users() Users {
	if m.opts.Revoker == nil {
		return Users{}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	ws := make(map[string][]string, len(m.workloads))
	for id, pubs := range m.workloads {
		if len(pubs) > 0 {
			ws[id] = slices.Clone(pubs)
		}
	}
	ns := make(map[string]string, len(m.namespaces))
	for id, n := range m.namespaces {
		ns[id] = n
	}
	return Users{Workloads: ws, Namespaces: ns}
}

// Remember implements Remembering.
func (m *SigningKeyMinter) Remember(u Users) error {
	if err := u.Check(); err != nil {
		return fmt.Errorf("remember handed-over users: %w", err)
	}
	merge := func(older, newer []string) []string {
		out := slices.Clone(older)
		for _, p := range newer {
			if !slices.Contains(out, p) {
				out = append(out, p)
			}
		}
		return out
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for id, pubs := range u.Workloads {
		m.workloads[id] = merge(pubs, m.workloads[id])
	}
	for id, ns := range u.Namespaces {
		if _, ok := m.namespaces[id]; !ok {
			m.namespaces[id] = ns
		}
	}
	return nil
}
