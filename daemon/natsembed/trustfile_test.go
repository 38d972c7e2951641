package natsembed

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"
)

func trustSeeds(t testing.TB) trustKeys {
	t.Helper()
	seed := func(make func() (nkeys.KeyPair, error)) string {
		kp, err := make()
		if err != nil {
			t.Fatal(err)
		}
		s, _ := kp.Seed()
		return string(s)
	}
	return trustKeys{Operator: seed(nkeys.CreateOperator), System: seed(nkeys.CreateAccount),
		Account: seed(nkeys.CreateAccount), Signing: seed(nkeys.CreateAccount)}
}

func trustJSON(t testing.TB, k trustKeys) []byte {
	b, err := json.Marshal(k)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestTrustFileErrorsNameTheKey: a trust file with a key missing, not a seed, of the
// wrong kind or the same as another is refused at the start with the file and the key
// named, and nexd makes no new keys over it. Before, a missing key failed as "bad
// seed" with no key named, and a user seed as the operator's or the account seed again
// as its signing key was taken.
func TestTrustFileErrorsNameTheKey(t *testing.T) {
	good := trustSeeds(t)
	user, _ := nkeys.CreateUser()
	userSeed, _ := user.Seed()
	for _, c := range []struct {
		name, key string
		edit      func(k *trustKeys)
	}{
		{"missing", "nex_signing_seed", func(k *trustKeys) { k.Signing = "" }},
		{"not a seed", "system_account_seed", func(k *trustKeys) { k.System = "SAnotaseed" }},
		{"user seed as operator", "operator_seed", func(k *trustKeys) { k.Operator = string(userSeed) }},
		{"operator seed as account", "nex_account_seed", func(k *trustKeys) { k.Account = good.Operator }},
		{"signing key is the account key", "nex_signing_seed", func(k *trustKeys) { k.Signing = k.Account }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			k := good
			c.edit(&k)
			path := filepath.Join(dir, trustFile)
			if err := os.WriteFile(path, trustJSON(t, k), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := loadOrCreateTrust(dir)
			if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), `"`+c.key+`"`) {
				t.Fatalf("got %v, want an error naming %s and %q", err, path, c.key)
			}
			if b, _ := os.ReadFile(path); string(b) != string(trustJSON(t, k)) {
				t.Fatal("the trust file was replaced")
			}
		})
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, trustFile), trustJSON(t, good), 0o600); err != nil {
		t.Fatal(err)
	}
	tr, err := loadOrCreateTrust(dir)
	if err != nil {
		t.Fatal(err)
	}
	if pub, _ := tr.account.PublicKey(); pub != tr.AccountPub() {
		t.Fatalf("account key %s, AccountPub %s", pub, tr.AccountPub())
	}
}

// FuzzTrustFile: whatever the trust file holds, parseTrust refuses it with an error
// naming the file, or returns four seeds of the right kinds, each its own, that the
// server's configuration takes.
func FuzzTrustFile(f *testing.F) {
	good := trustSeeds(f)
	f.Add(trustJSON(f, good))
	f.Add([]byte(`{"operator_seed":"","system_account_seed":"x"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"operator_seed":"` + good.Account + `","system_account_seed":"` + good.System + `","nex_account_seed":"` + good.Account + `","nex_signing_seed":"` + good.Account + `"}`))
	f.Add([]byte(`{"operator_seed":1}`))
	f.Add(trustJSON(f, trustKeys{Operator: good.Operator, System: good.System, Account: good.Account, Signing: good.System}))
	const path = "/state/nats-trust.json"
	f.Fuzz(func(t *testing.T, b []byte) {
		k, err := parseTrust(path, b)
		if err != nil {
			if !strings.Contains(err.Error(), path) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		seen := map[string]bool{}
		for i, s := range []string{k.Operator, k.System, k.Account, k.Signing} {
			kp, err := nkeys.FromSeed([]byte(s))
			if err != nil {
				t.Fatalf("seed %d accepted: %v", i, err)
			}
			pub, _ := kp.PublicKey()
			if (i == 0) != nkeys.IsValidPublicOperatorKey(pub) || (i > 0) != nkeys.IsValidPublicAccountKey(pub) || seen[pub] {
				t.Fatalf("seed %d accepted: public key %s (seen before: %v)", i, pub, seen[pub])
			}
			seen[pub] = true
		}
	})
}
