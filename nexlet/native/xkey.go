package native

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/privfile"
)

// XKeySeedFile is the native nexlet's curve key seed in its state directory. Workload
// environments are sealed to this key and stay sealed in the node's KV, so the key must
// survive restarts of the nexlet and of nexd for a replay to open them.
const XKeySeedFile = "xkey.seed"

// LoadXKey reads the curve key seed at path, or makes one and stores it there (0600,
// atomically) when there is none.
func LoadXKey(path string) (nkeys.KeyPair, error) {
	b, err := os.ReadFile(path)
	if err == nil {
		kp, err := nkeys.FromCurveSeed(bytes.TrimSpace(b))
		if err != nil {
			return nil, fmt.Errorf("native nexlet xkey %s: not a curve key seed: %w", path, err)
		}
		return kp, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("native nexlet xkey: %w", err)
	}
	kp, err := nkeys.CreateCurveKeys()
	if err != nil {
		return nil, fmt.Errorf("native nexlet xkey: %w", err)
	}
	seed, err := kp.Seed()
	if err != nil {
		return nil, fmt.Errorf("native nexlet xkey: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("native nexlet xkey: %w", err)
	}
	if err := privfile.Write(path, append(seed, '\n')); err != nil {
		return nil, fmt.Errorf("native nexlet xkey: %w", err)
	}
	return kp, nil
}
