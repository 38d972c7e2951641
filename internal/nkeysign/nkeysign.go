// Package nkeysign signs with an nkey without deriving its private key again for every
// signature: nkeys' KeyPair.Sign decodes the seed and computes the ed25519 key pair
// (a scalar multiplication, as costly as the signature itself) each time. The node
// signs every bid, and the minter every user JWT, on the deploy path.
package nkeysign

import (
	"crypto/ed25519"
	"fmt"

	"github.com/nats-io/nkeys"
)

// Cached wraps kp so that Sign uses the private key derived once here, and PublicKey
// the public key (nkeys derives it from the seed, a scalar multiplication, on every
// call: every user JWT's encoding asks for its issuer's); every other method is kp's.
func Cached(kp nkeys.KeyPair) (nkeys.KeyPair, error) {
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("nkey signer: %w", err)
	}
	prefix, raw, err := nkeys.DecodeSeed(seed)
	if err != nil {
		return nil, fmt.Errorf("nkey signer: %w", err)
	}
	if prefix == nkeys.PrefixByteCurve {
		// Its seed is an X25519 key: nkeys refuses to sign with it, and so must we.
		return nil, fmt.Errorf("nkey signer: %w", nkeys.ErrInvalidCurveKeyOperation)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		clear(raw)
		return nil, fmt.Errorf("nkey signer: %w", err)
	}
	c := &cached{KeyPair: kp, priv: ed25519.NewKeyFromSeed(raw), pub: pub}
	clear(raw) // the decoded seed; the private key holds it now
	return c, nil
}

type cached struct {
	nkeys.KeyPair
	priv ed25519.PrivateKey
	pub  string
}

// PublicKey is kp's public key, as kp says it. Once wiped it is kp's PublicKey.
func (c *cached) PublicKey() (string, error) {
	if c.priv == nil {
		return c.KeyPair.PublicKey()
	}
	return c.pub, nil
}

// Sign signs input with the cached key: the same signature kp.Sign makes. Once wiped
// it is kp's Sign, which fails.
func (c *cached) Sign(input []byte) ([]byte, error) {
	if c.priv == nil {
		return c.KeyPair.Sign(input)
	}
	return ed25519.Sign(c.priv, input), nil
}

// Wipe clears the cached private key as well as kp's seed: a wiped key signs nothing.
func (c *cached) Wipe() {
	clear(c.priv)
	c.priv = nil
	c.KeyPair.Wipe()
}
