package native

import (
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

// jwtCreds makes workload credentials whose user JWT (signed by acc) expires after ttl;
// ttl 0 makes a JWT without expiry.
func jwtCreds(t *testing.T, acc nkeys.KeyPair, ttl time.Duration, servers ...string) protocol.NatsConnectionData {
	t.Helper()
	ukp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := ukp.PublicKey()
	seed, _ := ukp.Seed()
	uc := jwt.NewUserClaims(pub)
	if ttl != 0 {
		uc.Expires = time.Now().Add(ttl).Unix()
	}
	tok, err := uc.Encode(acc)
	if err != nil {
		t.Fatal(err)
	}
	return protocol.NatsConnectionData{NatsServers: servers, NatsUserJWT: tok, NatsUserSeed: string(seed)}
}

func TestRenewAt(t *testing.T) {
	acc, _ := nkeys.CreateAccount()
	now := time.Now()
	for _, tc := range []struct {
		name   string
		cd     protocol.NatsConnectionData
		ok     bool
		lo, hi time.Duration
	}{
		{name: "no JWT", cd: protocol.NatsConnectionData{NatsUserSeed: "SU"}},
		{name: "not a JWT", cd: protocol.NatsConnectionData{NatsUserJWT: "garbage"}},
		{name: "no expiry", cd: jwtCreds(t, acc, 0)},
		// 80% of 100s, give or take the JWT's whole-second timestamps.
		{name: "expires", cd: jwtCreds(t, acc, 100*time.Second), ok: true, lo: 78 * time.Second, hi: 81 * time.Second},
		{name: "already late", cd: jwtCreds(t, acc, -time.Minute), ok: true, lo: 0, hi: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			at, _, ok := renewAt(tc.cd)
			d := max(at.Sub(now), 0)
			if ok != tc.ok || d < tc.lo || d > tc.hi {
				t.Errorf("renewAt = %v (in %v), %v; want %v in [%v, %v]", at, d, ok, tc.ok, tc.lo, tc.hi)
			}
		})
	}
}

// renewals answers RENEWCREDS for testAgent like a node, with credentials from mint.
type renewals struct {
	mu     sync.Mutex
	issued []string // JWTs handed out
	ids    []string
	nss    []string
}

