package testkit

import (
	"context"
	"slices"
	"sync"
	"time"
)

// Revocations records the users a credential minter revokes (it is a mint.Revoker;
// the account JWT update is the AccountRevoker's business, tested in mint).
type Revocations struct {
	mu    sync.Mutex
	users []string
}

// RevokeUser records pub.
func (r *Revocations) RevokeUser(_ context.Context, pub string, _ time.Time) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.users = append(r.users, pub)
	return nil
}

// Users are the users revoked so far, in order.
func (r *Revocations) Users() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.users)
}

// Has says whether pub was revoked.
func (r *Revocations) Has(pub string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Contains(r.users, pub)
}

// Reset forgets the users revoked so far.
func (r *Revocations) Reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.users = nil
}
