package natsconn

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

func ctxT(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t testing.TB, o Options) *Conn {
	t.Helper()
	c, err := Connect(ctxT(t), o, nil)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

// roundTrip proves the connection works end to end.
func roundTrip(t *testing.T, nc *nats.Conn) {
	t.Helper()
	sub, err := nc.SubscribeSync("nexd.test.echo")
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := nc.Publish("nexd.test.echo", []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if m, err := sub.NextMsg(30 * time.Second); err != nil || string(m.Data) != "hi" {
		t.Fatalf("round trip: %v %v", m, err)
	}
}

func userSeed(t *testing.T) (nkeys.KeyPair, string, string) {
	t.Helper()
	kp, err := nkeys.CreateUser()
	if err != nil {
		t.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	seed, _ := kp.Seed()
	return kp, pub, string(seed)
}

func TestConfigured(t *testing.T) {
	cases := []struct {
		o    Options
		want bool
	}{
		{Options{}, false},
		{Options{ConnName: "x", Timeout: time.Second, JSDomain: "d", HealthGrace: time.Second}, false},
		{Options{Servers: []string{"nats://a:4222"}}, true},
		{Options{Context: "prod"}, true},
		{Options{CredsFile: "/x.creds"}, true},
		{Options{User: "u"}, true},
		{Options{TLSCA: "/ca.pem"}, true},
	}
	for _, c := range cases {
		if got := Configured(c.o); got != c.want {
			t.Errorf("Configured(%+v) = %v, want %v", c.o, got, c.want)
		}
	}
}

func TestExternalAuth(t *testing.T) {
	_, upub, useed := userSeed(t)
	seedFile := filepath.Join(t.TempDir(), "user.nk")
	if err := os.WriteFile(seedFile, []byte(useed), 0o600); err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		name      string
		configure func(*server.Options)
		opts      func(url string) Options
	}{
		{"anonymous", nil, func(u string) Options { return Options{Servers: []string{u}} }},
		{"user/password", func(o *server.Options) {
			o.Users = []*server.User{{Username: "nex", Password: "s3cret"}}
		}, func(u string) Options { return Options{Servers: []string{u}, User: "nex", Password: "s3cret"} }},
		{"nkey+seed", func(o *server.Options) {
			o.Nkeys = []*server.NkeyUser{{Nkey: upub}}
		}, func(u string) Options { return Options{Servers: []string{u}, Nkey: upub, Seed: useed} }},
		{"seed alone", func(o *server.Options) {
			o.Nkeys = []*server.NkeyUser{{Nkey: upub}}
		}, func(u string) Options { return Options{Servers: []string{u}, Seed: useed} }},
		{"nkey seed file", func(o *server.Options) {
			o.Nkeys = []*server.NkeyUser{{Nkey: upub}}
		}, func(u string) Options { return Options{Servers: []string{u}, Nkey: seedFile} }},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: tc.configure})
			o := tc.opts(s.ClientURL())
			o.ConnName = "nexd-test"
			c := connect(t, o)
			roundTrip(t, c.NC)
			if got := c.ClientURLs(); !slices.Equal(got, []string{s.ClientURL()}) {
				t.Errorf("ClientURLs %v, want [%s]", got, s.ClientURL())
			}
			if c.InProcess() != nil {
				t.Error("in-process server set for an external connection")
			}
			ci := c.Info()
			if !ci.Connected || ci.Embedded || ci.Server != s.ClientURL() || ci.State != "connected" {
				t.Errorf("Info %+v", ci)
			}
			if !c.Connected() {
				t.Error("Connected() false while Info says connected")
			}
			if !c.Healthy() {
				t.Error("not healthy while connected")
			}
			if c.NC.Opts.Name != "nexd-test" {
				t.Errorf("connection name %q", c.NC.Opts.Name)
			}
		})
	}
}

func TestAuthFailureIsNotRetried(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
		o.Users = []*server.User{{Username: "nex", Password: "right"}}
	}})
	_, err := Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}, User: "nex", Password: "wrong"}, nil)
	if err == nil || !errors.Is(err, nats.ErrAuthorization) || strings.Contains(err.Error(), "gave up") {
		t.Fatalf("error %v, want an immediate authorization error", err)
	}
}

