package testnats

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
)

// Operator is a nats-server in operator (JWT) mode: one application account with a
// signing key and JetStream, and a system account, both in Resolver.
type Operator struct {
	Server      *server.Server // nil from NewOperator
	OperatorKP  nkeys.KeyPair
	AccountKP   nkeys.KeyPair
	SystemKP    nkeys.KeyPair
	Account     string // the application account's public key
	System      string // the system account's public key
	SigningSeed string // the application account's signing key seed (SA…)
	Resolver    server.AccountResolver
	claims      *jwt.OperatorClaims
}

// StartOperator runs an operator-mode server for the duration of t; res nil means a
// memory resolver.
func StartOperator(t testing.TB, res server.AccountResolver) *Operator {
	t.Helper()
	o := NewOperator(t, res)
	o.Server = Start(t, Options{Configure: o.Configure})
	return o
}

// NewOperator makes the operator and its accounts, as nsc would, storing the accounts
// in res (a memory resolver when nil), and starts no server: the test starts its own
// (without JetStream, say, or at a port fixed beforehand) with Options.Configure set
// to o.Configure.
func NewOperator(t testing.TB, res server.AccountResolver) *Operator {
	t.Helper()
	if res == nil {
		res = &server.MemAccResolver{}
	}
	opKP, opPub := newKey(t, nkeys.CreateOperator)
	accKP, accPub := newKey(t, nkeys.CreateAccount)
	sigKP, sigPub := newKey(t, nkeys.CreateAccount)
	sysKP, sysPub := newKey(t, nkeys.CreateAccount)
	sigSeed, err := sigKP.Seed()
	if err != nil {
		t.Fatal(err)
	}
	oc := jwt.NewOperatorClaims(opPub)
	oc.Name = "test-operator"
	oc.SystemAccount = sysPub
	opJWT, err := oc.Encode(opKP)
	if err != nil {
		t.Fatal(err)
	}
	if oc, err = jwt.DecodeOperatorClaims(opJWT); err != nil {
		t.Fatal(err)
	}
	ac := jwt.NewAccountClaims(accPub)
	ac.Name = "APP"
	ac.SigningKeys.Add(sigPub)
	ac.Limits.JetStreamLimits = jwt.JetStreamLimits{MemoryStorage: -1, DiskStorage: -1, Streams: -1, Consumer: -1}
	sc := jwt.NewAccountClaims(sysPub)
	sc.Name = "SYS"
	for _, c := range []*jwt.AccountClaims{ac, sc} {
		tok, err := c.Encode(opKP)
		if err != nil {
			t.Fatal(err)
		}
		if err := res.Store(c.Subject, tok); err != nil {
			t.Fatal(err)
		}
	}
	return &Operator{OperatorKP: opKP, AccountKP: accKP, SystemKP: sysKP, Account: accPub,
		System: sysPub, SigningSeed: string(sigSeed), Resolver: res, claims: oc}
}

// Configure sets a server's options to trust the operator and resolve its accounts.
func (o *Operator) Configure(so *server.Options) {
	so.TrustedOperators = []*jwt.OperatorClaims{o.claims}
	so.AccountResolver = o.Resolver
	so.SystemAccount = o.System
}

// StartOperatorDir is StartOperator with a directory resolver, as nexd's embedded
// server has: account JWTs pushed through the system account (revocations) are stored
// and take effect.
func StartOperatorDir(t testing.TB) *Operator {
	t.Helper()
	res, err := server.NewDirAccResolver(t.TempDir(), 0, time.Hour, server.NoDelete)
	if err != nil {
		t.Fatal(err)
	}
	return StartOperator(t, res)
}

// ConnectSystem connects as a new user of the system account (the one that pushes
// account JWTs).
func (o *Operator) ConnectSystem(t testing.TB, name string) *nats.Conn {
	t.Helper()
	tok, seed := o.User(t, name, o.SystemKP)
	return Connect(t, o.Server, nats.UserJWTAndSeed(tok, seed), nats.Name(name))
}

// User issues an unrestricted user of the account of accKP (the application account
// when nil) and returns its JWT and seed.
func (o *Operator) User(t testing.TB, name string, accKP nkeys.KeyPair) (string, string) {
	t.Helper()
	return o.UserWith(t, name, accKP, jwt.Permissions{})
}

// UserWith issues a user of the account of accKP (the application account when nil)
// restricted to p, as an operator would (nsc add user --allow-pub …), and returns its
// JWT and seed.
func (o *Operator) UserWith(t testing.TB, name string, accKP nkeys.KeyPair, p jwt.Permissions) (string, string) {
	t.Helper()
	return o.UserEdit(t, name, accKP, func(uc *jwt.UserClaims) { uc.Permissions = p })
}

// UserEdit issues a user of the account of accKP (the application account when nil)
// whose claims edit changed (expiry, permissions) before they were signed, and
// returns its JWT and seed.
func (o *Operator) UserEdit(t testing.TB, name string, accKP nkeys.KeyPair, edit func(*jwt.UserClaims)) (string, string) {
	t.Helper()
	if accKP == nil {
		accKP = o.AccountKP
	}
	ukp, upub := newKey(t, nkeys.CreateUser)
	uc := jwt.NewUserClaims(upub)
	uc.Name = name
	if edit != nil {
		edit(uc)
	}
	tok, err := uc.Encode(accKP)
	if err != nil {
		t.Fatal(err)
	}
	seed, err := ukp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	return tok, string(seed)
}

// Connect connects as a new unrestricted user of the application account.
func (o *Operator) Connect(t testing.TB, name string) *nats.Conn {
	t.Helper()
	tok, seed := o.User(t, name, nil)
	return Connect(t, o.Server, nats.UserJWTAndSeed(tok, seed), nats.Name(name))
}

// CredsFile writes a creds file for a new unrestricted user of the application account.
func (o *Operator) CredsFile(t testing.TB, name string) string {
	t.Helper()
	tok, seed := o.User(t, name, nil)
	path := filepath.Join(t.TempDir(), name+".creds")
	if err := os.WriteFile(path, Creds(t, tok, seed), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// Creds is the creds file, as nsc writes it, of the user of userJWT and seed.
func Creds(t testing.TB, userJWT, seed string) []byte {
	t.Helper()
	creds, err := jwt.FormatUserConfig(userJWT, []byte(seed))
	if err != nil {
		t.Fatal(err)
	}
	return creds
}

func newKey(t testing.TB, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := create()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return kp, pub
}

// Revoke revokes the application account's user pub from now on, as an operator would
// (nsc revocations add-user, then a push): the server closes its connections and
// refuses it from then on.
func (o *Operator) Revoke(t testing.TB, pub string) {
	t.Helper()
	tok, err := o.Resolver.Fetch(o.Account)
	if err != nil {
		t.Fatal(err)
	}
	ac, err := jwt.DecodeAccountClaims(tok)
	if err != nil {
		t.Fatal(err)
	}
	ac.Revoke(pub)
	if tok, err = ac.Encode(o.OperatorKP); err != nil {
		t.Fatal(err)
	}
	if err := o.Resolver.Store(o.Account, tok); err != nil {
		t.Fatal(err)
	}
	if ac, err = jwt.DecodeAccountClaims(tok); err != nil {
		t.Fatal(err)
	}
	acc, err := o.Server.LookupAccount(o.Account)
	if err != nil {
		t.Fatal(err)
	}
	o.Server.UpdateAccountClaims(acc, ac)
}
