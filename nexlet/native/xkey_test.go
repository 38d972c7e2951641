package native

import (
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