func TestAuthOptionErrors(t *testing.T) {
	_, upub, useed := userSeed(t)
	akp, _ := nkeys.CreateAccount()
	aseed, _ := akp.Seed()
	_, otherPub, _ := userSeed(t)
	cases := []struct {
		o    Options
		want string
	}{
		{Options{Password: "p"}, "--nats.password needs --nats.user"},
		{Options{JWT: "eyJ..."}, "--nats.jwt needs --nats.seed"},
		{Options{Seed: string(aseed)}, "want a user seed"},
		{Options{Seed: "SUnotaseed"}, "not an nkey seed"},
		{Options{Nkey: otherPub, Seed: useed}, "does not belong to --nats.seed"},
		{Options{Nkey: upub}, "needs --nats.seed"},
		{Options{TLSCert: "/c.pem"}, "--nats.tlscert and --nats.tlskey must be given together"},
		{Options{CredsFile: "/nonexistent/user.creds"}, "--nats.creds-file"},
	}
	for _, c := range cases {
		_, err := authOptions(c.o)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%+v: error %v, want %q", c.o, err, c.want)
		}
	}
	// A seed given as --nats.nkey by mistake is refused without being shown (before, both
	// errors quoted it whole).
	_, _, otherSeed := userSeed(t)
	for _, o := range []Options{{Nkey: otherSeed}, {Nkey: otherSeed, Seed: useed}} {
		_, err := authOptions(o)
		if err == nil || !strings.Contains(err.Error(), "--nats.nkey (a seed, which belongs in --nats.seed)") || strings.Contains(err.Error(), otherSeed) {
			t.Errorf("a seed as --nats.nkey: %v, want refused without the seed", err)
		}
	}
}

// operatorServer starts a server (no JetStream) trusting a new operator, as nsc would
// set one up.
func operatorServer(t *testing.T) (*testnats.Operator, *server.Server) {
	t.Helper()
	op := testnats.NewOperator(t, nil)
	return op, testnats.Start(t, testnats.Options{NoJetStream: true, Configure: op.Configure})
}

func TestOperatorMode(t *testing.T) {
	op, s := operatorServer(t)
	ujwt, useed := op.User(t, "U", nil)
	credsFile := op.CredsFile(t, "user")
	for name, o := range map[string]Options{
		"creds file": {Servers: []string{s.ClientURL()}, CredsFile: credsFile},
		"jwt+seed":   {Servers: []string{s.ClientURL()}, JWT: ujwt, Seed: useed},
	} {
		t.Run(name, func(t *testing.T) {
			c := connect(t, o)
			roundTrip(t, c.NC)
		})
	}
	t.Run("no credentials refused", func(t *testing.T) {
		if _, err := Connect(ctxT(t), Options{Servers: []string{s.ClientURL()}}, nil); err == nil {
			t.Fatal("anonymous connection to an operator-mode server succeeded")
		}
	})
}

