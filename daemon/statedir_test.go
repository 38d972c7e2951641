package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
)

func TestPrivateStateDirTightensALooseDir(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := privateStateDir(dir, slog.New(slog.DiscardHandler)); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("state dir %v %v, want mode 0700", fi, err)
	}
}

// TestAttackDirOfAnotherUser: a local user creates, before nexd starts, the directory
// nexd is to use as its state or runtime directory: a state_dir not made yet under a
// directory anyone may write to, or the runtime directory nexd picks without
// runtime_dir and state_dir, /tmp/nexd-<node id>, which a configured node_seed makes
// known in advance. Owning it, the user may swap anything in it: plant the secrets of
// other tenants' workloads or a symlink where nexd writes its log, or replace a nexlet
// binary nexd fetched before nexd runs it as root. Before, nexd took it (and made the
// state dir 0700, still the user's). Now both are refused, naming the owner, as is a
// directory anyone may write to or a symlink another user owns.
func TestAttackDirOfAnotherUser(t *testing.T) {
	mallory, pub, asMallory := malloryInPublicDir(t)
	state, runtime := filepath.Join(pub, "state"), filepath.Join(pub, "nexd-0123456789ab")
	asMallory("/bin/mkdir", "-m", "0777", state, runtime)
	log := slog.New(slog.DiscardHandler)
	if err := privateStateDir(state, log); err == nil || !strings.Contains(err.Error(), "owned by uid "+strconv.Itoa(int(mallory.UID))) {
		t.Errorf("state_dir made by another user: %v, want refused naming its owner", err)
	}
	if err := ownDir("runtime_dir", runtime, 0o711); err == nil || !strings.Contains(err.Error(), "owned by uid "+strconv.Itoa(int(mallory.UID))) {
		t.Errorf("runtime_dir made by another user: %v, want refused naming its owner", err)
	}
	// Root's own, but anyone may write in it; and root's directory behind another's symlink.
	open := filepath.Join(t.TempDir(), "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := ownDir("runtime_dir", open, 0o711); err == nil || !strings.Contains(err.Error(), "writable by every user") {
		t.Errorf("world-writable runtime_dir: %v, want refused", err)
	}
	mine := testkit.PublicDir(t)
	link := filepath.Join(pub, "link")
	asMallory("/bin/ln", "-s", mine, link)
	if err := ownDir("runtime_dir", link, 0o711); err == nil || !strings.Contains(err.Error(), "symlink owned by uid "+strconv.Itoa(int(mallory.UID))) {
		t.Errorf("runtime_dir through another user's symlink: %v, want refused", err)
	}
	// nexd's own are taken, made or not.
	if err := ownDir("runtime_dir", filepath.Join(t.TempDir(), "new"), 0o711); err != nil {
		t.Errorf("a new runtime_dir: %v", err)
	}
	if err := privateStateDir(mine, log); err != nil {
		t.Errorf("nexd's own state_dir: %v", err)
	}
}

// TestAttackDirUnderAnotherUsersDir: the directory nexd makes is its own, but a
// directory on the way to it is not: another user's directory (she may rename nexd's
// away at any time, while nexd runs too, and put her own or a symlink in its place), a
// symlink of hers midway (she may point it elsewhere), or a directory everyone may
// write in without the sticky bit. Before, ownDir looked at the last name only and took
// all three; /tmp itself (sticky) stays fine.
func TestAttackDirUnderAnotherUsersDir(t *testing.T) {
	mallory, pub, asMallory := malloryInPublicDir(t)
	uid := strconv.Itoa(int(mallory.UID))
	hers := filepath.Join(pub, "hers")
	asMallory("/bin/mkdir", "-m", "0755", hers)
	if err := privateStateDir(filepath.Join(hers, "state"), slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), hers+" is owned by uid "+uid) {
		t.Errorf("state_dir in another user's directory: %v, want refused naming that directory and its owner", err)
	}
	if _, err := os.Lstat(filepath.Join(hers, "state")); err == nil {
		t.Errorf("state_dir made in another user's directory before it was refused")
	}
	mine := testkit.PublicDir(t)
	link := filepath.Join(pub, "midlink")
	asMallory("/bin/ln", "-s", mine, link)
	if err := ownDir("runtime_dir", filepath.Join(link, "run"), 0o711); err == nil || !strings.Contains(err.Error(), "symlink owned by uid "+uid) {
		t.Errorf("runtime_dir reached through another user's symlink midway: %v, want refused", err)
	}
	open := filepath.Join(mine, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := ownDir("runtime_dir", filepath.Join(open, "run"), 0o711); err == nil || !strings.Contains(err.Error(), "writable by every user") {
		t.Errorf("runtime_dir in a directory everyone may write in: %v, want refused", err)
	}
	// A root symlink midway to a directory of nexd's, and a sticky public parent, are fine.
	if err := os.Symlink(mine, filepath.Join(pub, "rootlink")); err != nil {
		t.Fatal(err)
	}
	if err := ownDir("runtime_dir", filepath.Join(pub, "rootlink", "run"), 0o711); err != nil {
		t.Errorf("runtime_dir through root's symlink: %v", err)
	}
	if err := ownDir("runtime_dir", filepath.Join(pub, "nexd-0123456789ab"), 0o711); err != nil {
		t.Errorf("runtime_dir in a sticky public directory: %v", err)
	}
}

// malloryInPublicDir makes a real user and a sticky directory everyone may write in,
// and returns a runner of commands as that user.
func malloryInPublicDir(t *testing.T) (*testkit.User, string, func(args ...string)) {
	t.Helper()
	mallory := testkit.NewUser(t)
	pub := testkit.PublicDir(t)
	if err := os.Chmod(pub, 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	asMallory := func(args ...string) {
		t.Helper()
		if out, err := mallory.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v as %s: %v: %s", args, mallory.Name, err, out)
		}
	}
	return mallory, pub, asMallory
}
