package e2e

import (
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// TestNexletRestartWhileStateUnreadable: the native nexlet is killed (-9) while the
// node's external NATS server has JetStream off, so the node cannot read its state when
// the nexlet's successor registers; one of its two services ends meanwhile (its
// restart policy restarts it), the other runs on. Once the server is back on its store,
// each must be the node's again: the ended one restarted once (its policy), the live
// one adopted (listed, and stopped by nexctl). Before, the registration went through
// with nothing replayed: the successor took both for workloads the node no longer
// has, removed the ended one's records (never restarted: lost) and left the live one
// running unlisted.
func TestNexletRestartWhileStateUnreadable(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	var storeDir string
	s := testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { storeDir = o.StoreDir }})
	n := startNode(t, nodeOpts{external: s.ClientURL(), extra: []string{"--state", "kv"}})
	n.waitReady(t)
	ended := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	live := startLoop(t, n, "service", `{"policy": "always", "max": 3}`, 3)
	testkit.EventuallyWithin(t, 60*time.Second, "both services run", func() bool {
		return ended.runs() == 1 && len(ended.mains()) == 1 && live.runs() == 1 && len(live.mains()) == 1
	})

	if err := s.DisableJetStream(); err != nil {
		t.Fatal(err)
	}
	unread := func() int { return strings.Count(n.out.String(), "failed to read node state for a registering nexlet") }
	killNexlet(t, n, func() {
		ended.release(t, 1, false) // its run ends while no nexlet watches: nexd reaps it
		testkit.EventuallyWithin(t, 30*time.Second, "the released run ends", func() bool { return len(ended.mains()) == 0 })
	})
	testkit.EventuallyWithin(t, 60*time.Second, "the successor's registration finds node state unreadable", func() bool { return unread() > 0 })

	// JetStream back: the same store, read again by a server restarted on it (a
	// JetStream enabled again in the same process would not reload the bucket).
	port := s.Addr().(*net.TCPAddr).Port
	s.Shutdown()
	s.WaitForShutdown()
	testnats.Start(t, testnats.Options{Configure: func(o *server.Options) { o.StoreDir, o.Port = storeDir, port }})

	deadline := time.Now().Add(60 * time.Second)
	listed := false
	for time.Now().Before(deadline) && !(ended.runs() >= 2 && listed) {
		time.Sleep(250 * time.Millisecond)
		_, listed = live.listed(t, n)
	}
	_, endedListed := ended.listed(t, n)
	t.Logf("after the server came back: the ended service ran %d time(s) (listed %v), the live one listed %v with processes %v; %d unreadable read(s) logged",
		ended.runs(), endedListed, listed, live.mains(), unread())
	if r := ended.runs(); r != 2 {
		t.Errorf("the service whose run ended while its nexlet was dead ran %d time(s), want 2 (its restart by policy, once): lost", r)
	}
	if !listed {
		t.Fatalf("the live service is not listed: the node lost it while it runs on (processes %v)", live.mains())
	}
	out, errOut, code := n.ctl(t, "workload", "stop", live.id)
	if code != 0 || !strings.Contains(out, "successfully stopped") {
		t.Fatalf("stop of the live service: exit %d: %s%s", code, out, errOut)
	}
	testkit.EventuallyWithin(t, 30*time.Second, "the stopped service's process gone", func() bool { return len(live.mains()) == 0 })
	if r := live.runs(); r != 1 {
		t.Errorf("the live service ran %d times, want 1 (adopted, never started again)", r)
	}
}