func TestNATSContext(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) {
		o.Users = []*server.User{{Username: "ctxuser", Password: "ctxpass"}}
	}})
	xdg := t.TempDir()
	t.Setenv("XDG_CONFIG_HOME", xdg)
	dir := filepath.Join(xdg, "nats", "context")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"url": %q, "user": "ctxuser", "password": "ctxpass", "jetstream_domain": "hub"}`, s.ClientURL())
	if err := os.WriteFile(filepath.Join(dir, "nexdev.json"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	// The context wins over the other connection flags, which point nowhere.
	c := connect(t, Options{Context: "nexdev", Servers: []string{"nats://127.0.0.1:1"}, User: "wrong"})
	roundTrip(t, c.NC)
	if got := c.ClientURLs(); !slices.Equal(got, []string{s.ClientURL()}) {
		t.Errorf("ClientURLs %v, want the context's [%s]", got, s.ClientURL())
	}
	if c.JSDomain() != "hub" {
		t.Errorf("JSDomain %q, want the context's hub", c.JSDomain())
	}

	// A context given as a file path.
	c2 := connect(t, Options{Context: filepath.Join(dir, "nexdev.json"), JSDomain: "mine"})
	roundTrip(t, c2.NC)
	if c2.JSDomain() != "mine" {
		t.Errorf("JSDomain %q, want the flag's mine", c2.JSDomain())
	}

	_, err := Connect(ctxT(t), Options{Context: "missing"}, nil)
	if err == nil || !strings.Contains(err.Error(), `"missing"`) {
		t.Fatalf("unknown context: error %v, want one naming it", err)
	}
}

func startOnPort(t *testing.T, port int) *server.Server {
	return testnats.Start(t, testnats.Options{NoJetStream: true, Configure: func(o *server.Options) { o.Port = port }})
}

func TestReconnectCounting(t *testing.T) {
	port := testkit.StablePort(t)
	s1 := startOnPort(t, port)
	c := connect(t, Options{Servers: []string{s1.ClientURL()}})
	roundTrip(t, c.NC)

	s1.Shutdown()
	s1.WaitForShutdown()
	testkit.Eventually(t, "disconnect", func() bool { return !c.NC.IsConnected() && c.Info().Disconnects >= 1 })
	if !c.Healthy() {
		t.Error("unhealthy right after a disconnect, want healthy within the grace period")
	}
	if ci := c.Info(); ci.Connected || ci.State != "reconnecting" {
		t.Errorf("Info while down %+v", ci)
	}
	c.grace = time.Nanosecond // past the grace period
	if c.Healthy() {
		t.Error("healthy while reconnecting past the grace period")
	}

	s2 := startOnPort(t, port)
	testkit.Eventually(t, "reconnect", func() bool { return c.Info().Reconnects == 1 && c.NC.IsConnected() })
	roundTrip(t, c.NC)
	if !c.Healthy() {
		t.Error("unhealthy after reconnecting")
	}
	_ = s2
}

func TestConnectWaitsForServer(t *testing.T) {
	port := testkit.StablePort(t)
	url := "nats://127.0.0.1:" + strconv.Itoa(port)
	type result struct {
		c   *Conn
		err error
	}
	done := make(chan result, 1)
	var logs testkit.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	ctx := ctxT(t)
	go func() {
		c, err := Connect(ctx, Options{Servers: []string{url}}, log)
		done <- result{c, err}
	}()
	// Let it fail at least once, then bring the server up.
	testkit.Eventually(t, "a failed attempt", func() bool { return strings.Contains(logs.String(), "NATS not reachable yet") })
	startOnPort(t, port)
	r := <-done
	if r.err != nil {
		t.Fatalf("Connect: %v", r.err)
	}
	defer r.c.Close(context.Background())
	roundTrip(t, r.c.NC)

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Connect(ctx, Options{Servers: []string{"nats://127.0.0.1:" + strconv.Itoa(testkit.StablePort(t))}}, nil)
	if err == nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v, want context canceled", err)
	}
}

// TestUnparsableServerURLErrorHidesCredentials: a server URL nats.go cannot parse
// fails at once, and neither the error nor the log shows its userinfo. Before, nats.go's
// parse error (a *url.Error, which is a net.Error) was taken for an unreachable server:
// retried until the context ended, each retry logged with the URL whole.
func TestUnparsableServerURLErrorHidesCredentials(t *testing.T) {
	const secret = "s3cret"
	for _, u := range []string{"nats://admin:" + secret + "%zz@127.0.0.1:4222", "admin:" + secret + "%zz@127.0.0.1:4222", "nats://" + secret + "@[::1"} {
		var logs strings.Builder
		log := slog.New(slog.NewTextHandler(&logs, nil))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		_, err := Connect(ctx, Options{Servers: []string{u}}, log)
		cancel()
		if err == nil || strings.Contains(err.Error(), secret) || strings.Contains(logs.String(), secret) {
			t.Errorf("%s: %v\nlog:\n%s\nwant an error without the secret, and no log line with it", u, err, logs.String())
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("%s: gave up after %s: retried a URL that cannot be parsed", u, took)
		}
	}
}

func TestBackoffBounds(t *testing.T) {
	for a := 0; a < 20; a++ {
		d := backoff(a)
		if d < 125*time.Millisecond || d > 10*time.Second {
			t.Errorf("backoff(%d) = %s out of [125ms, 10s]", a, d)
		}
	}
}

// BenchmarkConnected: the status line (READY=1 carries it) asked Info whether NATS is
// up, twice, and Info measures the RTT with a round trip to the server; Connected
// reads the client's state.
func BenchmarkConnected(b *testing.B) {
	s := testnats.Start(b, testnats.Options{NoJetStream: true})
	c := connect(b, Options{Servers: []string{s.ClientURL()}})
	b.Run("Info", func(b *testing.B) {
		for b.Loop() {
			if !c.Info().Connected {
				b.Fatal("not connected")
			}
		}
	})
	b.Run("Connected", func(b *testing.B) {
		for b.Loop() {
			if !c.Connected() {
				b.Fatal("not connected")
			}
		}
	})
}

// TestInboxPrefix: InboxPrefix names the connection's inboxes, unless its NATS
// context sets inbox_prefix (the operator granted nexd's user that one).
func TestInboxPrefix(t *testing.T) {
	s := testnats.Start(t, testnats.Options{NoJetStream: true})
	c := connect(t, Options{Servers: []string{s.ClientURL()}, InboxPrefix: "_INBOX_nexd.abc"})
	if got := c.NC.NewInbox(); !strings.HasPrefix(got, "_INBOX_nexd.abc.") {
		t.Errorf("inbox %q, want one under _INBOX_nexd.abc", got)
	}
	roundTrip(t, c.NC)
	if got := connect(t, Options{Servers: []string{s.ClientURL()}}).NC.NewInbox(); !strings.HasPrefix(got, "_INBOX.") {
		t.Errorf("inbox %q without InboxPrefix, want nats.go's _INBOX.", got)
	}
	dir := t.TempDir()
	ctxFile := filepath.Join(dir, "ops.json")
	body := fmt.Sprintf(`{"url": %q, "inbox_prefix": "_INBOX_ops"}`, s.ClientURL())
	if err := os.WriteFile(ctxFile, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := connect(t, Options{Context: ctxFile, InboxPrefix: "_INBOX_nexd.abc"}).NC.NewInbox(); !strings.HasPrefix(got, "_INBOX_ops.") {
		t.Errorf("inbox %q, want the context's _INBOX_ops", got)
	}
}

// pingCounter is a real server, in-process, whose connections count the PINGs the
// client sends (a flush is one).
type pingCounter struct {
	*server.Server
	pings atomic.Int64
}

func (s *pingCounter) InProcessConn() (net.Conn, error) {
	c, err := s.Server.InProcessConn()
	if err != nil {
		return nil, err
	}
	return &countingConn{Conn: c, pings: &s.pings}, nil
}

type countingConn struct {
	net.Conn
	pings *atomic.Int64
}

func (c *countingConn) Write(p []byte) (int, error) {
	c.pings.Add(int64(bytes.Count(p, []byte("PING\r\n"))))
	return c.Conn.Write(p)
}

// TestInfoProbesRTTOncePerWindow: Info (what every control socket status shows, which
// any local user may call as often as she likes) measures the RTT with a round trip to
// the server at most once per rttFor, whatever the callers: 400 calls from 8 goroutines
// at once cost one PING, each sees an RTT. Before, each call was a round trip: 400.
func TestInfoProbesRTTOncePerWindow(t *testing.T) {
	srv := &pingCounter{Server: testnats.Start(t, testnats.Options{NoJetStream: true})}
	c, err := ConnectInProcess(ctxT(t), Options{}, srv, []string{srv.ClientURL()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	roundTrip(t, c.NC)
	before := srv.pings.Load()
	var wg sync.WaitGroup
	var zero atomic.Int64
	for range 8 {
		wg.Go(func() {
			for range 50 {
				if c.Info().RTT <= 0 {
					zero.Add(1)
				}
			}
		})
	}
	wg.Wait()
	pings := srv.pings.Load() - before
	t.Logf("400 Info calls: %d PINGs, %d without an RTT", pings, zero.Load())
	if pings > 2 || zero.Load() > 0 {
		t.Errorf("400 Info calls: %d PINGs, %d without an RTT; want at most one PING a second, an RTT each", pings, zero.Load())
	}
}

// TestBlockedWriteRecovers: a server that stops reading (its link black-holed: nothing
// forwarded, nothing closed) while the connection has more to send than the kernel's
// buffers hold blocks a socket write, and nats.go holds the connection's lock over it.
// With flusherTimeout the write gives up, the connection reconnects to the next server
// and answers a round trip within the bound; before, with nats.go's 1 min default, the
// connection (publishes, requests, the pings that would find it stale) stayed frozen.
func TestBlockedWriteRecovers(t *testing.T) {
	t.Parallel()
	srv := testnats.Start(t, testnats.Options{NoJetStream: true})
	p, proxied := testkit.ProxyNATS(t, srv.ClientURL())
	// The black-holed link first; the server itself is where the connection recovers.
	c := connect(t, Options{Servers: []string{proxied, srv.ClientURL()}, Timeout: time.Second})
	roundTrip(t, c.NC)

	p.Blackhole()
	blockedAt, filled, blocked := testkit.BlockWrite(c.NC)
	defer func() {
		if t.Failed() {
			c.NC.Close() // ends the filler's blocked publish
		}
		<-filled
	}()
	if !blocked {
		t.Fatal("no write blocked")
	}
	// The bound: the write's deadline, then at worst three ping intervals for a link
	// found stale (a write that sent nothing closes nothing), and a reconnect.
	bound := flusherTimeout + 3*pingInterval + 10*time.Second
	recovered := testkit.WaitFor(bound, func() bool {
		return c.NC.ConnectedUrl() == srv.ClientURL() && c.NC.FlushTimeout(time.Second) == nil
	})
	took := time.Since(blockedAt)
	t.Logf("recovered %v, %s after the write blocked (flusher timeout %s), %d reconnects", recovered, took.Round(10*time.Millisecond), flusherTimeout, c.Reconnects())
	if !recovered {
		t.Fatalf("the connection did not recover within %s of a blocked write", bound)
	}
	roundTrip(t, c.NC)
}
