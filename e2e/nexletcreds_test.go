package e2e

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"

	"github.com/nexd-project/nexd/control"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/protocol"
)

// native returns the native nexlet's entry in the node's status.
func (n *node) native(t *testing.T) control.Nexlet {
	t.Helper()
	return n.nexlet(t, "native")
}

// nexlet returns the named nexlet's entry in the node's status.
func (n *node) nexlet(t *testing.T, name string) control.Nexlet {
	t.Helper()
	st := mustStatus(t, n.socket, "the "+name+" nexlet's entry")
	for _, x := range st.Nexlets {
		if x.Name == name {
			return x
		}
	}
	t.Fatalf("no %s nexlet in status: %+v", name, st.Nexlets)
	return control.Nexlet{}
}

// TestStolenNexletUser: the native nexlet's user leaks (here: read as the node's admin
// from its registration reply after a crash, as an inbox sniffer could before issue 13;
// NEXD_LOCAL_REGISTER=off sends the reply over NATS, as for a nexlet without a
// socket pair, instead of back on the pair).
// The leaked user works until the nexlet renews its own credentials; a few seconds
// after the renewal, well before the user would expire, it is refused (the embedded
// server's account revokes it), while the nexlet keeps its registration and works.
func TestStolenNexletUser(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	began := time.Now()
	const ttl = 60 * time.Second
	n := startNode(t, nodeOpts{extra: []string{"--nexlet-creds-ttl", ttl.String()}, env: []string{"NEXD_LOCAL_REGISTER=off"}})
	n.waitReady(t)
	n.waitNative(t)
	admin := testkit.WriteFile(t, filepath.Join(t.TempDir(), "admin.creds"), n.mustCtl(t, "creds", "issue", "--admin", "--ttl", "1h"))
	nc, err := nats.Connect(n.natsURL, nats.UserCredentials(admin))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	// A local nexlet keeps its agent id across restarts: its next registration reply
	// goes to this inbox.
	replies, err := nc.SubscribeSync(protocol.InboxPrefix(n.native(t).AgentID) + ".>")
	if err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(n.native(t).PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var stolen protocol.NatsConnectionData
	for stolen.NatsUserJWT == "" {
		m, err := replies.NextMsg(60 * time.Second)
		if err != nil {
			t.Fatalf("no registration reply seen: %v\nnexd:\n%s", err, n.out.String())
		}
		var resp protocol.RegisterAgentResponse
		if json.Unmarshal(m.Data, &resp) == nil && resp.Success && resp.ConnectionData.NatsUserSeed != "" {
			stolen = resp.ConnectionData
		}
	}
	uc, err := jwt.DecodeUserClaims(stolen.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	if got := time.Duration(uc.Expires-uc.IssuedAt) * time.Second; got != ttl {
		t.Fatalf("the nexlet user lives %s, want nexlet_creds_ttl %s", got, ttl)
	}
	creds, err := jwt.FormatUserConfig(stolen.NatsUserJWT, []byte(stolen.NatsUserSeed))
	if err != nil {
		t.Fatal(err)
	}
	file := testkit.WriteFile(t, filepath.Join(t.TempDir(), "nexlet.creds"), string(creds))
	connects := func() error {
		c, err := nats.Connect(n.natsURL, nats.UserCredentials(file), nats.NoReconnect(), nats.Timeout(5*time.Second))
		if err == nil {
			c.Close()
		}
		return err
	}
	if err := connects(); err != nil {
		t.Fatalf("the stolen nexlet user does not even work before the renewal: %v", err)
	}
	n.nativeSeen = false // registered again after the kill
	n.waitNative(t)
	agent := n.native(t).AgentID
	registered := strings.Count(n.out.String(), "nexlet registered")

	expiry := time.Unix(uc.Expires, 0)
	// Only the server's refusal counts: under load a connect can also time out, which
	// says nothing about the user (a timeout was once taken for the revocation, before
	// the renewal it must follow).
	var refused error
	testkit.EventuallyWithin(t, time.Until(expiry), "the stolen nexlet user refused before it expires", func() bool {
		err := connects()
		if err != nil && !errors.Is(err, nats.ErrAuthorization) && !errors.Is(err, nats.ErrAuthRevoked) {
			t.Logf("connecting as the stolen user: %v (not a refusal; trying again)", err)
			return false
		}
		refused = err
		return err != nil
	})
	t.Logf("the stolen nexlet user refused: %v", refused)
	if left := time.Until(expiry); left < time.Second {
		// The user expires by the wall clock; a paused VM steps it ahead of the
		// monotonic one, by more than the renewal's margin if the pause was long.
		t.Fatalf("refused only %s before expiry: expired, not revoked (the wall clock ran %s ahead of the monotonic one meanwhile)",
			left, time.Now().Round(0).Sub(began.Round(0))-time.Since(began))
	}
	// The nexlet itself renewed, kept its registration and still places workloads.
	if !strings.Contains(n.out.String(), "nexlet credentials renewed") {
		t.Fatalf("no renewal logged\nnexd:\n%s", n.out.String())
	}
	if got := strings.Count(n.out.String(), "nexlet registered"); got != registered {
		t.Fatalf("the nexlet registered again (%d registrations, %d before): its renewal failed\nnexd:\n%s", got, registered, n.out.String())
	}
	if got := n.native(t).AgentID; got != agent {
		t.Fatalf("native nexlet is now %s, was %s", got, agent)
	}
	n.runWorkload(t, "--name", "after", "--", "/bin/sleep", "300")
}

// TestNexletOutlivesCredsTTL: with a 20 s nexlet_creds_ttl on an operator-mode NATS
// (signing-key strategy, no revocation: old users expire), the native nexlet renews its
// user four times, so it runs past the expiry of at least its first two users, without
// registering again, stays healthy, and every deploy and stop sent meanwhile is
// answered. The TTL leaves each renewal the product's full margin (renewMargin, 10 s:
// any TTL from 20 s renews 10 s or more before the old user expires); a 6 s TTL left
// 3 s, which a -race nexd at load 40 once missed, and the nexlet lost its connection.
// The test ends on the count of renewals, not after a time.
func TestNexletOutlivesCredsTTL(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n, creds, _ := signingNode(t, "--nexlet-creds-ttl", "20s")
	n.waitNative(t)
	agent := n.native(t).AgentID
	registered := strings.Count(n.out.String(), "nexlet registered")
	renewals := func() int { return strings.Count(n.out.String(), "nexlet credentials renewed") }
	// Deploying and stopping all the while: no request to the nexlet may be lost to a
	// renewal. The bound only ends a nexlet that stopped renewing (about 40 s needed).
	const want = 4
	deployed := 0
	for deadline := time.Now().Add(4 * time.Minute); renewals() < want; deployed++ {
		if time.Now().After(deadline) {
			t.Fatalf("%d renewals logged in 4 minutes with a 20 s TTL, want %d\nnexd:\n%s", renewals(), want, n.out.String())
		}
		w := n.natsRun(t, creds, "tenant", "--name", fmt.Sprintf("w%d", deployed), "--", "/bin/sleep", "300")
		n.mustCtl(t, "--nats.creds-file", creds, "--namespace", "tenant", "workload", "stop", w.ID)
	}
	t.Logf("%d deploys and stops during %d renewals", deployed, renewals())
	if got := strings.Count(n.out.String(), "nexlet registered"); got != registered {
		t.Fatalf("the nexlet registered again (%d registrations, %d before)\nnexd:\n%s", got, registered, n.out.String())
	}
	x := n.native(t)
	if x.AgentID != agent || x.Health != protocol.HealthHealthy || x.Restarts != 0 {
		t.Fatalf("native nexlet after %d renewals: %+v (agent id was %s)\nnexd:\n%s", want, x, agent, n.out.String())
	}
	n.natsRun(t, creds, "tenant", "--name", "late", "--", "/bin/sleep", "300")
}

// TestAttackReplayedRegistration: the node's admin (whose user may subscribe and
// publish anywhere on the embedded server) captures the native nexlet's signed
// registration as it crosses NATS (after a crash, with NEXD_LOCAL_REGISTER=off as for
// a nexlet without a socket pair) and, once the nexlet runs registered, publishes the
// same message again with a reply on the nexlet's own inbox, where it listens too.
// Before, the node took the copy as the nexlet's: the admin read a fresh nexlet user,
// seed and all, that connects, the node revoked the nexlet's current users as
// superseded and counted another registration. Now the copy is refused (403,
// "replayed"), no user is minted and the nexlet stays registered once, working.
func TestAttackReplayedRegistration(t *testing.T) {
	if testing.Short() {
		t.Skip("e2e")
	}
	t.Parallel()
	n := startNode(t, nodeOpts{env: []string{"NEXD_LOCAL_REGISTER=off"}})
	st := n.waitReady(t)
	n.waitNative(t)
	agent := n.native(t).AgentID
	admin := testkit.WriteFile(t, filepath.Join(t.TempDir(), "admin.creds"), n.mustCtl(t, "creds", "issue", "--admin", "--ttl", "1h"))
	nc, err := nats.Connect(n.natsURL, nats.UserCredentials(admin))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	regs, err := nc.SubscribeSync(protocol.RegisterSubject(st.NodeID, agent))
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	if err := syscall.Kill(n.native(t).PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	captured, err := regs.NextMsg(60 * time.Second)
	if err != nil {
		t.Fatalf("no registration seen: %v\nnexd:\n%s", err, n.out.String())
	}
	if captured.Header.Get(protocol.HeaderRegistrationSig) == "" {
		t.Fatalf("the captured registration is not signed: %v", captured.Header)
	}
	n.nativeSeen = false
	n.waitNative(t)
	testkit.Eventually(t, "the registration taken", func() bool { return strings.Contains(n.out.String(), "nexlet registered") })
	registered := strings.Count(n.out.String(), "nexlet registered")

	reply := protocol.InboxPrefix(agent) + ".replay"
	replies, err := nc.SubscribeSync(reply)
	if err != nil {
		t.Fatal(err)
	}
	flush(t, nc)
	replay := nats.NewMsg(captured.Subject)
	replay.Data, replay.Header, replay.Reply = captured.Data, captured.Header, reply
	if err := nc.PublishMsg(replay); err != nil {
		t.Fatal(err)
	}
	m, err := replies.NextMsg(30 * time.Second)
	if err != nil {
		t.Fatalf("no answer to the replay: %v\nnexd:\n%s", err, n.out.String())
	}
	var resp protocol.RegisterAgentResponse
	if json.Unmarshal(m.Data, &resp) == nil && resp.ConnectionData.NatsUserSeed != "" {
		obtained := "does not connect"
		if creds, err := jwt.FormatUserConfig(resp.ConnectionData.NatsUserJWT, []byte(resp.ConnectionData.NatsUserSeed)); err == nil {
			file := testkit.WriteFile(t, filepath.Join(t.TempDir(), "nexlet.creds"), string(creds))
			if c, err := nats.Connect(n.natsURL, nats.UserCredentials(file), nats.NoReconnect(), nats.Timeout(5*time.Second)); err == nil {
				c.Close()
				obtained = "connects"
			}
		}
		t.Fatalf("the replayed registration was taken: the replayer got a nexlet user that %s", obtained)
	}
	if code := m.Header.Get(protocol.HeaderErrorCode); code != "403" || !strings.Contains(string(m.Data), "replayed") {
		t.Fatalf("answer to the replay: code %q %s, want 403 saying replayed", code, m.Data)
	}
	// The nexlet places workloads and keeps its one registration.
	n.runWorkload(t, "--name", "after", "--", "/bin/sleep", "300")
	if got := strings.Count(n.out.String(), "nexlet registered"); got != registered {
		t.Fatalf("%d registrations after the replay, %d before\nnexd:\n%s", got, registered, n.out.String())
	}
	if x := n.native(t); x.AgentID != agent || x.Health != protocol.HealthHealthy {
		t.Fatalf("native nexlet after the replay: %+v", x)
	}
}
