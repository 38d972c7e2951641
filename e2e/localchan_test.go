package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// subjects drains sub: the subjects of the messages that came, up to the first
// 200 ms without one.
func subjects(sub *nats.Subscription) []string {
	var subs []string
	for {
		m, err := sub.NextMsg(200 * time.Millisecond)
		if err != nil {
			return subs
		}
		subs = append(subs, m.Subject)
	}
}

// socketFDs lists the socket descriptors of pid with their open flags (fdinfo, octal).
func socketFDs(pid int) map[int]string {
	out := map[int]string{}
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		fd, _ := strconv.Atoi(e.Name())
		if l, _ := os.Readlink(filepath.Join(dir, e.Name())); strings.HasPrefix(l, "socket:") {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/fdinfo/%d", pid, fd))
			for line := range strings.SplitSeq(string(b), "\n") {
				if v, ok := strings.CutPrefix(line, "flags:"); ok {
					out[fd] = strings.TrimSpace(v)
				}
			}
		}
	}
	return out
}

// TestDeployOverLocalChannel: a deploy to the native nexlet nexd spawned goes over the
// socket pair between them, not through the NATS server (no STARTWORKLOAD message
// crosses it); the nexlet holds its end close-on-exec and no workload inherits it;
// after a crash of the nexlet its successor gets a new pair and deploys use it; a nexd
// that adopted the nexlet (live_restore) has no pair with it: the nexlet connects to
// nexd's socket for adopted nexlets and the deploy goes there (before, over NATS).
// The same for the registration: the nexlet nexd spawned registers on the pair (no
// REGISTER crosses the server, first start and after a crash), the adopted one on the
// socket (before, again over NATS).
func TestDeployOverLocalChannel(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	s := testnats.Start(t, testnats.Options{})
	state := t.TempDir()
	opts := func(cg string, live bool) nodeOpts {
		extra := []string{"--state", "kv"}
		if live {
			extra = append(extra, "--live-restore")
		}
		return nodeOpts{external: s.ClientURL(), stateDir: state, cgroup: cg, extra: extra}
	}
	watch := testnats.Connect(t, s)
	regs, _ := watch.SubscribeSync(protocol.AgentPrefix("*") + ".REGISTER.*")
	flush(t, watch)
	registrations := func() []string { return subjects(regs) }
	n := startNode(t, opts("", true))
	st := n.waitReady(t)
	if got := registrations(); len(got) != 0 {
		t.Fatalf("the native nexlet's registration crossed NATS: %v", got)
	}
	nc := testnats.Connect(t, s)
	starts, _ := nc.SubscribeSync(protocol.AgentPrefix(st.NodeID) + ".*.STARTWORKLOAD.*")
	logs, _ := nc.SubscribeSync("$NEX.FEED.system.logs.*.stdout")
	flush(t, nc)

	// The workload prints what its descriptors are, then stays.
	script := filepath.Join(testkit.PublicDir(t), "fds.sh")
	testkit.WriteFile(t, script, "#!/bin/sh\necho \"fds: $(for f in /proc/$$/fd/*; do readlink $f; done | tr '\\n' ' ')\"\nexec sleep 600\n")
	os.Chmod(script, 0o755)
	marker := fmt.Sprintf("nexd-e2e-localchan-%d", time.Now().UnixNano())
	deploy := func(n *node, name string) (id, fds string) {
		t.Helper()
		r := n.runWorkload(t, "--bids", "1", "--name", name, "--", script, marker)
		testkit.EventuallyWithin(t, 30*time.Second, "the workload's descriptors on its log", func() bool {
			m, err := logs.NextMsg(time.Second)
			if err != nil || !strings.Contains(m.Subject, r.ID) {
				return false
			}
			fds = string(m.Data)
			return true
		})
		return r.ID, fds
	}
	overNATS := func() []string { return subjects(starts) }
	checkNexlet := func(pid int, what string) {
		t.Helper()
		socks := socketFDs(pid)
		if len(socks) == 0 {
			t.Fatalf("%s: the nexlet %d has no socket", what, pid)
		}
		for fd, flags := range socks {
			f, _ := strconv.ParseUint(flags, 8, 64)
			if f&uint64(syscall.O_CLOEXEC) == 0 {
				t.Errorf("%s: the nexlet's socket descriptor %d is not close-on-exec (flags %s)", what, fd, flags)
			}
		}
	}

	// deployOnChannel deploys on n and checks that the start did not cross NATS, that
	// the workload holds no socket and that the nexlet's are close-on-exec.
	deployOnChannel := func(n *node, name string, nexlet int, what string) {
		t.Helper()
		id, fds := deploy(n, name)
		if got := overNATS(); len(got) != 0 {
			t.Fatalf("%s: the start crossed NATS: %v", what, got)
		}
		if strings.Contains(fds, "socket:") {
			t.Fatalf("%s: workload %s inherited a socket: %s", what, id, fds)
		}
		checkNexlet(nexlet, what)
	}

	nexlet := nexletPID(n.cmd.Process.Pid)
	if nexlet == 0 {
		t.Fatal("native nexlet not found")
	}
	deployOnChannel(n, "first", nexlet, "first start")

	// A crash: the next nexlet has a new pair.
	if err := syscall.Kill(nexlet, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 60*time.Second, "a new native nexlet", func() bool {
		p := nexletPID(n.cmd.Process.Pid)
		if p != 0 && p != nexlet {
			nexlet = p
			return true
		}
		return false
	})
	testkit.EventuallyWithin(t, 60*time.Second, "the new nexlet registered", func() bool {
		for _, x := range n.waitReady(t).Nexlets {
			if x.Name == "native" && x.Health == protocol.HealthHealthy && x.PID == nexlet {
				return true
			}
		}
		return false
	})
	if got := registrations(); len(got) != 0 {
		t.Fatalf("after a nexlet crash its registration crossed NATS: %v", got)
	}
	// Nor did either nexlet connect with its registration user.
	cz, err := s.Connz(&server.ConnzOptions{State: server.ConnAll})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range cz.Conns {
		if strings.HasSuffix(c.Name, "-register") {
			t.Fatalf("a nexlet connected with its registration user: %q", c.Name)
		}
	}
	deployOnChannel(n, "after-crash", nexlet, "after a nexlet crash")

	// live_restore: the next nexd adopts the nexlet, which connects to its socket.
	n.signal(t, syscall.SIGTERM)
	if code := n.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("exit %d after SIGTERM", code)
	}
	n2 := startNode(t, opts(n.cgroup, false))
	n2.waitReady(t)
	if got := registrations(); len(got) != 0 {
		t.Fatalf("the adopted nexlet registered %v over NATS, want on nexd's socket", got)
	}
	deployOnChannel(n2, "after-adoption", nexlet, "adopted, on nexd's socket")
	if p := nexletPID(n2.cmd.Process.Pid); p != 0 {
		t.Fatalf("the new nexd started a nexlet (%d) instead of adopting %d", p, nexlet)
	}
	n2.signal(t, syscall.SIGTERM)
	n2.wait(t, 120*time.Second)
	if c := countProcs(marker); c != 0 {
		t.Fatalf("%d workload processes survived the stop", c)
	}
}
