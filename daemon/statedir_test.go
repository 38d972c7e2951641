package daemon

import (
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

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
	if _, err := ownDir("runtime_dir", runtime, 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), "owned by uid "+strconv.Itoa(int(mallory.UID))) {
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
	if _, err := ownDir("runtime_dir", open, 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), "writable by every user") {
		t.Errorf("world-writable runtime_dir: %v, want refused", err)
	}
	mine := testkit.PublicDir(t)
	link := filepath.Join(pub, "link")
	asMallory("/bin/ln", "-s", mine, link)
	if _, err := ownDir("runtime_dir", link, 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), "symlink owned by uid "+strconv.Itoa(int(mallory.UID))) {
		t.Errorf("runtime_dir through another user's symlink: %v, want refused", err)
	}
	// nexd's own are taken, made or not.
	if _, err := ownDir("runtime_dir", filepath.Join(t.TempDir(), "new"), 0o711, stateDirGroups()); err != nil {
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
	if _, err := ownDir("runtime_dir", filepath.Join(link, "run"), 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), "symlink owned by uid "+uid) {
		t.Errorf("runtime_dir reached through another user's symlink midway: %v, want refused", err)
	}
	open := filepath.Join(mine, "open")
	if err := os.Mkdir(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(open, "run"), 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), "writable by every user") {
		t.Errorf("runtime_dir in a directory everyone may write in: %v, want refused", err)
	}
	// A root symlink midway to a directory of nexd's, and a sticky public parent, are fine.
	if err := os.Symlink(mine, filepath.Join(pub, "rootlink")); err != nil {
		t.Fatal(err)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(pub, "rootlink", "run"), 0o711, stateDirGroups()); err != nil {
		t.Errorf("runtime_dir through root's symlink: %v", err)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(pub, "nexd-0123456789ab"), 0o711, stateDirGroups()); err != nil {
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
		mallory.Run(t, args[0], args[1:]...)
	}
	return mallory, pub, asMallory
}

