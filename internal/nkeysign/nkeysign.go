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

// Cached wraps kp so that Sign uses the private key derived once here; every other
// method is kp's.
func Cached(kp nkeys.KeyPair) (nkeys.KeyPair, error) {
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("nkey signer: %w", err)
	}
	_, raw, err := nkeys.DecodeSeed(seed)
	if err != nil {
		return nil, fmt.Errorf("nkey signer: %w", err)
	}
	return &cached{KeyPair: kp, priv: ed25519.NewKeyFromSeed(raw)}, nil
}

type cached struct {
	nkeys.KeyPair
	priv ed25519.PrivateKey
}

// Sign signs input with the cached key: the same signature kp.Sign makes.
func (c *cached) Sign(input []byte) ([]byte, error) { return ed25519.Sign(c.priv, input), nil }
