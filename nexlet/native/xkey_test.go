package native

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBeginXKey: a new key is handed out before its seed is durable; durable waits for
// the write (the file then holds that key) and reports a write that failed, which
// Main's registration waits for, so a key a crash could take back is never announced.
func TestBeginXKey(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nexlets", "native", XKeySeedFile)
	kp, durable, err := BeginXKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := durable(); err != nil {
		t.Fatal(err)
	}
	again, err := LoadXKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if a, b := pubOf(t, kp), pubOf(t, again); a != b {
		t.Fatalf("stored %s, handed out %s", b, a)
	}
	// A directory that exists and lists no seed, but where no file can be made, also
	// not by root.
	_, durable, err = BeginXKey("/proc/self/fdinfo/" + XKeySeedFile)
	if err != nil {
		t.Fatalf("BeginXKey failed before writing: %v", err)
	}
	if err := durable(); err == nil || !strings.Contains(err.Error(), "native nexlet xkey") {
		t.Fatalf("durable = %v, want the failed write", err)
	}
}

func pubOf(t *testing.T, kp interface{ PublicKey() (string, error) }) string {
	t.Helper()
	p, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// TestXKeyMadeAhead: a pre-started nexlet's key made before its hand-off (Ahead) is
// the one a first start stores and announces; a start whose state directory already
// holds a seed uses that seed and drops the key made ahead, so that environments
// sealed to the stored key still open.
func TestXKeyMadeAhead(t *testing.T) {
	ahead := BuildAhead()
	fresh := ahead.XKey()
	if fresh == nil {
		t.Fatal("no key made ahead")
	}
	if other := BuildAhead().XKey(); pubOf(t, other) == pubOf(t, fresh) {
		t.Fatal("two builds ahead made the same key")
	}
	path := filepath.Join(t.TempDir(), "nexlets", "native", XKeySeedFile)
	kp, durable, created, err := beginXKey(path, fresh)
	if err != nil || !created {
		t.Fatalf("created %v, err %v", created, err)
	}
	if err := durable(); err != nil {
		t.Fatal(err)
	}
	if pubOf(t, kp) != pubOf(t, fresh) {
		t.Fatal("a first start did not use the key made ahead")
	}
	stored, err := LoadXKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if pubOf(t, stored) != pubOf(t, fresh) {
		t.Fatalf("stored %s, announced %s", pubOf(t, stored), pubOf(t, fresh))
	}

	// The next start guessed a first start: its own key made ahead is not used.
	next := BuildAhead().XKey()
	kp, durable, created, err = beginXKey(path, next)
	if err != nil || created {
		t.Fatalf("created %v, err %v", created, err)
	}
	if err := durable(); err != nil {
		t.Fatal(err)
	}
	if pubOf(t, kp) != pubOf(t, fresh) {
		t.Fatalf("a start with a stored seed uses %s, want the stored %s", pubOf(t, kp), pubOf(t, fresh))
	}
	if again, err := LoadXKey(path); err != nil || pubOf(t, again) != pubOf(t, fresh) {
		t.Fatalf("the stored seed changed (%v)", err)
	}
}

// TestXKeyPreviewed: a pre-started nexlet told its directories before its hand-off
// (Ahead.Preview) stores its key's seed there and makes it durable meanwhile; a start
// whose environment names that seed uses it as it is. A start that names another
// directory (a preview that guessed wrong) gets the seed there, not the key stored at
// the previewed path, which is removed; a seed already at the previewed path is read,
// never replaced, and stays.
func TestXKeyPreviewed(t *testing.T) {
	dirs := func(state string) map[string]string {
		return map[string]string{EnvStateDir: state, EnvRuntimeDir: "/run/nexd/nexlets/native"}
	}
	lookup := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }

	state := t.TempDir()
	a := BuildAhead()
	a.Preview(dirs(state))
	path := XKeySeedPath(lookup(dirs(state)))
	if path != filepath.Join(state, "nexlets", "native", XKeySeedFile) {
		t.Fatalf("seed path %s", path)
	}
	a.Wait() // the preview's seed is durable by now
	stored, err := LoadXKey(path)
	if err != nil {
		t.Fatalf("no seed stored at the previewed path: %v", err)
	}
	kp, durable, err := a.XKeyFor(path)
	if err != nil || durable() != nil {
		t.Fatal(err)
	}
	if pubOf(t, kp) != pubOf(t, stored) || pubOf(t, kp) != pubOf(t, a.XKey()) {
		t.Fatal("the start does not use the seed stored at the previewed path")
	}

	// Guessed wrong: the start's state directory is another one.
	wrong, right := t.TempDir(), t.TempDir()
	a = BuildAhead()
	a.Preview(dirs(wrong))
	rightPath := XKeySeedPath(lookup(dirs(right)))
	kp, durable, err = a.XKeyFor(rightPath)
	if err != nil || durable() != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(XKeySeedPath(lookup(dirs(wrong)))); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the seed stored at the wrongly previewed path is still there (%v)", err)
	}
	if got, err := LoadXKey(rightPath); err != nil || pubOf(t, got) != pubOf(t, kp) {
		t.Fatalf("the start's own seed: %v", err)
	}
	if pubOf(t, kp) == pubOf(t, a.XKey()) {
		t.Error("the key stored at the wrongly previewed path is announced")
	}

	// A start without a state directory stores nothing and does not use the key
	// stored at the previewed path, which is removed.
	other := t.TempDir()
	a = BuildAhead()
	a.Preview(dirs(other))
	kp, durable, err = a.XKeyFor("")
	if err != nil || durable() != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(XKeySeedPath(lookup(dirs(other)))); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the seed stored at the previewed path is still there (%v)", err)
	}
	if kp != nil && pubOf(t, kp) == pubOf(t, a.XKey()) {
		t.Error("a start without a state directory uses the key stored at the previewed path")
	}

	// A seed at the previewed path is read and kept, also when the start names another.
	a = BuildAhead()
	a.Preview(dirs(state))
	if _, _, err = a.XKeyFor(rightPath); err != nil {
		t.Fatal(err)
	}
	if kept, err := LoadXKey(path); err != nil || pubOf(t, kept) != pubOf(t, stored) {
		t.Fatalf("the seed at the previewed path changed or went (%v)", err)
	}
	a.Wait()
}
