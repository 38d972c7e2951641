package testkit

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// User is a real unprivileged system account created for one test with useradd and
// deleted with userdel when the test ends. Permission tests run processes as it to
// prove what another uid can and cannot do.
type User struct {
	Name  string
	UID   uint32
	GID   uint32   // its own primary group, named like the user
	Extra []uint32 // supplementary groups given to NewUser
}

// Group is a real group created for one test with groupadd.
type Group struct {
	Name string
	GID  uint32
}

// RequireUsers skips t unless the process may create users: root, with the shadow
// tools installed.
func RequireUsers(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create an unprivileged test user with useradd")
	}
	for _, tool := range []string{"useradd", "userdel", "groupadd", "groupdel"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed (Debian: apt-get install passwd): cannot create a test user", tool)
		}
	}
}

// NewGroup creates a group that exists until t ends. It skips t where users cannot
// be created (see RequireUsers).
func NewGroup(t testing.TB) *Group {
	t.Helper()
	RequireUsers(t)
	name := "nexd-tg-" + randHex(t)
	shadowTool(t, "groupadd", "-r", name)
	t.Cleanup(func() { shadowToolQuiet("groupdel", name) })
	g, err := user.LookupGroup(name)
	if err != nil {
		t.Fatal(err)
	}
	return &Group{Name: name, GID: parseID(t, g.Gid)}
}

// NewUser creates a system user with no home and no login shell, in its own primary
// group and in groups as supplementary groups; it exists until t ends. It skips t
// where users cannot be created (see RequireUsers).
func NewUser(t testing.TB, groups ...*Group) *User {
	t.Helper()
	RequireUsers(t)
	name := "nexd-t-" + randHex(t)
	args := []string{"-M", "-r", "-U", "-s", "/usr/sbin/nologin"}
	var extra []uint32
	if len(groups) > 0 {
		names := make([]string, len(groups))
		for i, g := range groups {
			names[i] = g.Name
			extra = append(extra, g.GID)
		}
		args = append(args, "-G", strings.Join(names, ","))
	}
	shadowTool(t, "useradd", append(args, name)...)
	// userdel -r is not wanted (no home); the user group goes with the user.
	t.Cleanup(func() { shadowToolQuiet("userdel", name) })
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatal(err)
	}
	return &User{Name: name, UID: parseID(t, u.Uid), GID: parseID(t, u.Gid), Extra: extra}
}

// Credential returns the credential to run a process as u: its uid, its primary
// group and, as supplementary groups, u.Extra when groups is empty, else groups.
func (u *User) Credential(groups ...uint32) *syscall.Credential {
	if len(groups) == 0 {
		groups = u.Extra
	}
	return &syscall.Credential{Uid: u.UID, Gid: u.GID, Groups: append([]uint32{}, groups...)}
}

// Command returns a command that runs as u with an environment of only PATH and
// HOME=/ (add to cmd.Env as needed). The binary must be reachable by u: see
// PublicDir.
func (u *User) Command(name string, args ...string) *exec.Cmd {
	cmd := exec.Command(name, args...)
	cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/"}
	cmd.Dir = "/"
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: u.Credential(), Pdeathsig: syscall.SIGKILL}
	return cmd
}

// Run runs name as u (Command) and fails t, with what it printed, unless it succeeds.
func (u *User) Run(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := u.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s as %s: %v: %s", name, strings.Join(args, " "), u.Name, err, out)
	}
}

// shadowTool runs useradd & co. one at a time across all test processes on the
// machine: they lock /etc/passwd and fail ("cannot lock /etc/passwd; try again
// later") rather than wait when test binaries run in parallel.
func shadowTool(t testing.TB, name string, args ...string) {
	t.Helper()
	if out, err := lockedShadowTool(name, args...); err != nil {
		t.Fatalf("%s %s: %v: %s", name, strings.Join(args, " "), err, out)
	}
}

func shadowToolQuiet(name string, args ...string) {
	_, _ = lockedShadowTool(name, args...)
}

func lockedShadowTool(name string, args ...string) ([]byte, error) {
	f, err := os.OpenFile(filepath.Join(os.TempDir(), "nexd-testkit-users.lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return nil, err
	}
	defer syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
	return exec.Command(name, args...).CombinedOutput()
}

func randHex(t testing.TB) string {
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

func parseID(t testing.TB, s string) uint32 {
	t.Helper()
	n, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		t.Fatalf("id %q: %v", s, err)
	}
	return uint32(n)
}
