// Package identity gives a node its server nkey (the node id) and its curve key (the
// xkey): from configured seeds, else from seeds persisted in the state directory, else
// fresh and ephemeral.
package identity

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/privfile"
)

// Source says where a key came from.
type Source string

// Key sources.
const (
	FromConfig   Source = "config"
	FromStateDir Source = "state-dir"
	Generated    Source = "generated (persisted)"
	Ephemeral    Source = "ephemeral"
)

// File names under the state directory.
const (
	NodeSeedFile = "node.seed"
	XKeySeedFile = "node.xkey.seed"
)

// Identity is a node's keys.
type Identity struct {
	Node       nkeys.KeyPair
	XKey       nkeys.KeyPair
	NodeSource Source
	XKeySource Source

	// persisting owns the writes of generated seeds that Begin left running.
	persisting sync.WaitGroup
	persistErr [2]error
}

// ID is the node id: the public server key.
func (i *Identity) ID() string {
	pub, _ := i.Node.PublicKey()
	return pub
}

// XKeyPublic is the node's public curve key.
func (i *Identity) XKeyPublic() string {
	pub, _ := i.XKey.PublicKey()
	return pub
}

// Load resolves both keys. nodeSeed and xkeySeed are the configured seeds (may be
// empty); stateDir is where generated seeds persist ("" for an ephemeral node). A
// generated seed is durable (written and synced) when it returns.
func Load(nodeSeed, xkeySeed, stateDir string) (*Identity, error) {
	id, err := Begin(nodeSeed, xkeySeed, stateDir)
	if err != nil {
		return nil, err
	}
	if err := id.Persisted(); err != nil {
		return nil, err
	}
	return id, nil
}

// Begin is Load that returns before generated seeds are durable: their writes and
// fsyncs (1.3-4 ms each on a first start here) go on while the caller starts what
// needs only the keys. Call Persisted before the identity is announced to anyone: a
// node id that a crash could still take back must never be seen.
func Begin(nodeSeed, xkeySeed, stateDir string) (*Identity, error) {
	id := &Identity{}
	var write [2]func() error
	var err error
	if id.Node, id.NodeSource, write[0], err = load(nodeSeed, stateDir, NodeSeedFile, nkeys.PrefixByteServer, nkeys.CreateServer); err != nil {
		return nil, fmt.Errorf("node identity: %w", err)
	}
	if id.XKey, id.XKeySource, write[1], err = load(xkeySeed, stateDir, XKeySeedFile, nkeys.PrefixByteCurve, nkeys.CreateCurveKeys); err != nil {
		return nil, fmt.Errorf("node xkey: %w", err)
	}
	if write[0] != nil || write[1] != nil {
		// A first start killed while it wrote left its temporary files: seeds of a node
		// that never came to be.
		stale, _ := filepath.Glob(filepath.Join(stateDir, seedTempPattern))
		for _, f := range stale {
			_ = os.Remove(f)
		}
	}
	// Side by side: each is a new file made durable with an fsync.
	for i, w := range write {
		if w != nil {
			id.persisting.Go(func() { id.persistErr[i] = w() })
		}
	}
	return id, nil
}

// Persisted waits until the seeds Begin generated are durable, and says whether they
// are. It returns nil at once for keys that were not generated.
func (i *Identity) Persisted() error {
	i.persisting.Wait()
	if err := i.persistErr[0]; err != nil {
		return fmt.Errorf("node identity: %w", err)
	}
	if err := i.persistErr[1]; err != nil {
		return fmt.Errorf("node xkey: %w", err)
	}
	return nil
}

// load resolves one key; a key it generates for dir comes with the write that makes
// it durable (nil otherwise), for the caller to run.
func load(seed, dir, file string, want nkeys.PrefixByte, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, Source, func() error, error) {
	if seed != "" {
		kp, err := fromSeed(seed, want)
		if err != nil {
			return nil, "", nil, err
		}
		return kp, FromConfig, nil, nil
	}
	if dir == "" {
		kp, err := create()
		return kp, Ephemeral, nil, err
	}
	path := filepath.Join(dir, file)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := checkSeedFile(path); err != nil {
			return nil, "", nil, err
		}
		kp, err := fromSeed(strings.TrimSpace(string(b)), want)
		if err != nil {
			return nil, "", nil, fmt.Errorf("%s: %w", path, err)
		}
		return kp, FromStateDir, nil, nil
	case !errors.Is(err, fs.ErrNotExist):
		return nil, "", nil, fmt.Errorf("read %s: %w", path, err)
	}
	kp, err := create()
	if err != nil {
		return nil, "", nil, err
	}
	s, err := kp.Seed()
	if err != nil {
		return nil, "", nil, err
	}
	return kp, Generated, func() error { return writeSecret(path, s) }, nil
}

func fromSeed(seed string, want nkeys.PrefixByte) (nkeys.KeyPair, error) {
	pfx, _, err := nkeys.DecodeSeed([]byte(seed))
	if err != nil {
		return nil, fmt.Errorf("invalid seed: %w", err)
	}
	if pfx != want {
		return nil, fmt.Errorf("seed is a %s seed, want a %s seed", pfx, want)
	}
	return nkeys.FromSeed([]byte(seed))
}

// seedTempPattern names a seed file being written (os.CreateTemp).
const seedTempPattern = ".seed-*"

// writeSecret writes the seed atomically with mode 0600, so a crash never leaves a
// half-written identity, and syncs file and directory, so a crash after it never loses
// the identity the node went on to use.
func writeSecret(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return fmt.Errorf("create state directory: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), seedTempPattern)
	if err != nil {
		return fmt.Errorf("persist %s: %w", path, err)
	}
	defer os.Remove(tmp.Name())
	err = tmp.Chmod(0o600)
	if err == nil {
		_, err = tmp.Write(append(data, '\n'))
	}
	if err == nil {
		err = tmp.Sync()
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err == nil {
		err = privfile.SyncDir(filepath.Dir(path))
	}
	if err != nil {
		return fmt.Errorf("persist %s: %w", path, err)
	}
	return nil
}

// checkSeedFile refuses a seed file that anyone but nexd could read or change: it is
// the node's identity (and nexd writes it 0600).
func checkSeedFile(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("read %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if mode := fi.Mode().Perm(); mode&0o077 != 0 || (ok && st.Uid != 0 && int(st.Uid) != os.Geteuid()) {
		owner := -1
		if ok {
			owner = int(st.Uid)
		}
		return fmt.Errorf("%s holds the node's seed but has mode %04o and owner uid %d: only nexd may read it; fix: chown root %s && chmod 600 %s", path, mode, owner, path, path)
	}
	return nil
}
