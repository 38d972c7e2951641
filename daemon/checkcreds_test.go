package daemon

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nkeys"
)

// TestCheckReadsCredsFile: nexd --check reads the creds file (nats.creds_file): a
// JWT and seed that are not there, do not decode, are of another kind or another
// user, or a JWT expired or not valid yet, are each refused naming the key, the file
// and what is wrong; a good one is described (its user and expiry). Before, --check
// looked at the file's permissions only and said "configuration is valid" for each.
func TestCheckReadsCredsFile(t *testing.T) {
	akp, _ := nkeys.CreateAccount()
	user := func() (nkeys.KeyPair, string, []byte) {
		kp, _ := nkeys.CreateUser()
		pub, _ := kp.PublicKey()
		seed, _ := kp.Seed()
		return kp, pub, seed
	}
	creds := func(sub string, seed []byte, edit func(*jwt.UserClaims)) string {
		uc := jwt.NewUserClaims(sub)
		uc.Name = "ops"
		if edit != nil {
			edit(uc)
		}
		tok, err := uc.Encode(akp)
		if err != nil {
			t.Fatal(err)
		}
		b, err := jwt.FormatUserConfig(tok, seed)
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	_, pub, seed := user()
	_, otherPub, otherSeed := user()
	accSeed, _ := akp.Seed()
	good := creds(pub, seed, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(30 * 24 * time.Hour).Unix() })
	seedAt := strings.Index(good, "-----BEGIN USER NKEY SEED-----")
	other := creds(otherPub, otherSeed, nil)
	dir := t.TempDir()
	check := func(name, body string) (string, string, int) {
		t.Helper()
		path := filepath.Join(dir, name+".creds")
		if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		var out, errb strings.Builder
		code := Main(t.Context(), []string{"--check", "--state=", "--nats.servers", "nats://127.0.0.1:1", "--nats.creds-file", path}, &out, &errb, Early{})
		return out.String(), errb.String(), code
	}
	out, errOut, code := check("good", good)
	if code != ExitOK || !strings.Contains(out, "# nats.creds_file: "+filepath.Join(dir, "good.creds")+": user "+pub+", its JWT expires at") {
		t.Fatalf("good creds: exit %d\nstdout %s\nstderr %s", code, out, errOut)
	}
	if _, _, code := check("soon", creds(pub, seed, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(time.Hour).Unix() })); code != ExitOK {
		t.Fatalf("creds expiring in an hour: exit %d", code)
	}
	for _, c := range []struct{ name, body, want string }{
		{"expired", creds(pub, seed, func(uc *jwt.UserClaims) { uc.Expires = time.Now().Add(-time.Hour).Unix() }), "the user JWT expired at"},
		{"notyet", creds(pub, seed, func(uc *jwt.UserClaims) { uc.NotBefore = time.Now().Add(time.Hour).Unix() }), "the user JWT is valid only from"},
		{"otheruser", other[:strings.Index(other, "-----BEGIN USER NKEY SEED-----")] + good[seedAt:], "the user seed is of user " + pub + ", the JWT is of user " + otherPub},
		{"accountseed", good[:seedAt] + strings.Replace(good[seedAt:], string(seed), string(accSeed), 1), "no user seed"},
		{"jwtalone", good[:seedAt], "no user seed"},
		{"seedalone", good[seedAt:], "no user JWT"},
		{"garbage", "not a creds file\n", ".creds"},
		{"cutjwt", strings.Replace(good, good[40:200], "", 1), ".creds"},
	} {
		out, errOut, code := check(c.name, c.body)
		path := filepath.Join(dir, c.name+".creds")
		if code != ExitUsage || !strings.Contains(errOut, "nats.creds_file: ") || !strings.Contains(errOut, path) || !strings.Contains(errOut, c.want) {
			t.Errorf("%s: exit %d\nstderr %s\nwant exit %d naming nats.creds_file, %s and %q", c.name, code, errOut, ExitUsage, path, c.want)
		}
		if strings.Contains(out, "configuration is valid") || strings.Contains(errOut, string(seed)) {
			t.Errorf("%s: said valid, or quoted the seed:\n%s\n%s", c.name, out, errOut)
		}
	}
}
