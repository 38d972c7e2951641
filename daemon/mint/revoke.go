package mint

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// AccountRevoker records user revocations in the account JWT. An account JWT is signed
// by the operator, so this needs an operator (signing) key in addition to the account
// signing key the minter holds; deployments that do not give nexd one cannot revoke and
// rely on the short TTLs instead.
type AccountRevoker struct {
	// OperatorSigner re-signs the updated account JWT (operator identity or signing key).
	OperatorSigner nkeys.KeyPair
	// Load returns the current account JWT.
	Load func(ctx context.Context) (string, error)
	// Push stores and distributes the updated account JWT, e.g. a request to
	// $SYS.REQ.CLAIMS.UPDATE with system-account credentials (full/cache resolver).
	Push func(ctx context.Context, accountJWT string) error
	// Retain drops revocations older than this when the JWT is rewritten: users minted
	// before then have expired anyway. Set it to at least the longest TTL; 0 keeps all.
	Retain time.Duration

	mu sync.Mutex // one read-modify-write of the account at a time
}

// RevokeUser adds userPub (issued at or before at) to the account's revocations.
func (r *AccountRevoker) RevokeUser(ctx context.Context, userPub string, at time.Time) error {
	if r.OperatorSigner == nil || r.Load == nil || r.Push == nil {
		return errors.New("account revoker: OperatorSigner, Load and Push are all required")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	token, err := r.Load(ctx)
	if err != nil {
		return fmt.Errorf("load account JWT: %w", err)
	}
	ac, err := jwt.DecodeAccountClaims(token)
	if err != nil {
		return fmt.Errorf("decode account JWT: %w", err)
	}
	ac.RevokeAt(userPub, at)
	if r.Retain > 0 {
		cutoff := at.Add(-r.Retain).Unix()
		for k, ts := range ac.Revocations {
			if k != jwt.All && ts < cutoff {
				delete(ac.Revocations, k)
			}
		}
	}
	updated, err := ac.Encode(r.OperatorSigner)
	if err != nil {
		return fmt.Errorf("sign account JWT for %s: %w", ac.Subject, err)
	}
	if err := r.Push(ctx, updated); err != nil {
		return fmt.Errorf("push account JWT for %s: %w", ac.Subject, err)
	}
	return nil
}

// NewSystemAccountRevoker revokes through a NATS server with a full account resolver:
// it looks the account JWT up ($SYS.REQ.ACCOUNT.<account>.CLAIMS.LOOKUP) and pushes the
// re-signed one ($SYS.REQ.CLAIMS.UPDATE) over sys, a system-account connection. The
// servers then disconnect the revoked users.
func NewSystemAccountRevoker(sys *nats.Conn, operatorSigner nkeys.KeyPair, account string, retain time.Duration) *AccountRevoker {
	return &AccountRevoker{
		OperatorSigner: operatorSigner,
		Retain:         retain,
		Load: func(ctx context.Context) (string, error) {
			msg, err := sys.RequestWithContext(ctx, "$SYS.REQ.ACCOUNT."+account+".CLAIMS.LOOKUP", nil)
			if err != nil {
				return "", fmt.Errorf("look up account %s: %w", account, err)
			}
			if len(msg.Data) == 0 {
				return "", fmt.Errorf("look up account %s: the resolver does not know it", account)
			}
			return string(msg.Data), nil
		},
		Push: func(ctx context.Context, accountJWT string) error {
			msg, err := sys.RequestWithContext(ctx, "$SYS.REQ.CLAIMS.UPDATE", []byte(accountJWT))
			if err != nil {
				return fmt.Errorf("update account %s: %w", account, err)
			}
			var resp struct {
				Error *struct {
					Code        int    `json:"code"`
					Description string `json:"description"`
				} `json:"error"`
			}
			if err := json.Unmarshal(msg.Data, &resp); err != nil {
				return fmt.Errorf("update account %s: unreadable reply %q: %w", account, msg.Data, err)
			}
			if resp.Error != nil {
				return fmt.Errorf("update account %s: server refused (%d): %s", account, resp.Error.Code, resp.Error.Description)
			}
			return nil
		},
	}
}

var _ Revoker = (*AccountRevoker)(nil)
