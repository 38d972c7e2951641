package privfile

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

// A planted world-readable "<path>.tmp" (the name the old code wrote through) and a
// symlink at that name never receive the secret.
func TestWriteIgnoresPlantedTempFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "key.seed")
	planted := path + ".tmp"
	if err := os.WriteFile(planted, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(dir, "elsewhere")
	if err := os.Symlink(target, filepath.Join(dir, ".key.seed.tmp")); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ { // a second write replaces the first
		if err := Write(path, []byte("SECRET")); err != nil {
			t.Fatal(err)
		}
	}
	if b, _ := os.ReadFile(planted); len(b) != 0 {
		t.Fatalf("the planted temp file got %q", b)
	}
	if _, err := os.Stat(target); !os.IsNotExist(err) {
		t.Fatalf("the symlink's target was written: %v", err)
	}
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, want a regular 0600 file", fi.Mode())
	}
	if b, _ := os.ReadFile(path); string(b) != "SECRET" {
		t.Fatalf("content %q", b)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 3 { // key.seed, the planted file, the symlink: no temp file left over
		var names []string
		for _, e := range ents {
			names = append(names, e.Name())
		}
		t.Fatalf("files left: %v", names)
	}
}

// TestWriteSyncsItsDirectory: a crash after Write returned must not lose the file, so
// the rename is followed by a sync of the directory (seen with strace: the secret
// files written here are nexd's trust file with the embedded server's operator seeds,
// the native nexlet's xkey seed, drain outcomes). Before, only the file was synced.
func TestWriteSyncsItsDirectory(t *testing.T) {
	if p := os.Getenv("PRIVFILE_WRITE"); p != "" { // the child under strace
		if err := Write(p, []byte("SECRET")); err != nil {
			t.Fatal(err)
		}
		return
	}
	path := filepath.Join(t.TempDir(), "key.seed")
	cmd := exec.Command(os.Args[0], "-test.run=^TestWriteSyncsItsDirectory$")
	cmd.Env = append(os.Environ(), "PRIVFILE_WRITE="+path)
	trace := testkit.Syscalls(t, cmd, "fsync,rename,renameat,renameat2")
	if !testkit.SyncedAfterRename(trace, path) {
		t.Fatalf("no sync of %s after the rename onto %s:\n%s", filepath.Dir(path), path, strings.Join(trace, "\n"))
	}
}
