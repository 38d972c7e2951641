package natsembed

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/privfile"
)

// AccountName is the account of the embedded server that nexd, its nexlets, their
// workloads and local admins live in.
const AccountName = "nex"

// trustFile holds the embedded server's keys in the state directory (0600).
const trustFile = "nats-trust.json"

// accountFile keeps the nex account JWT as last pushed, so revocations survive a
// restart of nexd.
const accountFile = "nats-account.jwt"

// Trust is the zero-config server's operator/JWT setup: an operator, a system account
// and the nex account with a signing key. nexd generates the keys on first start and
// keeps them in the state directory; every credential it hands out is a user JWT
// signed by the account signing key, so nothing connects without one.
type Trust struct {
	operator, system, account, signing nkeys.KeyPair
	accountPub, systemPub, signingPub  string
	dir                                string // state dir; "" keeps nothing on disk

	mu         sync.Mutex
	accountJWT string
	unsaved    bool // accountJWT is applied but not yet in accountFile (saveAccount retries)
	resolver   *server.MemAccResolver
	srv        *server.Server // set once the server runs
}

type trustKeys struct {
	Operator string `json:"operator_seed"`
	System   string `json:"system_account_seed"`
	Account  string `json:"nex_account_seed"`
	Signing  string `json:"nex_signing_seed"`
}

// loadOrCreateTrust reads the keys from dir, or makes and saves them (0600) on first
// start; with dir empty they live only as long as the process.
func loadOrCreateTrust(dir string) (*Trust, error) {
	var keys trustKeys
	path := filepath.Join(dir, trustFile)
	b, err := os.ReadFile(path)
	switch {
	case dir != "" && err == nil:
		if err := checkPrivateFile(path); err != nil {
			return nil, err
		}
		if keys, err = parseTrust(path, b); err != nil {
			return nil, err
		}
	case dir == "" || errors.Is(err, fs.ErrNotExist):
		for _, k := range []struct {
			dst  *string
			make func() (nkeys.KeyPair, error)
		}{{&keys.Operator, nkeys.CreateOperator}, {&keys.System, nkeys.CreateAccount},
			{&keys.Account, nkeys.CreateAccount}, {&keys.Signing, nkeys.CreateAccount}} {
			kp, err := k.make()
			if err != nil {
				return nil, fmt.Errorf("natsembed: create keys: %w", err)
			}
			seed, _ := kp.Seed()
			*k.dst = string(seed)
		}
		if dir != "" {
			b, _ := json.MarshalIndent(keys, "", "  ")
			if err := writePrivate(path, b); err != nil {
				return nil, err
			}
		}
	default:
		return nil, fmt.Errorf("natsembed: %w", err)
	}
	t := &Trust{dir: dir, resolver: &server.MemAccResolver{}}
	// parseTrust checked each seed; a fresh set is sound by construction.
	for _, k := range []struct {
		seed string
		dst  *nkeys.KeyPair
		pub  *string
	}{{keys.Operator, &t.operator, nil}, {keys.System, &t.system, &t.systemPub},
		{keys.Account, &t.account, &t.accountPub}, {keys.Signing, &t.signing, &t.signingPub}} {
		kp, err := nkeys.FromSeed([]byte(k.seed))
		if err != nil {
			return nil, fmt.Errorf("natsembed: %s: bad seed: %w", path, err)
		}
		*k.dst = kp
		if k.pub != nil {
			*k.pub, _ = kp.PublicKey()
		}
	}
	return t, nil
}

// maxTrustFile bounds what is read as the trust file: four seeds in JSON are about
// 400 bytes.
const maxTrustFile = 64 << 10

