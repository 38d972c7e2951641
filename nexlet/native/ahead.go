package native

import (
	"crypto/ed25519"
	"os"
	"path/filepath"
	"sync"

	"github.com/nats-io/nkeys"
)

// Ahead is what a pre-started native nexlet builds while it waits for its hand-off
// (docs/performance-notes.md, Ready). Before anything is known of its start: a fresh curve key, used by a
// start whose state directory holds no seed yet (a first start) and dropped when one
// is there; and the ed25519 tables, which the registration key's first use would
// otherwise build on the way to the registration. Once nexd, holding its state and
// runtime directories' locks, previews where the start's directories are (Preview):
// the key's seed, read there or stored and made durable, so that the registration
// need not wait for a first start's fsyncs. The start checks that its own environment
// names the same seed (XKeyFor) and does it anew otherwise.
type Ahead struct {
	done chan struct{}
	xkey nkeys.KeyPair // nil when making it failed

	wg   sync.WaitGroup // the seed's begin (Preview)
	mu   sync.Mutex
	seed *aheadSeed // set by Preview
}

// aheadSeed is the xkey seed begun at a previewed path.
type aheadSeed struct {
	path    string
	done    chan struct{} // closed once begun
	kp      nkeys.KeyPair
	durable func() error
	created bool // stored anew (not read)
	err     error
}

// BuildAhead starts building; Wait, or Main that was given it, waits for it.
func BuildAhead() *Ahead {
	a := &Ahead{done: make(chan struct{})}
	go func() {
		defer close(a.done)
		if kp, err := nkeys.CreateCurveKeys(); err == nil {
			a.xkey = kp
		}
		// The curve's tables are built once a process, on its first key.
		_ = ed25519.NewKeyFromSeed(make([]byte, ed25519.SeedSize))
	}()
	return a
}

// Preview takes what nexd says the start's environment will set (supervise's
// Prestarted.Preview): when it names a state directory, the xkey seed there is read, or
// the key made ahead is stored there, meanwhile. Once; it does not block.
func (a *Ahead) Preview(env map[string]string) {
	path := XKeySeedPath(func(k string) string { return env[k] })
	a.mu.Lock()
	defer a.mu.Unlock()
	if path == "" || a.seed != nil {
		return
	}
	s := &aheadSeed{path: path, done: make(chan struct{})}
	a.seed = s
	a.wg.Go(func() {
		defer close(s.done)
		s.kp, s.durable, s.created, s.err = beginXKey(path, a.XKey())
		if s.err == nil && s.durable != nil {
			// Made durable now: Wait waits for it, as the owner of the write.
			_ = s.durable()
		}
	})
}

// Wait waits for what was built (nil a does nothing).
func (a *Ahead) Wait() {
	if a != nil {
		<-a.done
		a.wg.Wait()
	}
}

// XKey is the curve key built ahead, nil when there is none; to be used by one start
// only.
func (a *Ahead) XKey() nkeys.KeyPair {
	if a == nil {
		return nil
	}
	<-a.done
	return a.xkey
}

// XKeyFor is BeginXKey(path) for the start: the seed begun at the previewed path when
// it is path; else (no preview, or another directory) the seed at path, with the key
// made ahead stored there when there is none. A seed this process stored at a
// previewed path that is not its start's is removed, and its key not used. With path
// "" (no state directory) it stores nothing: a key to use until the process ends
// (nil: New makes one).
func (a *Ahead) XKeyFor(path string) (kp nkeys.KeyPair, durable func() error, err error) {
	none := func() error { return nil }
	if a == nil {
		if path == "" {
			return nil, none, nil
		}
		return BeginXKey(path)
	}
	fresh := a.XKey()
	a.mu.Lock()
	s := a.seed
	a.mu.Unlock()
	if s != nil {
		<-s.done
		if s.path == path {
			return s.kp, s.durable, s.err
		}
		if s.err == nil && s.created {
			_ = os.Remove(s.path)
			fresh = nil // it stays with the removed seed
		}
	}
	if path == "" {
		return fresh, none, nil
	}
	kp, durable, _, err = beginXKey(path, fresh)
	return kp, durable, err
}

// XKeySeedPath is where the native nexlet run with env keeps its xkey seed: its state
// directory's nexlets/<runtime dir's name>/, "" when it has no state directory.
func XKeySeedPath(env func(string) string) string {
	stateDir := env(EnvStateDir)
	if stateDir == "" {
		stateDir = env("STATE_DIRECTORY")
	}
	if stateDir == "" {
		return ""
	}
	return filepath.Join(stateDir, "nexlets", filepath.Base(runtimeDir(env)), XKeySeedFile)
}

// runtimeDir is the native nexlet's runtime directory under env.
func runtimeDir(env func(string) string) string {
	if d := env(EnvRuntimeDir); d != "" {
		return d
	}
	if d := env("RUNTIME_DIRECTORY"); d != "" {
		return filepath.Join(d, "nexlets", "native")
	}
	return filepath.Join(os.TempDir(), "nexd-native")
}
