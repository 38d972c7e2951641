package daemon

import (
	"errors"
	"fmt"
	"path/filepath"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/nexlet/secrets"
)

// secretStore is the file secret store under <state dir>/secrets that the native
// nexlet resolves secret:// values from, managed through the control socket.
type secretStore struct {
	dir string
	fs  secrets.FileStore
}

func newSecretStore(stateDir string) *secretStore {
	if stateDir == "" {
		return &secretStore{}
	}
	dir := filepath.Join(stateDir, "secrets")
	return &secretStore{dir: dir, fs: secrets.FileStore{Dir: dir}}
}

func (s *secretStore) Set(ns, key string, value []byte) error {
	return s.fs.Set(ns, key, string(value))
}

func (s *secretStore) List(ns string) ([]string, error) { return s.fs.List(ns) }

func (s *secretStore) Delete(ns, key string) error {
	err := s.fs.Delete(ns, key)
	if errors.Is(err, secrets.ErrNotFound) {
		return fmt.Errorf("%w: %w", control.ErrNotFound, err)
	}
	return err
}
