package native

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// TestAttackLeftoversOfAReusedUID: a workload leaves a secret where its end does not
// remove it (System V shared memory and a message queue, /dev/shm, /tmp, /var/tmp) and
// ends; its dynamic uid is released and leased to the next workload, another tenant's.
// Before, that workload read every one of them as their owner. Now the release removes
// what the uid owned there (as systemd's RemoveIPC= does, and /tmp and /var/tmp, which
// the unit's TemporaryFileSystem= shares between its workloads) before the uid is free.
func TestAttackLeftoversOfAReusedUID(t *testing.T) {
	needRoot(t)
	lo := testkit.UIDs(t, 1)
	hi := lo
	uid := strconv.FormatUint(uint64(lo), 10)
	bin := bins.Path(t, "./testdata/leftovers")
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	tag, secret := hex.EncodeToString(b[:4]), "secret-"+hex.EncodeToString(b[4:])
	t.Cleanup(func() {
		for _, d := range []string{"/dev/shm", "/tmp", "/var/tmp", "/run/lock"} {
			_ = os.Remove(filepath.Join(d, "nexd-left-"+tag))
		}
	})
	fn := newFakeNode(t)
	leases := t.TempDir()
	fn.startNexlet(Config{Users: UserPolicy{UIDMin: lo, UIDMax: hi, LeaseDir: leases}})

	fn.mustStart("planter", startReq(protocol.LifecycleJob, "planter", map[string]any{"uri": script(t, "exec "+bin+" plant "+tag+" "+secret)}, fn.creds()))
	fn.waitLog("planter", "stdout", "planted")
	testkit.Eventually(t, "the planter's uid released", func() bool {
		_, err := os.Stat(filepath.Join(leases, uid))
		return fn.hasStoppedEvent("planter") && os.IsNotExist(err)
	})

	// The next workload gets the same uid (the range holds one); any tenant's could.
	fn.mustStart("thief", startReq(protocol.LifecycleJob, "thief", map[string]any{"uri": script(t, "exec "+bin+" steal "+tag)}, fn.creds()))
	fn.waitLog("thief", "stdout", "done")
	fn.waitLog("thief", "stdout", "uid "+uid)
	for _, l := range fn.logLines("thief", "stdout") {
		if strings.HasPrefix(l, "stolen") {
			t.Errorf("the next workload of the uid read the last one's leftover: %s", l)
		}
	}
}

// TestAttackLeftoversOfAStaleLease: a uid whose lease outlived its holder (the lease
// names a workload directory that is gone: a nexlet that died between the two, a
// runtime directory wiped) is leased again once nothing runs as it, without the
// release that removes its leftovers. Before, a file its last workload left in /tmp
// was there for the next one to read; now taking over such a lease removes them first.
func TestAttackLeftoversOfAStaleLease(t *testing.T) {
	needRoot(t)
	us, uid := staleLeaseUsers(t)
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	left := filepath.Join("/tmp", "nexd-stale-"+hex.EncodeToString(b))
	t.Cleanup(func() { _ = os.Remove(left) })
	if err := os.WriteFile(left, []byte("secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(left, int(uid), int(uid)); err != nil {
		t.Fatal(err)
	}
	ids, err := us.leaseFreshN(t.TempDir(), 1)
	if err != nil || len(ids) != 1 || ids[0].uid != uid {
		t.Fatalf("leased %v: %v, want uid %d (its stale lease taken over)", ids, err, uid)
	}
	if _, err := os.Lstat(left); !os.IsNotExist(err) {
		t.Errorf("the stale lease's uid was leased again with its leftover %s still there (%v)", left, err)
	}
}

// BenchmarkRemoveLeftovers is a release batch's leftover check on this host's shared
// directories (/tmp's entries, mostly) for a uid that owns nothing there.
func BenchmarkRemoveLeftovers(b *testing.B) {
	want := map[uint32]bool{3999999999: true}
	b.ReportAllocs()
	for b.Loop() {
		if failed := removeLeftovers("/proc", want); len(failed) > 0 {
			b.Fatal(failed)
		}
	}
}

// staleLeaseUsers is a pool of one test uid whose lease outlived its holder: it names a
// workload directory that is gone.
func staleLeaseUsers(t *testing.T) (*users, uint32) {
	t.Helper()
	uid := testkit.UIDs(t, 1)
	us := testUsers(t, UserPolicy{LeaseDir: t.TempDir(), UIDMin: uid, UIDMax: uid})
	if err := writeLease(us.leasePath(uid), filepath.Join(t.TempDir(), "gone")); err != nil {
		t.Fatal(err)
	}
	return us, uid
}