func (rn *renewals) serve(t *testing.T, nc *nats.Conn, mint func(ns, id string) (protocol.NatsConnectionData, error)) {
	t.Helper()
	sub, err := nc.Subscribe(protocol.RenewCredsSubject(testNode, testAgent, "*"), func(m *nats.Msg) {
		var req protocol.RenewCredsRequest
		if err := json.Unmarshal(m.Data, &req); err != nil {
			t.Errorf("renewal body %q: %v", m.Data, err)
			return
		}
		id := protocol.LastToken(m.Subject)
		cd, err := mint(req.Namespace, id)
		if err != nil {
			t.Errorf("mint renewal: %v", err)
			return
		}
		rn.mu.Lock()
		rn.issued, rn.ids, rn.nss = append(rn.issued, cd.NatsUserJWT), append(rn.ids, id), append(rn.nss, req.Namespace)
		rn.mu.Unlock()
		b, _ := json.Marshal(cd)
		_ = m.Respond(b)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
}

func (rn *renewals) count() int {
	rn.mu.Lock()
	defer rn.mu.Unlock()
	return len(rn.issued)
}

func readCredsJWT(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	tok, err := jwt.ParseDecoratedJWT(b)
	if err != nil {
		t.Fatalf("creds file %s: %v", path, err)
	}
	if _, err := nkeys.ParseDecoratedNKey(b); err != nil {
		t.Fatalf("creds file %s has no seed: %v", path, err)
	}
	return tok
}

func TestRenewRewritesCredsFileWhileRunning(t *testing.T) {
	fn := newFakeNode(t)
	acc, _ := nkeys.CreateAccount()
	const ttl = 3 * time.Second
	rn := &renewals{}
	rn.serve(t, fn.nc, func(string, string) (protocol.NatsConnectionData, error) {
		return jwtCreds(t, acc, ttl, fn.srv.ClientURL()), nil
	})
	tn := fn.startNexlet(Config{})
	first := jwtCreds(t, acc, ttl, fn.srv.ClientURL())
	uri := script(t, `echo "file=$NEX_WORKLOAD_NATS_CREDS_FILE"; exec sleep 1000`)
	fn.mustStart("rn1", startReq(protocol.LifecycleService, "rn", map[string]any{"uri": uri}, first))
	path := filepath.Join(tn.WorkloadsDir(), "rn1", "nats.creds")
	fn.waitLog("rn1", "stdout", "file="+path)

	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o400 {
		t.Errorf("creds file mode %v, want 0400", st.Mode().Perm())
	}
	if got := readCredsJWT(t, path); got != first.NatsUserJWT && rn.count() == 0 {
		t.Errorf("creds file does not hold the workload's JWT")
	}
	// Renewed before expiry, again and again, each time into the file.
	testkit.Eventually(t, "two renewals written to the creds file", func() bool {
		rn.mu.Lock()
		issued := slices.Clone(rn.issued)
		rn.mu.Unlock()
		return len(issued) >= 2 && readCredsJWT(t, path) == issued[len(issued)-1]
	})
	rn.mu.Lock()
	for i := range rn.ids {
		if rn.ids[i] != "rn1" || rn.nss[i] != testNS {
			t.Errorf("renewal %d asked for workload %q in namespace %q", i, rn.ids[i], rn.nss[i])
		}
	}
	rn.mu.Unlock()

	fn.stop("rn1", testNS)
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Errorf("creds file left after stop: %v", err)
	}
	n := rn.count()
	time.Sleep(ttl + time.Second) // longer than a renewal period: none may come
	if rn.count() != n {
		t.Errorf("renewals went on after the workload stopped: %d, then %d", n, rn.count())
	}
}

// TestWorkloadRenewalFollowsWallClockStep: a workload's user is renewed within a slice
// of its renewal time by the wall clock (by which nats-server expires it), also when the
// wall clock steps ahead as after a pause of the host or its VM, during which the
// monotonic clock of timers stood still. The step is made in the clock the nexlet's
// renewals read (the host's is shared). Before, one timer ran for the whole wait (32 s
// of a 40 s user): the renewal came 30 s after the step, 3 s after the user expired by
// the stepped clock.
func TestWorkloadRenewalFollowsWallClockStep(t *testing.T) {
	fn := newFakeNode(t)
	acc, _ := nkeys.CreateAccount()
	rn := &renewals{}
	rn.serve(t, fn.nc, func(string, string) (protocol.NatsConnectionData, error) {
		return jwtCreds(t, acc, time.Hour, fn.srv.ClientURL()), nil
	})
	var step atomic.Int64
	tn := fn.startNexletHooked(Config{}, func(n *Nexlet) {
		n.now = func() time.Time { return time.Now().Add(time.Duration(step.Load())) }
	})
	const ttl = 40 * time.Second // renewed at 32 s; slices of 2 s
	first := jwtCreds(t, acc, ttl, fn.srv.ClientURL())
	fn.mustStart("wc1", startReq(protocol.LifecycleService, "wc", map[string]any{"uri": script(t, "exec sleep 1000")}, first))
	path := filepath.Join(tn.WorkloadsDir(), "wc1", "nats.creds")
	time.Sleep(500 * time.Millisecond)
	if n := rn.count(); n != 0 {
		t.Fatalf("%d renewals before the renewal time", n)
	}
	// A pause of 35 s: the user has 5 s left by the wall clock.
	step.Store(int64(35 * time.Second))
	stepped := time.Now()
	deadline := stepped.Add(5 * time.Second)
	for rn.count() == 0 || readCredsJWT(t, path) == first.NatsUserJWT {
		if time.Now().After(deadline) {
			t.Fatalf("no renewal written %v after the wall clock stepped to 5 s before the user's expiry (%d renewals)", time.Since(stepped).Round(time.Millisecond), rn.count())
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Logf("renewed %v after the step", time.Since(stepped).Round(time.Millisecond))
	time.Sleep(time.Second)
	if n := rn.count(); n != 1 {
		t.Errorf("%d renewals, want 1 (the renewed user lives an hour)", n)
	}
	fn.stop("wc1", testNS)
}

// A process restarted by its policy starts with the newest credentials in its env.
func TestRenewedCredsReachARestartedProcess(t *testing.T) {
	fn := newFakeNode(t)
	acc, _ := nkeys.CreateAccount()
	rn := &renewals{}
	rn.serve(t, fn.nc, func(string, string) (protocol.NatsConnectionData, error) {
		return jwtCreds(t, acc, 2*time.Second, fn.srv.ClientURL()), nil
	})
	fn.startNexlet(Config{})
	first := jwtCreds(t, acc, 2*time.Second, fn.srv.ClientURL())
	uri := script(t, `echo "jwt=$NEX_WORKLOAD_NATS_B64_JWT"; sleep 1; exit 3`)
	fn.mustStart("rr1", startReq(protocol.LifecycleService, "rr", map[string]any{"uri": uri,
		"restart": map[string]any{"policy": "always", "max": 100, "backoff": "100ms"}}, first))
	testkit.Eventually(t, "a run with renewed credentials", func() bool {
		rn.mu.Lock()
		issued := slices.Clone(rn.issued)
		rn.mu.Unlock()
		for _, l := range fn.logLines("rr1", "stdout") {
			for _, tok := range issued {
				if l == "jwt="+base64.StdEncoding.EncodeToString([]byte(tok)) {
					return true
				}
			}
		}
		return false
	})
	fn.stop("rr1", testNS)
}

func TestRenewNothingWithoutJWT(t *testing.T) {
	fn := newFakeNode(t)
	tn := fn.startNexlet(Config{})
	uri := script(t, `echo "file=[$NEX_WORKLOAD_NATS_CREDS_FILE]"; ls "$(dirname "$0")" >/dev/null; exec sleep 1000`)
	fn.mustStart("nj1", startReq(protocol.LifecycleService, "nj", map[string]any{"uri": uri}, fn.creds()))
	fn.waitLog("nj1", "stdout", "file=[]")
	if _, err := os.Stat(filepath.Join(tn.WorkloadsDir(), "nj1", "nats.creds")); !os.IsNotExist(err) {
		t.Errorf("a creds file was written for credentials without a JWT: %v", err)
	}
}

func TestRenewCredsFileVariableIsReserved(t *testing.T) {
	fn := newFakeNode(t)
	fn.startNexlet(Config{})
	r := fn.start("rs1", startReq(protocol.LifecycleJob, "rs", map[string]any{"uri": script(t, "true"),
		"environment": map[string]string{EnvCredsFile: "/tmp/x"}}, fn.creds()))
	if !strings.Contains(r.errText, EnvCredsFile) {
		t.Errorf("start with %s in the environment: %s %q", EnvCredsFile, r.code, r.errText)
	}
}

// operatorServer runs a nats-server in operator mode (memory resolver) and returns it,
// an unrestricted connection of the application account and a minter for that account.
func operatorServer(t *testing.T, o mint.Options) (*server.Server, *nats.Conn, *mint.SigningKeyMinter) {
	t.Helper()
	op := testnats.StartOperator(t, nil)
	o.Servers = []string{op.Server.ClientURL()}
	m, err := mint.NewSigningKeyMinter(op.SigningSeed, op.Account, o)
	if err != nil {
		t.Fatal(err)
	}
	return op.Server, op.Connect(t, "admin"), m
}

// A workload client using nats.UserCredentials on the creds file keeps working after
// its first (short-lived) JWT expired: the server disconnects it, and it reconnects
// with the credentials the nexlet renewed, against a real operator-mode server.
func TestRenewKeepsWorkloadConnectedPastExpiry(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a NATS client")
	}
	bin := bins.Path(t, "./testdata/credsclient") // in a directory every uid may read
	const ttl = 5 * time.Second
	srv, admin, m := operatorServer(t, mint.Options{WorkloadTTL: ttl})
	fn := newFakeNodeOn(t, srv, admin, func() protocol.NatsConnectionData {
		cd, err := m.MintAgent(testAgent, testNode, true)
		if err != nil {
			t.Fatal(err)
		}
		return cd
	})
	rn := &renewals{}
	rn.serve(t, admin, m.RenewWorkload)
	fn.startNexlet(Config{})

	type tick struct{ N, Reconnects uint64 }
	ticks := make(chan tick, 1024)
	sub, err := admin.Subscribe(testNS+".tick", func(msg *nats.Msg) {
		var tk tick
		if json.Unmarshal(msg.Data, &tk) == nil {
			select {
			case ticks <- tk:
			default:
			}
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := admin.Flush(); err != nil {
		t.Fatal(err)
	}
	creds, err := m.MintWorkload(testNS, "op1")
	if err != nil {
		t.Fatal(err)
	}
	uc, err := jwt.DecodeUserClaims(creds.NatsUserJWT)
	if err != nil {
		t.Fatal(err)
	}
	fn.mustStart("op1", startReq(protocol.LifecycleService, "op", map[string]any{"uri": "file://" + bin}, creds))
	fn.waitLog("op1", "stdout", "connected")

	// Ticks sent after a reconnect that happened past the first JWT's expiry prove the
	// renewed file was used.
	expired := time.Unix(uc.Expires, 0)
	deadline := time.After(waitLong + ttl)
	for {
		select {
		case tk := <-ticks:
			if tk.Reconnects >= 1 && time.Now().After(expired.Add(time.Second)) {
				t.Logf("tick %d after %d reconnect(s); %d renewals; client said %q", tk.N, tk.Reconnects, rn.count(), fn.logLines("op1", "stdout"))
				if s, ok := fn.summary("op1"); !ok || s.WorkloadState != protocol.WorkloadRunning || s.Metadata["restarts"] != "0" {
					t.Errorf("workload not running unrestarted: %+v", s)
				}
				return
			}
		case <-deadline:
			t.Fatalf("no tick after the first JWT expired (%v); renewals %d; client said %q", expired, rn.count(), fn.logLines("op1", "stdout"))
		}
	}
}
