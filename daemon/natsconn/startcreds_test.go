package natsconn

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// operatorCreds starts a server (no JetStream) trusting a new operator, as nsc would
// set one up, and returns it with a maker of creds files for users of its account:
// edit changes the user's claims before they are signed, and with seedOf the file
// holds seedOf's seed instead of the user's.
func operatorCreds(t *testing.T) (*testnats.Operator, *server.Server, func(seedOf nkeys.KeyPair, edit func(*jwt.UserClaims)) []byte) {
	t.Helper()
	op, s := operatorServer(t)
	creds := func(seedOf nkeys.KeyPair, edit func(*jwt.UserClaims)) []byte {
		t.Helper()
		ujwt, seed := op.UserEdit(t, "U", nil, edit)
		b := testnats.Creds(t, ujwt, seed)
		if seedOf != nil { // FormatUserConfig refuses another user's seed: swapped after
			otherSeed, _ := seedOf.Seed()
			b = []byte(strings.Replace(string(b), seed, string(otherSeed), 1))
		}
		return b
	}
	return op, s, creds
}

// TestStartNamesBadCredsFile: nexd's connect at start with a creds file (real
// operator-mode server) whose seed is another user's, whose JWT expired, or whose JWT
// is valid only later. Each fails, and the error names --nats.creds-file, the file and
// what is wrong; the expired and not-yet-valid ones are first a warning naming the
// file, and the connect goes on. Before, the start checked only that a JWT and a seed
// were there: the first failed as the server's bare "authorization violation", the
// expired one as "authentication expired", naming no file.
//
// The decision for renewal in place: a JWT not valid now does not fail the start by
// itself, because nexd retries the connect while no server answers and nats.go reads
// the file at every attempt: an expired file renewed in place while the server is still
// coming up (its rotation tool and the server both starting at boot) connects, as it
// did before the check.
func TestStartNamesBadCredsFile(t *testing.T) {
	op, s, creds := operatorCreds(t)
	other, _, _ := userSeed(t)
	dir := t.TempDir()
	for _, tc := range []struct {
		name, says string
		file       []byte
		warned     bool
	}{
		{"another user's seed", "the user seed is of user", creds(other, nil), false},
		{"expired", "the user JWT expired at", creds(nil, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(-time.Hour).Unix() }), true},
		{"not valid yet", "the user JWT is valid only from", creds(nil, func(uc *jwt.UserClaims) { uc.NotBefore = time.Now().Add(time.Hour).Unix() }), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".creds")
			if err := os.WriteFile(path, tc.file, 0o600); err != nil {
				t.Fatal(err)
			}
			var logs testkit.Buffer
			_, err := Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}, CredsFile: path}, slog.New(slog.NewTextHandler(&logs, nil)))
			t.Logf("error: %v", err)
			if err == nil {
				t.Fatal("connected")
			}
			for _, want := range []string{"--nats.creds-file", path, tc.says} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("the error does not say %q: %v", want, err)
				}
			}
			if warned := strings.Contains(logs.String(), "level=WARN") && strings.Contains(logs.String(), path); warned != tc.warned {
				t.Errorf("warned of the file before the connect: %v, want %v; log:\n%s", warned, tc.warned, logs.String())
			}
		})
	}

	t.Run("expired and renewed in place while the server comes up", func(t *testing.T) {
		port := testkit.StablePort(t)
		path := filepath.Join(dir, "renewed.creds")
		if err := os.WriteFile(path, creds(nil, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(-time.Hour).Unix() }), 0o600); err != nil {
			t.Fatal(err)
		}
		type result struct {
			c   *Conn
			err error
		}
		done := make(chan result, 1)
		var logs testkit.Buffer
		ctx := ctxT(t)
		go func() {
			c, err := Connect(ctx, Options{Servers: []string{"nats://127.0.0.1:" + strconv.Itoa(port)}, CredsFile: path}, slog.New(slog.NewTextHandler(&logs, nil)))
			done <- result{c, err}
		}()
		testkit.Eventually(t, "a warning of the expired file and a failed attempt", func() bool {
			return strings.Contains(logs.String(), "not valid now") && strings.Contains(logs.String(), "NATS not reachable yet")
		})
		// The rotation tool's atomic rewrite.
		tmp := path + ".new"
		if err := os.WriteFile(tmp, creds(nil, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(time.Hour).Unix() }), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
		testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) { op.Configure(o); o.Port = port }})
		r := <-done
		if r.err != nil {
			t.Fatalf("the file renewed in place before the server answered: %v", r.err)
		}
		defer r.c.Close(ctx)
		roundTrip(t, r.c.NC)
	})
}
