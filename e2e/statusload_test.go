package e2e

import (
	"context"
	"encoding/json"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// statusBurstScript asks for GET /v1/status from threads threads at once, each
// times times, over the control socket, and prints how many were answered 200, how
// many not, and the last 200 body.
const statusBurstScript = `
import socket, sys, threading
path, threads, times = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
lock = threading.Lock()
res = {"ok": 0, "bad": 0, "body": b""}
def worker():
    for _ in range(times):
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
            s.sendall(b"GET /v1/status HTTP/1.0\r\nHost: nexd\r\n\r\n")
            data = b""
            while True:
                c = s.recv(65536)
                if not c:
                    break
                data += c
            s.close()
        except OSError as e:
            data = str(e).encode()
        head, _, body = data.partition(b"\r\n\r\n")
        with lock:
            if head.split(b" ")[1:2] == [b"200"]:
                res["ok"] += 1
                res["body"] = body
            else:
                res["bad"] += 1
                sys.stderr.write("refused: %r\n" % head[:80])
ts = [threading.Thread(target=worker) for _ in range(threads)]
for t in ts: t.start()
for t in ts: t.join()
print("ok", res["ok"])
print("bad", res["bad"])
print("body", res["body"].decode())
`

// burstResult is what statusBurstScript printed.
type burstResult struct {
	ok, bad int
	body    string
}

func statusBurst(t *testing.T, u *testkit.User, socket string, threads, times int) burstResult {
	t.Helper()
	py := "/usr/bin/python3" // the system's: every user can run it
	cmd := u.Command(py, "-c", statusBurstScript, socket, strconv.Itoa(threads), strconv.Itoa(times))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("status burst as %s: %v\n%s", u.Name, err, out)
	}
	var r burstResult
	for _, l := range strings.Split(string(out), "\n") {
		k, v, _ := strings.Cut(l, " ")
		switch k {
		case "ok":
			r.ok, _ = strconv.Atoi(v)
		case "bad":
			r.bad, _ = strconv.Atoi(v)
		case "body":
			r.body = v
		}
	}
	return r
}

func needPython(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("needs /usr/bin/python3 to play the local user's client")
	}
}

// listingCounter counts the node's requests to its nexlets for their workload lists
// (on the shared subject and on each nexlet's own), as a subscriber on the node's
// server (one without authentication) sees them.
func listingCounter(t *testing.T, url, nodeID string) *atomic.Int64 {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatalf("connect to watch the node's listings: %v", err)
	}
	t.Cleanup(nc.Close)
	var count atomic.Int64
	sub, err := nc.Subscribe(protocol.AgentPrefix(nodeID)+".>", func(m *nats.Msg) {
		if strings.HasSuffix(m.Subject, ".QUERYWORKLOADS") {
			count.Add(1)
		}
	})
	if err != nil || nc.Flush() != nil {
		t.Fatalf("subscribe to the node's nexlet subjects: %v", err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return &count
}

// TestPublicStatusSharesListings: a local user outside group nex (the default
// control_allow_others = status lets any local user ask) sends 160 status requests, 8
// at a time. Before, each asked every nexlet for its
// full workload list (160 listings: a cheap way to load the node); now concurrent
// calls share one listing and a kept count serves the rest while nothing changed, so
// the node lists at most once per statusMaxAge (2 s) of the burst, plus one.
func TestPublicStatusSharesListings(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	testkit.RequireUsers(t)
	needPython(t)
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	n := startNode(t, nodeOpts{external: s.ClientURL(), publicSocket: true})
	st := n.waitReady(t)
	n.runWorkload(t, "--name", "busy", "--", "/bin/sleep", "600")
	count := listingCounter(t, s.ClientURL(), st.NodeID)
	// The first status after the deploy lists (the count may have changed); then
	// wait for any listing under way (the status line's) to end.
	n.waitReady(t)
	time.Sleep(time.Second)

	mallory := testkit.NewUser(t)
	// 8 at a time: 16 is the per-user bound, which a client's next connection can
	// meet before the server has counted its last one closed.
	const threads, times = 8, 20
	before, start := count.Load(), time.Now()
	r := statusBurst(t, mallory, n.socket, threads, times)
	took := time.Since(start)
	listings := count.Load() - before
	t.Logf("%d status calls (%d refused) in %v: %d workload listings", r.ok+r.bad, r.bad, took.Round(time.Millisecond), listings)
	if r.ok != threads*times {
		t.Fatalf("%d of %d status calls answered", r.ok, threads*times)
	}
	var pub control.Status
	if err := json.Unmarshal([]byte(r.body), &pub); err != nil || pub.Workloads["running"] != 1 {
		t.Fatalf("the public status %q (%v): want 1 running workload", r.body, err)
	}
	if bound := 2 + int64(took/(2*time.Second)); listings > bound {
		t.Errorf("%d public status calls made the node list its nexlets' workloads %d times in %v (at most %d wanted)",
			threads*times, listings, took.Round(time.Millisecond), bound)
	}
	// A deploy is seen at once: the count is asked again after a change.
	before = count.Load()
	n.runWorkload(t, "--name", "busy2", "--", "/bin/sleep", "600")
	if st := n.waitReady(t); st.Workloads["running"] != 2 {
		t.Errorf("status after a second deploy: %v, want 2 running", st.Workloads)
	}
	if count.Load() == before {
		t.Errorf("no listing counted for the status after a deploy: the counter does not see them")
	}
}

// BenchmarkStatus is one GET /v1/status over the control socket of a real nexd whose
// native nexlet runs 20 workloads: serially, and from 8 clients at once (parallel),
// as many local users would ask. Before the status count was kept and shared, every
// call listed the nexlet's workloads.
func BenchmarkStatus(b *testing.B) {
	if testing.Short() {
		b.Skip("e2e")
	}
	s := testnats.Start(b, testnats.Options{})
	n := startNode(b, nodeOpts{external: s.ClientURL()})
	n.waitReady(b)
	for i := range 20 {
		n.runWorkload(b, "--name", "w"+strconv.Itoa(i), "--", "/bin/sleep", "600")
	}
	if st := n.waitReady(b); st.Workloads["running"] != 20 {
		b.Fatalf("workloads %v, want 20 running", st.Workloads)
	}
	call := func(c *control.Client) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := c.Status(ctx); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("serial", func(b *testing.B) {
		c := control.NewClient(n.socket)
		defer c.Close()
		for b.Loop() {
			call(c)
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.SetParallelism(4) // 8 clients on this 2-core machine
		b.RunParallel(func(pb *testing.PB) {
			c := control.NewClient(n.socket)
			defer c.Close()
			for pb.Next() {
				call(c)
			}
		})
	})
}
