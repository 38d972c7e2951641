package mint

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nexd-project/nexd/internal/testnats"
	"github.com/nexd-project/nexd/protocol"
)

const waitLong = 15 * time.Second

// opEnv is a real nats-server in operator/JWT mode with one application account that has
// a signing key, JetStream enabled, and a system account.
type opEnv struct {
	s        *server.Server
	sysKP    nkeys.KeyPair
	opKP     nkeys.KeyPair
	accKP    nkeys.KeyPair
	accPub   string
	sigSeed  string
	resolver server.AccountResolver
	op       *testnats.Operator
}

func mustKP(t *testing.T, create func() (nkeys.KeyPair, error)) (nkeys.KeyPair, string) {
	t.Helper()
	kp, err := create()
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		t.Fatal(err)
	}
	return kp, pub
}

func startOperator(t *testing.T) *opEnv { return startOperatorWith(t, &server.MemAccResolver{}) }

func startOperatorWith(t *testing.T, res server.AccountResolver) *opEnv {
	t.Helper()
	o := testnats.StartOperator(t, res)
	return &opEnv{s: o.Server, sysKP: o.SystemKP, opKP: o.OperatorKP, accKP: o.AccountKP, accPub: o.Account,
		sigSeed: o.SigningSeed, resolver: o.Resolver, op: o}
}

// admin connects as an unrestricted user of the application account.
func (e *opEnv) admin(t *testing.T) *nats.Conn { return e.userOf(t, e.accKP) }

// userOf connects as an unrestricted user of the account of accKP.
func (e *opEnv) userOf(t *testing.T, accKP nkeys.KeyPair) *nats.Conn {
	t.Helper()
	tok, seed := e.op.User(t, "admin", accKP)
	return testnats.Connect(t, e.s, nats.UserJWTAndSeed(tok, seed), nats.Name("admin"))
}

// client is a connection made from minted connection data, recording the asynchronous
// permission errors and the closing of the connection.
type client struct {
	nc     *nats.Conn
	errs   chan error
	closed chan struct{}
}

func connectOpts(t *testing.T, cd protocol.NatsConnectionData) []nats.Option {
	t.Helper()
	opts := []nats.Option{nats.Name(cd.ConnName)}
	switch {
	case cd.NatsUserJWT != "":
		opts = append(opts, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed))
	case cd.NatsUserNkey != "":
		kp, err := nkeys.FromSeed([]byte(cd.NatsUserSeed))
		if err != nil {
			t.Fatal(err)
		}
		opts = append(opts, nats.Nkey(cd.NatsUserNkey, kp.Sign))
	}
	if cd.InboxPrefix != "" {
		opts = append(opts, nats.CustomInboxPrefix(cd.InboxPrefix))
	}
	return opts
}

func dial(t *testing.T, url string, cd protocol.NatsConnectionData) (*client, error) {
	t.Helper()
	c := &client{errs: make(chan error, 64), closed: make(chan struct{})}
	opts := append(connectOpts(t, cd),
		nats.NoReconnect(),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case c.errs <- err:
			default:
			}
		}),
		nats.ClosedHandler(func(*nats.Conn) { close(c.closed) }),
	)
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, err
	}
	c.nc = nc
	t.Cleanup(nc.Close)
	return c, nil
}

func mustDial(t *testing.T, url string, cd protocol.NatsConnectionData) *client {
	t.Helper()
	c, err := dial(t, url, cd)
	if err != nil {
		t.Fatalf("connect with %s: %v", cd.ConnName, err)
	}
	return c
}

// waitDenied waits for the server's permission violation for op ("publish" or
// "subscription") on subject.
func (c *client) waitDenied(t *testing.T, op, subject string) {
	t.Helper()
	want := strings.ToLower("permissions violation for " + op + " to \"" + subject + "\"")
	deadline := time.After(waitLong)
	for {
		select {
		case err := <-c.errs:
			if strings.Contains(strings.ToLower(err.Error()), want) {
				return
			}
		case <-deadline:
			t.Fatalf("no permissions violation for %s to %q", op, subject)
		}
	}
}

// canPublish: a message published by c on subject reaches the admin.
func canPublish(t *testing.T, admin *nats.Conn, c *client, subject string) {
	t.Helper()
	sub, err := admin.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := admin.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := c.nc.Publish(subject, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(waitLong); err != nil {
		t.Fatalf("publish to %s did not arrive: %v", subject, err)
	}
}

// cannotPublish: the server refuses c's publish on subject.
func cannotPublish(t *testing.T, c *client, subject string) {
	t.Helper()
	if err := c.nc.Publish(subject, []byte("x")); err != nil {
		t.Fatal(err)
	}
	c.waitDenied(t, "publish", subject)
}

// canSubscribe: c subscribed on subject receives what the admin publishes to pubSubject.
func canSubscribe(t *testing.T, admin *nats.Conn, c *client, subject, pubSubject string) {
	t.Helper()
	sub, err := c.nc.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := c.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := admin.Publish(pubSubject, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	if _, err := sub.NextMsg(waitLong); err != nil {
		t.Fatalf("subscription %s got nothing on %s: %v", subject, pubSubject, err)
	}
}

// cannotSubscribe: the server refuses c's subscription on subject.
func cannotSubscribe(t *testing.T, c *client, subject string) {
	t.Helper()
	sub, err := c.nc.SubscribeSync(subject)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	c.waitDenied(t, "subscription", subject)
}

// canRespond: c answers a request the admin sends on subject.
func canRespond(t *testing.T, admin *nats.Conn, c *client, subject string) {
	t.Helper()
	sub, err := c.nc.Subscribe(subject, func(m *nats.Msg) { _ = m.Respond([]byte("pong")) })
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := c.nc.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), waitLong)
	defer cancel()
	m, err := admin.RequestWithContext(ctx, subject, []byte("ping"))
	if err != nil || string(m.Data) != "pong" {
		t.Fatalf("request on %s: %v", subject, err)
	}
}