// TestGroupWritableDirs: a directory of root's that a group may write in is, for that
// group's members, as good as their own: they may rename nexd's files away and put
// theirs in place. Before, only a directory every user may write in was refused; a
// group's (root:staff 0775) passed. Now it is refused, as the way to nexd's directory
// (unless sticky) or the directory itself, naming it, its mode and group and the fix,
// except for a group whose members gain nothing by it: root's, the control group for
// the control socket's directory (its members are the socket's admins), and nexd's own
// primary group when nexd is not root (`make run` in a checkout made under umask 002),
// played by a real user.
func TestGroupWritableDirs(t *testing.T) {
	if os.Getenv("NEXD_TEST_OWNDIR_OK") != "" {
		ownDirAsUser(t)
		return
	}
	staff := testkit.NewGroup(t)
	mallory := testkit.NewUser(t, staff)
	base := testkit.PublicDir(t)
	dirOf := func(name string, gid int, mode os.FileMode) string {
		t.Helper()
		d := filepath.Join(base, name)
		if err := os.Mkdir(d, mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, 0, gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(d, mode); err != nil {
			t.Fatal(err)
		}
		return d
	}
	shared := dirOf("shared", int(staff.GID), 0o775)
	refusal := fmt.Sprintf("%s (mode 0775, group %s (gid %d)) is writable by its group: the group's members could replace what nexd keeps there; fix: chmod g-w %s, or chgrp root %s",
		shared, staff.Name, staff.GID, shared, shared)
	if err := privateStateDir(shared, slog.New(slog.DiscardHandler)); err == nil || !strings.Contains(err.Error(), "state_dir "+shared+": "+refusal) {
		t.Errorf("group-writable state_dir: %v, want refused with %q", err, refusal)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(shared, "run"), 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), refusal) {
		t.Errorf("runtime_dir in a group-writable directory: %v, want refused with %q", err, refusal)
	}
	if _, err := os.Lstat(filepath.Join(shared, "run")); err == nil {
		t.Errorf("runtime_dir made in a group-writable directory before it was refused")
	}
	// The attack the check stops: mallory, in group staff, renames root's directory away.
	if err := os.Mkdir(filepath.Join(shared, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := mallory.Command("/bin/mv", filepath.Join(shared, "state"), filepath.Join(shared, "hers")).CombinedOutput(); err != nil {
		t.Fatalf("the group's member could not rename in it (the test's premise): %v: %s", err, out)
	}
	// The control group's members are the control socket's admins: its directory may be theirs.
	if _, err := ownDir("control_socket", shared, 0o755, dirGroups{controlGID: staff.GID, hasControl: true}); err != nil {
		t.Errorf("control socket directory writable by the control group: %v", err)
	}
	if _, err := ownDir("control_socket", shared, 0o755, dirGroups{controlGID: staff.GID + 1, hasControl: true}); err == nil {
		t.Errorf("control socket directory writable by another group than the control group: taken")
	}
	// Sticky on the way: members may rename only their own entries there.
	if err := os.Chmod(shared, 0o775|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(shared, "run"), 0o711, stateDirGroups()); err != nil {
		t.Errorf("runtime_dir in a sticky group-writable directory: %v", err)
	}
	if _, err := ownDir("runtime_dir", shared, 0o711, stateDirGroups()); err == nil {
		t.Errorf("a sticky group-writable runtime_dir itself: taken")
	}
	// Root's group.
	if _, err := ownDir("state_dir", dirOf("rootgroup", 0, 0o775), 0o700, stateDirGroups()); err != nil {
		t.Errorf("state_dir writable by root's group: %v", err)
	}
	// nexd not root: its own group, as for make run under umask 002, and not another of its groups.
	bin := testkit.CopyFile(t, os.Args[0], filepath.Join(base, "daemon.test"), 0o755)
	mine := dirOf("mine", int(mallory.GID), 0o775)
	if err := os.Chown(mine, int(mallory.UID), int(mallory.GID)); err != nil {
		t.Fatal(err)
	}
	noSticky := dirOf("shared2", int(staff.GID), 0o775)
	cmd := mallory.Command(bin, "-test.run=^TestGroupWritableDirs$", "-test.count=1", "-test.v")
	cmd.Env = append(cmd.Env, "NEXD_TEST_OWNDIR_OK="+filepath.Join(mine, "state"), "NEXD_TEST_OWNDIR_REFUSED="+filepath.Join(noSticky, "state"))
	if out, err := cmd.CombinedOutput(); err != nil || !strings.Contains(string(out), "--- PASS: TestGroupWritableDirs") {
		t.Errorf("as %s: %v\n%s", mallory.Name, err, out)
	}
}

// ownDirAsUser is TestGroupWritableDirs's part run as a user: a state dir in a directory
// of its own group may be writable by is taken; one in a directory of another of its
// groups is not.
func ownDirAsUser(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	if err := privateStateDir(os.Getenv("NEXD_TEST_OWNDIR_OK"), log); err != nil {
		t.Errorf("nexd as uid %d: state_dir in a directory its own group may write in: %v", os.Geteuid(), err)
	}
	refused := os.Getenv("NEXD_TEST_OWNDIR_REFUSED")
	if err := privateStateDir(refused, log); err == nil || !strings.Contains(err.Error(), "is writable by its group") {
		t.Errorf("nexd as uid %d: state_dir in a directory another of its groups may write in: %v, want refused", os.Geteuid(), err)
	}
}

// TestAttackACLWritableDirs: a POSIX ACL entry gives a named user or group write
// permission that the mode shows only as the group class's write bit (the ACL's mask)
// under the directory's group, root's here: such a directory was taken, and the named
// user renamed nexd's directory in it away. Refused now, the error naming the entry.
func TestAttackACLWritableDirs(t *testing.T) {
	staff := testkit.NewGroup(t)
	mallory := testkit.NewUser(t)
	base := testkit.PublicDir(t)
	// setACL gives d (root:root) the access ACL user::rwx, [named], group::r-x,
	// mask::<mask>, other::r-x, as setfacl would (entries sorted by tag, then id).
	setACL := func(d string, tag uint16, id uint32, mask uint16) {
		t.Helper()
		b := binary.LittleEndian.AppendUint32(nil, 2)
		acl := []aclEntry{{0x01, 7, ^uint32(0)}, {tag, 7, id}, {aclGroupObj, 5, ^uint32(0)}, {0x10, mask, ^uint32(0)}, {0x20, 5, ^uint32(0)}}
		slices.SortFunc(acl, func(a, b aclEntry) int { return cmp.Compare(a.tag, b.tag) })
		for _, e := range acl {
			b = binary.LittleEndian.AppendUint16(b, e.tag)
			b = binary.LittleEndian.AppendUint16(b, e.perm)
			b = binary.LittleEndian.AppendUint32(b, e.id)
		}
		if err := unix.Setxattr(d, "system.posix_acl_access", b, 0); err != nil {
			if errors.Is(err, unix.EOPNOTSUPP) {
				t.Skipf("no POSIX ACLs on %s: %v", d, err)
			}
			t.Fatalf("setting the ACL of %s: %v", d, err)
		}
	}
	mk := func(name string) string {
		t.Helper()
		d := filepath.Join(base, name)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	log := slog.New(slog.DiscardHandler)

	userDir := mk("user")
	setACL(userDir, aclUser, mallory.UID, 7)
	// The attack: mallory renames root's directory in it away (the test's premise).
	if err := os.Mkdir(filepath.Join(userDir, "state"), 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := mallory.Command("/bin/mv", filepath.Join(userDir, "state"), filepath.Join(userDir, "hers")).CombinedOutput(); err != nil {
		t.Fatalf("the ACL's user could not rename in it (the test's premise): %v: %s", err, out)
	}
	want := fmt.Sprintf("has an ACL entry that lets uid %d write in it", mallory.UID)
	if err := privateStateDir(userDir, log); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("state_dir a named user may write in: %v, want refused with %q", err, want)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(userDir, "run"), 0o711, stateDirGroups()); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("runtime_dir in a directory a named user may write in: %v, want refused with %q", err, want)
	}

	groupDir := mk("group")
	setACL(groupDir, aclGroup, staff.GID, 7)
	want = fmt.Sprintf("has an ACL entry that lets group %s (gid %d) write in it", staff.Name, staff.GID)
	if _, err := ownDir("state_dir", groupDir, 0o700, stateDirGroups()); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("state_dir a named group may write in: %v, want refused with %q", err, want)
	}
	// The control group's members are the control socket's admins.
	if _, err := ownDir("control_socket", groupDir, 0o755, dirGroups{controlGID: staff.GID, hasControl: true}); err != nil {
		t.Errorf("control socket directory the control group may write in by its ACL: %v", err)
	}

	// A mask without write leaves the named entry read-only: taken.
	masked := mk("masked")
	setACL(masked, aclUser, mallory.UID, 5)
	if _, err := ownDir("state_dir", masked, 0o700, stateDirGroups()); err != nil {
		t.Errorf("state_dir whose ACL mask takes write away: %v", err)
	}
	// On the way with the sticky bit: members may rename only their own entries there.
	sticky := mk("sticky")
	setACL(sticky, aclUser, mallory.UID, 7)
	if err := os.Chmod(sticky, 0o775|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(sticky, "run"), 0o711, stateDirGroups()); err != nil {
		t.Errorf("runtime_dir in a sticky directory a named user may write in: %v", err)
	}
}

// TestOwnDirMakesItsOwnNameOnly: of a state, runtime or control socket directory that
// is missing, nexd makes the last name only, as systemd's StateDirectory= does. A
// missing directory above it (a typo, a file system not mounted yet) is refused, naming
// it, and nothing is made: before, nexd made the whole chain (mkdir -p) and started
// afresh there, with a new identity and none of its state.
func TestOwnDirMakesItsOwnNameOnly(t *testing.T) {
	base := t.TempDir()
	missing := filepath.Join(base, "mnt")
	log := slog.New(slog.DiscardHandler)
	want := "directory " + missing + " does not exist"
	if err := privateStateDir(filepath.Join(missing, "nex"), log); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("state_dir under a missing directory: %v, want refused saying %q", err, want)
	}
	if _, err := ownDir("runtime_dir", filepath.Join(missing, "nex", "run"), 0o711, stateDirGroups()); err == nil ||
		!strings.Contains(err.Error(), "directory "+filepath.Join(missing, "nex")+" does not exist") {
		t.Errorf("runtime_dir under missing directories: %v, want refused naming its parent", err)
	}
	if _, err := os.Lstat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s made (%v)", missing, err)
	}
	own := filepath.Join(base, "nex")
	if err := privateStateDir(own, log); err != nil {
		t.Fatalf("state_dir whose parent exists: %v", err)
	}
	made, err := ownDir("runtime_dir", filepath.Join(own, "run"), 0o711, stateDirGroups())
	if err != nil || !made {
		t.Fatalf("runtime_dir in the state dir: made %v, %v", made, err)
	}
	if made, err := ownDir("runtime_dir", filepath.Join(own, "run"), 0o711, stateDirGroups()); err != nil || made {
		t.Errorf("runtime_dir there already: made %v, %v", made, err)
	}
}
