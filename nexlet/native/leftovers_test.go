package native

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"path/filepath"
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
	lo, hi, err := ParseUIDRange("2000300-2000300")
	if err != nil {
		t.Fatal(err)
	}
	if newHostIDs().uses(lo) {
		t.Skip("uid 2000300 is in use on this host")
	}
	bin := bins.Path(t, "./testdata/leftovers")
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	tag, secret := hex.EncodeToString(b[:4]), "secret-"+hex.EncodeToString(b[4:])
	t.Cleanup(func() {
		for _, d := range []string{"/dev/shm", "/tmp", "/var/tmp"} {
			_ = os.Remove(filepath.Join(d, "nexd-left-"+tag))
		}
	})
	fn := newFakeNode(t)
	leases := t.TempDir()
	fn.startNexlet(Config{Users: UserPolicy{UIDMin: lo, UIDMax: hi, LeaseDir: leases}})

	fn.mustStart("planter", startReq(protocol.LifecycleJob, "planter", map[string]any{"uri": script(t, "exec "+bin+" plant "+tag+" "+secret)}, fn.creds()))
	fn.waitLog("planter", "stdout", "planted")
	testkit.Eventually(t, "the planter's uid released", func() bool {
		_, err := os.Stat(filepath.Join(leases, "2000300"))
		return fn.hasStoppedEvent("planter") && os.IsNotExist(err)
	})

	// The next workload gets the same uid (the range holds one); any tenant's could.
	fn.mustStart("thief", startReq(protocol.LifecycleJob, "thief", map[string]any{"uri": script(t, "exec "+bin+" steal "+tag)}, fn.creds()))
	fn.waitLog("thief", "stdout", "done")
	fn.waitLog("thief", "stdout", "uid 2000300")
	for _, l := range fn.logLines("thief", "stdout") {
		if strings.HasPrefix(l, "stolen") {
			t.Errorf("the next workload of the uid read the last one's leftover: %s", l)
		}
	}
}
