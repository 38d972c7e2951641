package natsembed

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/mint"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func connect(t *testing.T, client natsconn.Options, o Options) *natsconn.Conn {
	t.Helper()
	c, err := Connect(ctxT(t), client, o, nil)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func natsServer(c *natsconn.Conn) *server.Server { return c.InProcess().(*Server).NATS() }

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

func kvWorks(t *testing.T, nc *nats.Conn) {
	t.Helper()
	ctx := ctxT(t)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: "nex-test"})
	if err != nil {
		t.Fatalf("create KV bucket: %v", err)
	}
	if _, err := kv.Put(ctx, "w1", []byte("running")); err != nil {
		t.Fatalf("KV put: %v", err)
	}
	e, err := kv.Get(ctx, "w1")
	if err != nil || string(e.Value()) != "running" {
		t.Fatalf("KV get: %v %v", e, err)
	}
}

func TestInatsConfig(t *testing.T) {
	port := testkit.StablePort(t)
	dir := t.TempDir()
	conf := filepath.Join(dir, "inats.conf")
	body := fmt.Sprintf(`
listen: 127.0.0.1:%d
server_name: inats-test
jetstream { store_dir: %q }
authorization { user: nexnode, password: pw }
`, port, filepath.Join(dir, "js"))
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	c := connect(t, natsconn.Options{User: "nexnode", Password: "pw", Servers: []string{"nats://10.0.0.9:4222"}}, Options{InatsConfig: conf})
	want := "nats://127.0.0.1:" + strconv.Itoa(port)
	if got := c.ClientURLs(); !slices.Equal(got, []string{want, "nats://10.0.0.9:4222"}) {
		t.Fatalf("ClientURLs %v, want [%s nats://10.0.0.9:4222]", got, want)
	}
	if c.InProcess() == nil || !c.Info().Embedded {
		t.Fatal("not embedded")
	}
	kvWorks(t, c.NC)

	// A child connects over TCP with the configured credentials.
	ext, err := nats.Connect(want, nats.UserInfo("nexnode", "pw"))
	if err != nil {
		t.Fatalf("child connect to %s: %v", want, err)
	}
	roundTrip(t, ext)
	ext.Close()
	if _, err := os.Stat(filepath.Join(dir, "js", "jetstream")); err != nil {
		t.Errorf("JetStream store from the config file not used: %v", err)
	}

	c.Close(ctxT(t))
	if natsServer(c).Running() {
		t.Error("embedded server still running after Close")
	}
	if !c.NC.IsClosed() {
		t.Error("connection not closed")
	}
}

func TestInatsConfigErrors(t *testing.T) {
	bad := filepath.Join(t.TempDir(), "bad.conf")
	os.WriteFile(bad, []byte("listen: {{{"), 0o600)
	_, err := Connect(ctxT(t), natsconn.Options{}, Options{InatsConfig: bad}, nil)
	if err == nil || !strings.Contains(err.Error(), bad) {
		t.Fatalf("error %v, want one naming %s", err, bad)
	}
}

