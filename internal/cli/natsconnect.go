package cli

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"

	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/natsurl"
)

// defaultNATSURL is used when nothing names a NATS system and no local node answers:
// nexctl never starts an embedded server.
const defaultNATSURL = "nats://127.0.0.1:4222"

// natsFlags are the --nats.* connection flags, shared in name and meaning with nexd.
// Only flags given on the command line count; the rest comes from resolve.
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

func (n *natsFlags) register(fs *pflag.FlagSet) {
	fs.StringVar(&n.Context, "nats.context", "", "NATS CLI context to connect with (env NATS_CONTEXT; default: the selected one)")
	fs.StringSliceVarP(&n.Servers, "nats.servers", "s", nil, "NATS server URLs (env NATS_URL; default: the local node's, else "+defaultNATSURL+")")
	fs.StringVar(&n.CredsFile, "nats.creds-file", "", "NATS credentials file (env NATS_CREDS)")
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

// applyChanged puts the flags given on the command line over o.
func (n *natsFlags) applyChanged(fs *pflag.FlagSet, o *natsconn.Options, origins map[string]string) {
	set := func(flag, key string, apply func()) {
		if f := fs.Lookup(flag); f != nil && f.Changed {
			apply()
			origins[key] = "flag --" + flag
		}
	}
	set("nats.context", "nats.context", func() { o.Context = n.Context })
	set("nats.servers", "nats.servers", func() { o.Servers = n.Servers })
	set("nats.creds-file", "nats.creds_file", func() { o.CredsFile = n.CredsFile })
	set("nats.nkey", "nats.nkey", func() { o.Nkey = n.Nkey })
	set("nats.seed", "nats.seed", func() { o.Seed = n.Seed })
	set("nats.jwt", "nats.jwt", func() { o.JWT = n.JWT })
	set("nats.user", "nats.user", func() { o.User = n.User })
	set("nats.password", "nats.password", func() { o.Password = n.Password })
	set("nats.tlscert", "nats.tlscert", func() { o.TLSCert = n.TLSCert })
	set("nats.tlskey", "nats.tlskey", func() { o.TLSKey = n.TLSKey })
	set("nats.tlsca", "nats.tlsca", func() { o.TLSCA = n.TLSCA })
	set("nats.tlsfirst", "nats.tlsfirst", func() { o.TLSFirst = n.TLSFirst })
	set("nats.conn-name", "nats.conn_name", func() { o.ConnName = n.ConnName })
	set("nats.jsdomain", "nats.jsdomain", func() { o.JSDomain = n.JSDomain })
	set("nats.timeout", "nats.timeout", func() { o.Timeout = n.Timeout })
}

// connect opens the NATS connection through the node's own connection package, so
// contexts, creds, nkeys and TLS behave as in nexd. An unreachable server is retried
// until the timeout has passed.
func connectNATS(ctx context.Context, o natsconn.Options) (*natsconn.Conn, error) {
	if o.Context == "" && len(o.Servers) == 0 {
		o.Servers = []string{defaultNATSURL}
	}
	cctx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	c, err := natsconn.Connect(cctx, o, slog.New(slog.DiscardHandler))
	if err != nil && ctx.Err() == nil && errors.Is(err, context.DeadlineExceeded) {
		where := "NATS context " + o.Context
		if len(o.Servers) > 0 {
			where = strings.Join(natsurl.RedactAll(o.Servers), ", ")
		}
		return nil, fmt.Errorf("connect to NATS: no server answered at %s within %s (--nats.timeout%s): is it running? name it with -s/--nats.servers, NATS_URL or --nats.context: %w", where, o.Timeout, dialReason(ctx, o.Servers), err)
	}
	if err != nil {
		return nil, fmt.Errorf("connect to NATS: %w", err)
	}
	return c, nil
}

// dialReason is why the first server's address refuses a TCP connection ("; connection
// refused"), "" when it accepts one or is not a host:port: nats.go reports every failed
// dial as "no servers available".
func dialReason(ctx context.Context, servers []string) string {
	if len(servers) == 0 {
		return ""
	}
	first, _, _ := strings.Cut(servers[0], ",")
	u, err := url.Parse(strings.TrimSpace(first))
	if err != nil || u.Host == "" || (u.Scheme != "nats" && u.Scheme != "tls") {
		return ""
	}
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), "4222")
	}
	dctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	c, err := (&net.Dialer{}).DialContext(dctx, "tcp", host)
	if err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return "; " + errno.Error()
		}
		return "; " + err.Error()
	}
	c.Close()
	return ""
}
