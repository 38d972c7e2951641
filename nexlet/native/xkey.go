package native

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/privfile"
)

// XKeySeedFile is the native nexlet's curve key seed in its state directory. Workload
// environments are sealed to this key and stay sealed in the node's KV, so the key must
// survive restarts of the nexlet and of nexd for a replay to open them.
const XKeySeedFile = "xkey.seed"

// LoadXKey reads the curve key seed at path, or makes one and stores it there (0600,
// atomically, synced) when there is none.
func LoadXKey(path string) (nkeys.KeyPair, error) {
	kp, durable, err := BeginXKey(path)
	if err != nil {
		return nil, err
	}
	if err := durable(); err != nil {
		return nil, err
	}
	return kp, nil
}

// BeginXKey is LoadXKey that returns before a new seed is durable: its write and fsync
// go on meanwhile, and durable waits for them and reports how they went (nil at once
// for a seed read from path). The key must not be announced (the registration does)
// before durable returned nil: an environment sealed to a key a crash takes back could
// never be opened again.
func BeginXKey(path string) (kp nkeys.KeyPair, durable func() error, err error) {
	kp, durable, _, err = beginXKey(path, nil)
	return kp, durable, err
}

// beginXKey is BeginXKey that, when path holds no seed, stores fresh (made ahead, see
// Ahead) instead of a key it makes, and says so (created); a seed found at path wins
// over fresh.
func beginXKey(path string, fresh nkeys.KeyPair) (kp nkeys.KeyPair, durable func() error, created bool, err error) {
	none := func() error { return nil }
	b, err := os.ReadFile(path)
	if err == nil {
		kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(b))
		if err != nil {
			return nil, nil, false, fmt.Errorf("native nexlet xkey %s: not a curve key seed: %w", path, err)
		}
		return kp, none, false, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, nil, false, fmt.Errorf("native nexlet xkey: %w", err)
	}
	if kp = fresh; kp == nil {
		if kp, err = nkeys.CreateCurveKeys(); err != nil {
			return nil, nil, false, fmt.Errorf("native nexlet xkey: %w", err)
		}
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, nil, false, fmt.Errorf("native nexlet xkey: %w", err)
	}
	done := make(chan error, 1)
	go func() {
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			done <- fmt.Errorf("native nexlet xkey: %w", err)
			return
		}
		if err := privfile.Write(path, append(seed, '\n')); err != nil {
			done <- fmt.Errorf("native nexlet xkey: %w", err)
			return
		}
		done <- nil
	}()
	return kp, sync.OnceValue(func() error { return <-done }), true, nil
}
