package identity

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
)

func TestPersistedAcrossStarts(t *testing.T) {
	dir := t.TempDir()
	first, err := Load("", "", dir)
	if err != nil {
		t.Fatal(err)
	}
	if first.NodeSource != Generated || first.XKeySource != Generated {
		t.Fatalf("sources = %s/%s, want generated", first.NodeSource, first.XKeySource)
	}
	for _, f := range []string{NodeSeedFile, XKeySeedFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode = %v, want 0600", f, st.Mode().Perm())
		}
	}
	second, err := Load("", "", dir)
	if err != nil {
		t.Fatal(err)
	}
	if second.ID() != first.ID() || second.XKeyPublic() != first.XKeyPublic() {
		t.Fatalf("identity changed across starts: %s -> %s", first.ID(), second.ID())
	}
	if second.NodeSource != FromStateDir {
		t.Errorf("second source = %s", second.NodeSource)
	}
	if !strings.HasPrefix(first.ID(), "N") || !strings.HasPrefix(first.XKeyPublic(), "X") {
		t.Errorf("unexpected key kinds %s %s", first.ID(), first.XKeyPublic())
	}
}

func TestEphemeralWithoutStateDir(t *testing.T) {
	a, err := Load("", "", "")
	if err != nil {
		t.Fatal(err)
	}
	b, err := Load("", "", "")
	if err != nil {
		t.Fatal(err)
	}
	if a.ID() == b.ID() {
		t.Fatal("ephemeral identities must differ")
	}
	if a.NodeSource != Ephemeral {
		t.Errorf("source = %s", a.NodeSource)
	}
}

func TestConfiguredSeeds(t *testing.T) {
	srv, _ := nkeys.CreateServer()
	seed, _ := srv.Seed()
	cur, _ := nkeys.CreateCurveKeys()
	cseed, _ := cur.Seed()
	user, _ := nkeys.CreateUser()
	useed, _ := user.Seed()
	pub, _ := srv.PublicKey()

	id, err := Load(string(seed), string(cseed), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if id.ID() != pub || id.NodeSource != FromConfig {
		t.Fatalf("got %s from %s", id.ID(), id.NodeSource)
	}
	tests := []struct{ node, xkey, want string }{
		{string(useed), "", "seed is a user seed, want a server seed"},
		{"", string(seed), "seed is a server seed, want a x25519 seed"},
		{"SNOTASEED", "", "invalid seed"},
	}
	for _, tc := range tests {
		_, err := Load(tc.node, tc.xkey, "")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("Load(%q,%q) err = %v, want %q", tc.node, tc.xkey, err, tc.want)
		}
	}
}

func TestCorruptPersistedSeed(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, NodeSeedFile), []byte("garbage\n"), 0o600)
	_, err := Load("", "", dir)
	if err == nil || !strings.Contains(err.Error(), NodeSeedFile) {
		t.Fatalf("err = %v, want it to name %s", err, NodeSeedFile)
	}
}

// A seed file others can read or write is refused with the fix, not used.
func TestSeedFileOthersCanReachIsRefused(t *testing.T) {
	dir := t.TempDir()
	if _, err := Load("", "", dir); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, NodeSeedFile)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Load("", "", dir)
	if err == nil || !strings.Contains(err.Error(), path) || !strings.Contains(err.Error(), "0644") || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("err = %v, want a refusal naming %s, its mode and the fix", err, path)
	}
}

// TestBeginPersistsInTheBackground: Begin hands out generated keys before their seeds
// are durable; Persisted waits for the writes (the files then hold those very keys)
// and reports a write that failed, naming the file.
func TestBeginPersistsInTheBackground(t *testing.T) {
	dir := t.TempDir()
	id, err := Begin("", "", dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := id.Persisted(); err != nil {
		t.Fatal(err)
	}
	again, err := Load("", "", dir)
	if err != nil {
		t.Fatal(err)
	}
	if again.NodeSource != FromStateDir || again.ID() != id.ID() || again.XKeyPublic() != id.XKeyPublic() {
		t.Fatalf("persisted %s/%s (%s), handed out %s/%s", again.ID(), again.XKeyPublic(), again.NodeSource, id.ID(), id.XKeyPublic())
	}

	// A directory that exists and lists no seed, but where no file can be made, also
	// not by root.
	const unwritable = "/proc/self/fdinfo"
	id, err = Begin("", "", unwritable)
	if err != nil {
		t.Fatalf("Begin failed before writing: %v", err)
	}
	if err := id.Persisted(); err == nil || !strings.Contains(err.Error(), "persist "+unwritable+"/node") {
		t.Fatalf("Persisted = %v, want the failed write", err)
	}
	if _, err := Load("", "", unwritable); err == nil {
		t.Fatal("Load succeeded where the seed cannot be written")
	}
}

// A first start killed while it wrote its seeds leaves temporary files holding seeds
// of a node that never came to be; the next first start removes them.
func TestStaleSeedTempsRemoved(t *testing.T) {
	dir := t.TempDir()
	stale := filepath.Join(dir, ".seed-123456")
	if err := os.WriteFile(stale, []byte("SNSTALE\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := Load("", "", dir); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale seed temp file after a first start: %v", err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, ".seed-*"))
	if len(left) > 0 {
		t.Fatalf("seed temp files left: %v", left)
	}
}

// TestPersistedSeedsSurviveACrash: once Persisted said the generated seeds are
// durable, a crash must not lose them (the node has already used its id), so each
// seed's rename is followed by a sync of the state directory (seen with strace).
// Before, only the files were synced: after a power loss a journal could come back
// without the directory entries, and the next start would make another identity.
func TestPersistedSeedsSurviveACrash(t *testing.T) {
	if dir := os.Getenv("IDENTITY_BEGIN"); dir != "" { // the child under strace
		id, err := Begin("", "", dir)
		if err != nil {
			t.Fatal(err)
		}
		if err := id.Persisted(); err != nil {
			t.Fatal(err)
		}
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestPersistedSeedsSurviveACrash$")
	cmd.Env = append(os.Environ(), "IDENTITY_BEGIN="+dir)
	trace := testkit.Syscalls(t, cmd, "fsync,rename,renameat,renameat2")
	for _, f := range []string{NodeSeedFile, XKeySeedFile} {
		if path := filepath.Join(dir, f); !testkit.SyncedAfterRename(trace, path) {
			t.Errorf("no sync of %s after the rename onto %s:\n%s", dir, path, strings.Join(trace, "\n"))
		}
	}
}