func TestZeroConfigEmbedded(t *testing.T) {
	state := t.TempDir()
	c := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	if c.InProcess() == nil || !natsServer(c).JetStreamEnabled() {
		t.Fatal("no embedded JetStream server")
	}
	urls := c.ClientURLs()
	if len(urls) != 1 || !strings.HasPrefix(urls[0], "nats://127.0.0.1:") || strings.HasSuffix(urls[0], ":-1") {
		t.Fatalf("ClientURLs %v, want the real loopback URL", urls)
	}
	kvWorks(t, c.NC)
	// Never open: without a user JWT nexd signed, nobody gets in.
	if nc, err := nats.Connect(urls[0]); err == nil {
		nc.Close()
		t.Fatal("an unauthenticated client connected to the embedded server")
	}
	trust := c.InProcess().(*Server).Trust()
	creds, _, err := trust.AdminCreds("admin", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	credsFile := filepath.Join(t.TempDir(), "admin.creds")
	os.WriteFile(credsFile, []byte(creds), 0o600)
	ext, err := nats.Connect(urls[0], nats.UserCredentials(credsFile))
	if err != nil {
		t.Fatalf("child connect to %s: %v", urls[0], err)
	}
	defer ext.Close()
	if fi, err := os.Stat(filepath.Join(state, trustFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v %v, want mode 0600", fi, err)
	}
	// The child sees the node's KV bucket: one server, one account.
	js, _ := jetstream.New(ext)
	kv, err := js.KeyValue(ctxT(t), "nex-test")
	if err != nil {
		t.Fatalf("child KV: %v", err)
	}
	if e, err := kv.Get(ctxT(t), "w1"); err != nil || string(e.Value()) != "running" {
		t.Fatalf("child KV get: %v", err)
	}
	if _, err := os.Stat(filepath.Join(state, "jetstream")); err != nil {
		t.Errorf("JetStream store not under the state dir: %v", err)
	}
	ci := c.Info()
	if !ci.Connected || !ci.Embedded || ci.Server != urls[0] {
		t.Errorf("Info %+v", ci)
	}
	ext.Close()

	c.Close(ctxT(t))
	if natsServer(c).Running() {
		t.Fatal("embedded server running after Close")
	}
	if _, err := nats.Connect(urls[0], nats.Timeout(2*time.Second)); err == nil {
		t.Fatal("could still connect after Close")
	}
	if c.Healthy() {
		t.Error("healthy after Close")
	}
}

func TestZeroConfigTempStoreRemoved(t *testing.T) {
	c, err := Connect(ctxT(t), natsconn.Options{}, Options{Port: -1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	store := c.InProcess().(*Server).tempStore
	if store == "" {
		t.Fatal("no temporary store without a state dir")
	}
	kvWorks(t, c.NC)
	c.Close(ctxT(t))
	if _, err := os.Stat(store); !os.IsNotExist(err) {
		t.Errorf("temporary store %s left behind: %v", store, err)
	}
}

func TestZeroConfigPortInUse(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	port := l.Addr().(*net.TCPAddr).Port
	_, err = Connect(ctxT(t), natsconn.Options{}, Options{Port: port, StateDir: t.TempDir()}, nil)
	if err == nil || !strings.Contains(err.Error(), strconv.Itoa(port)) {
		t.Fatalf("error %v, want one naming port %d", err, port)
	}
}

// A user revoked in the account JWT is disconnected at once and stays refused, also
// after nexd restarts on the same state directory (same keys, same revocations).
func TestZeroConfigRevocationAndRestart(t *testing.T) {
	state := t.TempDir()
	c := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	userJWT, seed := revokeVictim(t, c, func() {})
	account := c.InProcess().(*Server).Trust().AccountPub()
	c.Close(ctxT(t))

	c2 := connect(t, natsconn.Options{}, Options{Port: -1, StateDir: state})
	if got := c2.InProcess().(*Server).Trust().AccountPub(); got != account {
		t.Errorf("account after restart %s, want %s", got, account)
	}
	if nc, err := nats.Connect(c2.ClientURLs()[0], nats.UserJWTAndSeed(userJWT, seed)); err == nil {
		nc.Close()
		t.Error("a revoked user connected after the restart")
	}
}

// revokeVictim connects a user of c's server and revokes it (between the two, it calls
// before), then waits until the server cut the user off; it returns the user.
func revokeVictim(t *testing.T, c *natsconn.Conn, before func()) (userJWT, seed string) {
	t.Helper()
	trust := c.InProcess().(*Server).Trust()
	userJWT, seed, err := trust.User("victim", time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	closed := make(chan struct{})
	nc, err := nats.Connect(c.ClientURLs()[0], nats.UserJWTAndSeed(userJWT, seed), nats.NoReconnect(),
		nats.ClosedHandler(func(*nats.Conn) { close(closed) }))
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	before()
	uc, _ := jwt.DecodeUserClaims(userJWT)
	r := &mint.AccountRevoker{OperatorSigner: trust.OperatorSigner(), Load: trust.LoadAccount, Push: trust.PushAccount}
	if err := r.RevokeUser(ctxT(t), uc.Subject, time.Now()); err != nil {
		t.Errorf("revoke: %v", err)
	}
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("revoked user still connected")
	}
	return userJWT, seed
}

func TestCheckServerConfigWarnsWithoutAuth(t *testing.T) {
	dir := t.TempDir()
	open := testkit.WriteFile(t, filepath.Join(dir, "open.conf"), "listen: 127.0.0.1:-1\n")
	authed := testkit.WriteFile(t, filepath.Join(dir, "authed.conf"), "listen: 127.0.0.1:-1\nauthorization { users = [{user: a, password: b}] }\n")
	var w config.InatsWarning
	if err := CheckServerConfig(open); !errors.As(err, &w) || !strings.Contains(w.Msg, "no authentication") {
		t.Errorf("open config: %v, want a no-authentication warning", err)
	}
	if err := CheckServerConfig(authed); err != nil {
		t.Errorf("config with users: %v", err)
	}
}

// nats.leaf_remote: the zero-config server joins a hub as a leaf node (authenticated
// with the URL's user and password here); subjects cross both ways, JetStream stays in
// the site's domain, and with the hub gone the site's own traffic still flows.
func TestLeafRemote(t *testing.T) {
	leafPort := testkit.StablePort(t)
	hub := testnats.Start(t, testnats.Options{Domain: "hub", Configure: func(o *server.Options) {
		o.LeafNode.Host, o.LeafNode.Port = "127.0.0.1", leafPort
		o.LeafNode.Username, o.LeafNode.Password = "leaf", "s3cret"
	}})
	hubNC := testnats.Connect(t, hub)
	sub, err := hubNC.SubscribeSync("fleet.site1.hello")
	if err != nil {
		t.Fatal(err)
	}
	hubNC.Flush()
	remote := fmt.Sprintf("nats-leaf://leaf:s3cret@127.0.0.1:%d", leafPort)

	if _, err := Connect(ctxT(t), natsconn.Options{}, Options{Port: -1, StateDir: t.TempDir(), LeafRemote: remote}, nil); err == nil || !strings.Contains(err.Error(), "jsdomain") {
		t.Fatalf("leaf remote without a JetStream domain: %v", err)
	}
	c := connect(t, natsconn.Options{JSDomain: "site1"}, Options{Port: -1, StateDir: t.TempDir(), LeafRemote: remote, JSDomain: "site1"})
	testkit.EventuallyWithin(t, 30*time.Second, "leaf connection", func() bool { return hub.NumLeafNodes() == 1 })
	testkit.EventuallyWithin(t, 30*time.Second, "site message at the hub", func() bool {
		c.NC.Publish("fleet.site1.hello", []byte("from the site"))
		m, err := sub.NextMsg(200 * time.Millisecond)
		return err == nil && string(m.Data) == "from the site"
	})
	js, err := jetstream.NewWithDomain(c.NC, "site1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.CreateKeyValue(ctxT(t), jetstream.KeyValueConfig{Bucket: "nex-site"}); err != nil {
		t.Fatalf("KV in the site's domain: %v", err)
	}
	if info, err := js.AccountInfo(ctxT(t)); err != nil || info.Domain != "site1" {
		t.Fatalf("site JetStream: domain %v, %v", info, err)
	}

	hub.Shutdown()
	hub.WaitForShutdown()
	roundTrip(t, c.NC)
}

// TestUnparsableLeafRemoteHidesCredentials: a nats.leaf_remote net/url cannot parse is
// refused at start naming the key, with its userinfo hidden. Before, the error (in the
// journal at every failed start) quoted the URL whole, the hub password with it.
func TestUnparsableLeafRemoteHidesCredentials(t *testing.T) {
	const secret = "hub-s3cret"
	_, err := Connect(ctxT(t), natsconn.Options{JSDomain: "site1"}, Options{Port: -1, StateDir: t.TempDir(),
		LeafRemote: "nats-leaf://site:" + secret + "%zz@127.0.0.1:7422", JSDomain: "site1"}, nil)
	if err == nil || !strings.Contains(err.Error(), "nats.leaf_remote nats-leaf://[redacted]@127.0.0.1:7422") ||
		!strings.Contains(err.Error(), "%zz") {
		t.Fatalf("unparsable leaf remote: %v, want refused naming the key, the redacted URL and the bad escape", err)
	}
	if strings.Contains(err.Error(), secret) {
		t.Errorf("the start-up error shows the hub password: %v", err)
	}
}

// TestNodeInboxPrefixKept: the node's connection to an embedded server, the
// zero-config one and an --inats-config one, names its inboxes under the prefix nexd
// gives it (protocol.NodeInboxPrefix, out of every minted user's reach:
// daemon/node TestAttackNexletForgesIntoNodeWatcher), and JetStream works through
// them. The zero-config connection builds its options afresh, and the default node
// runs on it: a prefix dropped there is the watcher attack again, with nothing else
// failing.
func TestNodeInboxPrefixKept(t *testing.T) {
	const prefix = "_INBOX_nexd.tok"
	check := func(what string, c *natsconn.Conn) {
		t.Helper()
		if got := c.NC.NewInbox(); !strings.HasPrefix(got, prefix+".") {
			t.Errorf("%s: the node's inbox %q, want one under %s", what, got, prefix)
		}
		kvWorks(t, c.NC) // its replies come to that prefix
	}
	check("zero-config", connect(t, natsconn.Options{InboxPrefix: prefix}, Options{Port: -1, StateDir: t.TempDir()}))

	dir := t.TempDir()
	conf := filepath.Join(dir, "inats.conf")
	body := fmt.Sprintf("listen: 127.0.0.1:-1\njetstream { store_dir: %q }\n", filepath.Join(dir, "js"))
	if err := os.WriteFile(conf, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	check("--inats-config", connect(t, natsconn.Options{InboxPrefix: prefix}, Options{InatsConfig: conf}))
}