// parseTrust reads the keys of the trust file at path: a JSON object with the four
// seeds, each present, decodable, of its kind (an operator seed for operator_seed,
// account seeds for the others) and none the same as another. Every error names the
// file and, where one is at fault, the key. Before, a missing or empty key failed as
// "bad seed" without saying which, and a seed of the wrong kind (a user seed as the
// operator's, the account seed again as its signing key) was taken and failed later,
// at the server's configuration or a user's signing, with no word of the file
// (FuzzTrustFile).
func parseTrust(path string, b []byte) (trustKeys, error) {
	var keys trustKeys
	if len(b) > maxTrustFile {
		return keys, fmt.Errorf("natsembed: %s: %d bytes, more than the %d a trust file can be", path, len(b), maxTrustFile)
	}
	if err := json.Unmarshal(b, &keys); err != nil {
		return keys, fmt.Errorf("natsembed: %s: %w", path, err)
	}
	seen := map[string]string{}
	for _, k := range []struct {
		name, seed string
		kind       nkeys.PrefixByte
	}{{"operator_seed", keys.Operator, nkeys.PrefixByteOperator}, {"system_account_seed", keys.System, nkeys.PrefixByteAccount},
		{"nex_account_seed", keys.Account, nkeys.PrefixByteAccount}, {"nex_signing_seed", keys.Signing, nkeys.PrefixByteAccount}} {
		if k.seed == "" {
			return keys, fmt.Errorf("natsembed: %s: %q is missing or empty", path, k.name)
		}
		kind, _, err := nkeys.DecodeSeed([]byte(k.seed))
		if err != nil {
			return keys, fmt.Errorf("natsembed: %s: %q: bad seed: %w", path, k.name, err)
		}
		if kind != k.kind {
			return keys, fmt.Errorf("natsembed: %s: %q is a seed of kind %s, want %s", path, k.name, kind, k.kind)
		}
		if other, ok := seen[k.seed]; ok {
			return keys, fmt.Errorf("natsembed: %s: %q is the same seed as %q: each key must be its own", path, k.name, other)
		}
		seen[k.seed] = k.name
	}
	return keys, nil
}

// configure puts the server in operator mode with a memory resolver holding both
// accounts.
func (t *Trust) configure(o *server.Options) error {
	opPub, _ := t.operator.PublicKey()
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "nexd"
	oc.SystemAccount = t.systemPub
	opJWT, err := oc.Encode(t.operator)
	if err != nil {
		return fmt.Errorf("natsembed: operator JWT: %w", err)
	}
	opClaims, err := jwt.DecodeOperatorClaims(opJWT)
	if err != nil {
		return fmt.Errorf("natsembed: operator JWT: %w", err)
	}
	sc := jwt.NewAccountClaims(t.systemPub)
	sc.Name = "SYS"
	sysJWT, err := sc.Encode(t.operator)
	if err != nil {
		return fmt.Errorf("natsembed: system account JWT: %w", err)
	}
	accJWT, err := t.initialAccountJWT()
	if err != nil {
		return err
	}
	if err := t.resolver.Store(t.systemPub, sysJWT); err != nil {
		return fmt.Errorf("natsembed: %w", err)
	}
	if err := t.resolver.Store(t.accountPub, accJWT); err != nil {
		return fmt.Errorf("natsembed: %w", err)
	}
	t.accountJWT = accJWT
	o.TrustedOperators = []*jwt.OperatorClaims{opClaims}
	o.SystemAccount = t.systemPub
	o.AccountResolver = t.resolver
	return nil
}

