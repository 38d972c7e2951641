package nkeysign

import (
	"bytes"
	"testing"

	"github.com/nats-io/nkeys"
)

func TestCachedSignsAsTheKeyPair(t *testing.T) {
	for _, mk := range []func() (nkeys.KeyPair, error){nkeys.CreateServer, nkeys.CreateAccount, nkeys.CreateUser} {
		kp, err := mk()
		if err != nil {
			t.Fatal(err)
		}
		c, err := Cached(kp)
		if err != nil {
			t.Fatal(err)
		}
		msg := []byte("nexd-bid/1\nsystem\nauction")
		got, err := c.Sign(msg)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := kp.Sign(msg)
		if !bytes.Equal(got, want) { // ed25519 signatures are deterministic
			t.Errorf("signature differs from the key pair's")
		}
		if err := kp.Verify(msg, got); err != nil {
			t.Errorf("key pair does not verify it: %v", err)
		}
		p1, err := c.PublicKey()
		if p0, _ := kp.PublicKey(); err != nil || p1 != p0 {
			t.Errorf("public key %q, %v; the key pair's is %q", p1, err, p0)
		}
	}
}

func TestPublicOnlyKeyIsAnError(t *testing.T) {
	kp, _ := nkeys.CreateServer()
	pub, _ := kp.PublicKey()
	pk, err := nkeys.FromPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Cached(pk); err == nil {
		t.Errorf("a public key alone gave a signer")
	}
}

var msg = []byte("nexd-bid/1\nsystem\nAUCTIONID1234567890\nBIDDER12345678\nNODEXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\nXKEY")

// BenchmarkSign: a bid's signature, with nkeys' Sign and the cached key.
func BenchmarkSign(b *testing.B) {
	kp, _ := nkeys.CreateServer()
	c, _ := Cached(kp)
	b.Run("nkeys", func(b *testing.B) {
		for b.Loop() {
			_, _ = kp.Sign(msg)
		}
	})
	b.Run("cached", func(b *testing.B) {
		for b.Loop() {
			_, _ = c.Sign(msg)
		}
	})
}

// BenchmarkPublicKey: the signer's public key, which every user JWT's encoding asks
// for, from nkeys (derived from the seed) and from the cached key.
func BenchmarkPublicKey(b *testing.B) {
	kp, _ := nkeys.CreateAccount()
	c, _ := Cached(kp)
	b.Run("nkeys", func(b *testing.B) {
		for b.Loop() {
			_, _ = kp.PublicKey()
		}
	})
	b.Run("cached", func(b *testing.B) {
		for b.Loop() {
			_, _ = c.PublicKey()
		}
	})
}

// A wiped key signs nothing more, as nkeys' own: the cached private key went with it.
func TestWipedKeyNoLongerSigns(t *testing.T) {
	kp, _ := nkeys.CreateServer()
	c, err := Cached(kp)
	if err != nil {
		t.Fatal(err)
	}
	c.Wipe()
	if sig, err := c.Sign(msg); err == nil {
		t.Fatalf("a wiped key signed: %x", sig)
	}
	if _, err := kp.Sign(msg); err == nil {
		t.Fatalf("the wrapped key pair was not wiped")
	}
	// Nor does it answer its public key any more, as nkeys' own (the cached one stays
	// unread).
	if _, err := kp.PublicKey(); err == nil {
		t.Fatalf("nkeys answers a wiped key's public key: the test's premise is gone")
	}
	if pub, err := c.PublicKey(); err == nil {
		t.Fatalf("a wiped key answered its public key %q", pub)
	}
}

// A curve key signs nothing in nkeys; a cached one must not sign with its seed as an
// ed25519 key either.
func TestCurveKeyIsAnError(t *testing.T) {
	kp, _ := nkeys.CreateCurveKeys()
	if _, err := Cached(kp); err == nil {
		t.Errorf("a curve key gave a signer")
	}
}
