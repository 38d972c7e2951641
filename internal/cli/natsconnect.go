package cli

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/daemon/natsconn"
)

// defaultNATSURL is used when neither a context nor servers are given: nexctl never
// starts an embedded server, it talks to the local one.
const defaultNATSURL = "nats://127.0.0.1:4222"

// natsFlags are the --nats.* connection flags, shared in name and meaning with nexd.
type natsFlags struct {
	Context   string
	Servers   []string
	CredsFile string
	Nkey      string
	Seed      string
	JWT       string
	User      string
	Password  string
	TLSCert   string
	TLSKey    string
	TLSCA     string
	TLSFirst  bool
	ConnName  string
	JSDomain  string
	Timeout   time.Duration
}

func (n *natsFlags) register(fs *pflag.FlagSet, env func(string) string) {
	fs.StringVar(&n.Context, "nats.context", env("NATS_CONTEXT"), "NATS CLI context to connect with; wins over the other --nats flags")
	fs.StringSliceVarP(&n.Servers, "nats.servers", "s", nil, "NATS server URLs (default "+defaultNATSURL+")")
	fs.StringVar(&n.CredsFile, "nats.creds-file", "", "NATS credentials file")
	fs.StringVar(&n.Nkey, "nats.nkey", "", "public user nkey (with --nats.seed)")
	fs.StringVar(&n.Seed, "nats.seed", "", "user seed for --nats.nkey or --nats.jwt")
	fs.StringVar(&n.JWT, "nats.jwt", "", "user JWT (with --nats.seed)")
	fs.StringVar(&n.User, "nats.user", "", "NATS user name")
	fs.StringVar(&n.Password, "nats.password", "", "NATS password")
	fs.StringVar(&n.TLSCert, "nats.tlscert", "", "TLS client certificate")
	fs.StringVar(&n.TLSKey, "nats.tlskey", "", "TLS client key")
	fs.StringVar(&n.TLSCA, "nats.tlsca", "", "TLS CA certificate")
	fs.BoolVar(&n.TLSFirst, "nats.tlsfirst", false, "TLS handshake before the NATS protocol")
	fs.StringVar(&n.ConnName, "nats.conn-name", "nexctl", "connection name shown by the server")
	fs.StringVar(&n.JSDomain, "nats.jsdomain", "", "JetStream domain of the node state buckets")
	fs.DurationVar(&n.Timeout, "nats.timeout", 5*time.Second, "connect timeout, and how long to wait for a first reply")
}

// connect opens the NATS connection through the node's own connection package, so
// contexts, creds, nkeys and TLS behave as in nexd. nexctl never starts an embedded
// server: without a context or servers it dials 127.0.0.1:4222. An unreachable server
// is retried until --nats.timeout has passed.
func (n *natsFlags) connect(ctx context.Context) (*natsconn.Conn, error) {
	o := natsconn.Options{
		Context: n.Context, Servers: n.Servers, CredsFile: n.CredsFile, Nkey: n.Nkey, Seed: n.Seed,
		JWT: n.JWT, User: n.User, Password: n.Password, TLSCert: n.TLSCert, TLSKey: n.TLSKey,
		TLSCA: n.TLSCA, TLSFirst: n.TLSFirst, ConnName: n.ConnName, JSDomain: n.JSDomain, Timeout: n.Timeout,
	}
	if o.Context == "" && len(o.Servers) == 0 {
		o.Servers = []string{defaultNATSURL}
	}
	cctx, cancel := context.WithTimeout(ctx, n.Timeout)
	defer cancel()
	c, err := natsconn.Connect(cctx, o, slog.New(slog.DiscardHandler))
	if err != nil {
		return nil, fmt.Errorf("connect to NATS: %w", err)
	}
	return c, nil
}
