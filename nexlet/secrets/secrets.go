// Package secrets resolves the secret://KEY references of workload start requests. The
// file store keeps one file per key under <dir>/<namespace>/<key>, mode 0600, so that
// `nexctl secret set|list|rm` and the native nexlet share it without a daemon round trip.
package secrets

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/nexd-project/nexd/internal/names"
)

// Scheme is the prefix that marks a value as a secret reference.
const Scheme = "secret://"

// ErrNotFound is returned (wrapped) for a key the store does not hold.
var ErrNotFound = errors.New("secret not found")

// Store looks secrets up per namespace.
type Store interface {
	Get(namespace, key string) (string, error)
}

// FileStore is a Store backed by files under Dir (usually <state dir>/secrets).
type FileStore struct {
	Dir string
}

// ValidName reports why a namespace or key cannot name a file, or nil.
func ValidName(kind, s string) error {
	if !names.Valid(s, names.Alnum|names.Underscore, names.Alnum|names.Underscore|names.Dot|names.Dash, 128) {
		return fmt.Errorf("secret %s %q: use 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'", kind, s)
	}
	return nil
}

func (s FileStore) path(namespace, key string) (string, error) {
	if s.Dir == "" {
		return "", errors.New("secret store: no directory configured")
	}
	if err := ValidName("namespace", namespace); err != nil {
		return "", err
	}
	if err := ValidName("key", key); err != nil {
		return "", err
	}
	return filepath.Join(s.Dir, namespace, key), nil
}

// Get returns the secret's value.
func (s FileStore) Get(namespace, key string) (string, error) {
	p, err := s.path(namespace, key)
	if err != nil {
		return "", err
	}
	b, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return "", fmt.Errorf("secret %q in namespace %q: %w", key, namespace, ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("secret %q in namespace %q: %w", key, namespace, err)
	}
	return string(b), nil
}

// Set stores value under key, replacing any previous value atomically.
func (s FileStore) Set(namespace, key, value string) error {
	p, err := s.path(namespace, key)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return fmt.Errorf("secret store: %w", err)
	}
	f, err := os.CreateTemp(filepath.Dir(p), ".tmp-"+key+"-*")
	if err != nil {
		return fmt.Errorf("secret store: %w", err)
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return fmt.Errorf("secret store: %w", err)
	}
	if _, err := f.WriteString(value); err != nil {
		f.Close()
		return fmt.Errorf("secret store: write %s: %w", p, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("secret store: write %s: %w", p, err)
	}
	if err := os.Rename(f.Name(), p); err != nil {
		return fmt.Errorf("secret store: %w", err)
	}
	return nil
}

// List returns the keys of namespace, sorted.
func (s FileStore) List(namespace string) ([]string, error) {
	if err := ValidName("namespace", namespace); err != nil {
		return nil, err
	}
	ents, err := os.ReadDir(filepath.Join(s.Dir, namespace))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("secret store: %w", err)
	}
	var keys []string
	for _, e := range ents {
		if e.Type().IsRegular() && !strings.HasPrefix(e.Name(), ".") {
			keys = append(keys, e.Name())
		}
	}
	sort.Strings(keys)
	return keys, nil
}

// Delete removes key; deleting a missing key returns ErrNotFound.
func (s FileStore) Delete(namespace, key string) error {
	p, err := s.path(namespace, key)
	if err != nil {
		return err
	}
	if err := os.Remove(p); errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("secret %q in namespace %q: %w", key, namespace, ErrNotFound)
	} else if err != nil {
		return fmt.Errorf("secret store: %w", err)
	}
	return nil
}

// Resolve returns v with a secret:// reference replaced by its value; other values are
// returned unchanged.
func Resolve(st Store, namespace, v string) (string, error) {
	key, ok := strings.CutPrefix(v, Scheme)
	if !ok {
		return v, nil
	}
	if st == nil {
		return "", fmt.Errorf("%s%s: no secret store configured", Scheme, key)
	}
	return st.Get(namespace, key)
}