// initialAccountJWT is the saved nex account (its revocations) when it is still ours,
// else a fresh one: JetStream without limits and the signing key.
func (t *Trust) initialAccountJWT() (string, error) {
	if t.dir != "" {
		if b, err := os.ReadFile(filepath.Join(t.dir, accountFile)); err == nil {
			if ac, err := jwt.DecodeAccountClaims(string(b)); err == nil && ac.Subject == t.accountPub && ac.SigningKeys.Contains(t.signingPub) {
				return string(b), nil
			}
		}
	}
	ac := jwt.NewAccountClaims(t.accountPub)
	ac.Name = AccountName
	ac.SigningKeys.Add(t.signingPub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	s, err := ac.Encode(t.operator)
	if err != nil {
		return "", fmt.Errorf("natsembed: account JWT: %w", err)
	}
	return s, nil
}

// AccountPub is the nex account's public key (issuer_signing_key_root_account).
func (t *Trust) AccountPub() string { return t.accountPub }

// SigningSeed is the nex account's signing key seed (issuer_signing_key).
func (t *Trust) SigningSeed() string {
	s, _ := t.signing.Seed()
	return string(s)
}

// OperatorSigner signs updated account JWTs (revocations).
func (t *Trust) OperatorSigner() nkeys.KeyPair { return t.operator }

// LoadAccount returns the nex account JWT as the server has it.
func (t *Trust) LoadAccount(context.Context) (string, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.accountJWT, nil
}

// PushAccount stores an updated nex account JWT, applies it to the running server
// (revoked users are disconnected at once) and saves it. A save that fails (the state
// directory's file system full) leaves it applied and is retried by the server's store
// watch (saveAccount): failing the push would call a revocation in force not done.
func (t *Trust) PushAccount(_ context.Context, token string) error {
	ac, err := jwt.DecodeAccountClaims(token)
	if err != nil {
		return fmt.Errorf("natsembed: account JWT: %w", err)
	}
	if ac.Subject != t.accountPub {
		return fmt.Errorf("natsembed: account JWT is for %s, not the nex account %s", ac.Subject, t.accountPub)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if err := t.resolver.Store(t.accountPub, token); err != nil {
		return fmt.Errorf("natsembed: %w", err)
	}
	t.accountJWT = token
	if t.srv != nil {
		acc, err := t.srv.LookupAccount(t.accountPub)
		if err != nil {
			return fmt.Errorf("natsembed: account %s: %w", t.accountPub, err)
		}
		t.srv.UpdateAccountClaims(acc, ac)
	}
	t.unsaved = t.dir != ""
	_, _ = t.saveLocked() // a failure is retried, and logged, by the store watch
	return nil
}

// saveAccount saves an applied account JWT that could not be saved yet; it says
// whether one still waits, and why.
func (t *Trust) saveAccount() (waiting bool, err error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.saveLocked()
}

func (t *Trust) saveLocked() (waiting bool, err error) {
	if !t.unsaved {
		return false, nil
	}
	if err := writePrivate(filepath.Join(t.dir, accountFile), []byte(t.accountJWT)); err != nil {
		return true, err
	}
	t.unsaved = false
	return false, nil
}

// User mints a user of the nex account, signed by the signing key: full permissions,
// valid for ttl (0: no expiry), limited to the given connection types (none: any).
func (t *Trust) User(name string, ttl time.Duration, connTypes ...string) (userJWT, seed string, err error) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		return "", "", fmt.Errorf("natsembed: user key: %w", err)
	}
	pub, _ := kp.PublicKey()
	uc := jwt.NewUserClaims(pub)
	uc.Name = name
	uc.IssuerAccount = t.accountPub
	if ttl > 0 {
		uc.Expires = time.Now().Add(ttl).Unix()
	}
	for _, c := range connTypes {
		uc.AllowedConnectionTypes.Add(c)
	}
	token, err := uc.Encode(t.signing)
	if err != nil {
		return "", "", fmt.Errorf("natsembed: user JWT: %w", err)
	}
	s, _ := kp.Seed()
	return token, string(s), nil
}

// AdminCreds is a .creds text for a local or remote operator: every subject of the nex
// account, valid for ttl.
func (t *Trust) AdminCreds(name string, ttl time.Duration) (string, time.Time, error) {
	token, seed, err := t.User(name, ttl)
	if err != nil {
		return "", time.Time{}, err
	}
	b, err := jwt.FormatUserConfig(token, []byte(seed))
	if err != nil {
		return "", time.Time{}, fmt.Errorf("natsembed: creds: %w", err)
	}
	return string(b), time.Now().Add(ttl), nil
}

func writePrivate(path string, b []byte) error {
	if err := privfile.Write(path, b); err != nil {
		return fmt.Errorf("natsembed: %w", err)
	}
	return nil
}

// checkPrivateFile refuses a key file others could write and warns nobody: it must be
// ours and not readable by group or others.
func checkPrivateFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("natsembed: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("natsembed: %s has mode %o: it holds the embedded NATS server's keys and must be readable by nexd only (chmod 600 %s)", path, fi.Mode().Perm(), path)
	}
	return nil
}
