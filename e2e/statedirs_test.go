package e2e

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
)

// TestAttackStateDirsPrepared: a local user outside group nex (mallory, a real uid)
// prepares, before nexd starts, the directory nexd is to keep its state or runtime
// files in, under a public (sticky) directory: her own directory as the state_dir or
// the runtime_dir, her symlink as the state_dir (to a directory of root's, which she
// may point elsewhere later), or the temp runtime directory, <TMPDIR>/nexd-<node id>,
// that a configured node seed names in advance. nexd refuses to start, naming the path
// and her uid, and leaves nothing in what she made. A state_dir under a missing
// directory is refused naming it, and nothing is made.
func TestAttackStateDirsPrepared(t *testing.T) {
	mallory, pub := socketAttacker(t)
	uid := strconv.Itoa(int(mallory.UID))
	if err := os.Chmod(pub, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	kp, err := nkeys.CreateServer()
	if err != nil {
		t.Fatal(err)
	}
	seed, err := kp.Seed()
	if err != nil {
		t.Fatal(err)
	}
	id, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	hersState, hersRun, hersTemp := filepath.Join(pub, "state"), filepath.Join(pub, "run"), filepath.Join(pub, "nexd-"+id[:12])
	mallory.Run(t, "/bin/mkdir", "-m", "0777", hersState, hersRun, hersTemp)
	link := filepath.Join(pub, "statelink")
	mallory.Run(t, "/bin/ln", "-s", testkit.PublicDir(t), link)
	missing := filepath.Join(t.TempDir(), "mnt")

	env := []string{"NEXD_EMBEDDED_NATS_PORT=-1", "NEX_NODE_SEED=" + string(seed), "TMPDIR=" + pub}
	common := []string{"--control-socket", filepath.Join(t.TempDir(), "nexd.sock"), "--node-name", "e2e", "--disable-native-start"}
	for _, c := range []struct {
		name    string
		args    []string
		refusal string
		hers    string // what must stay empty
	}{
		{"her state_dir", []string{"--state-dir", hersState}, hersState + " is owned by uid " + uid, hersState},
		{"her symlink as state_dir", []string{"--state-dir", link}, link + " is a symlink owned by uid " + uid, ""},
		{"her runtime_dir", []string{"--state-dir", t.TempDir(), "--runtime-dir", hersRun}, hersRun + " is owned by uid " + uid, hersRun},
		{"her temp runtime dir", nil, hersTemp + " is owned by uid " + uid, hersTemp},
		{"state_dir under a missing directory", []string{"--state-dir", filepath.Join(missing, "nex")}, "directory " + missing + " does not exist", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			p := startNexd(t, nexdOpts{args: append(append([]string{}, common...), c.args...), env: env})
			if code := p.wait(t, time.Minute); code == 0 {
				t.Fatalf("nexd started:\n%s", p.out.String())
			}
			if !strings.Contains(p.out.String(), c.refusal) {
				t.Errorf("nexd's error does not say %q:\n%s", c.refusal, p.out.String())
			}
			if c.hers != "" {
				if names, err := os.ReadDir(c.hers); err != nil || len(names) > 0 {
					t.Errorf("nexd left %v in %s (%v)", names, c.hers, err)
				}
			}
		})
	}
	if _, err := os.Lstat(missing); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("nexd made %s (%v)", missing, err)
	}
}
