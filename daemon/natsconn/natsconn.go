// Package natsconn opens a NATS client connection: to external servers (a NATS CLI
// context, servers with creds/nkey/jwt/user/TLS), or in-process to a server that
// package natsembed runs. It never links nats-server itself, so nexctl, which
// only dials, stays small (see deps_test.go).
package natsconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/synadia-io/orbit.go/natscontext"

	"github.com/nexd-project/nexd/internal/natsurl"
)

// DefaultHealthGrace is how long a reconnecting connection still counts as healthy.
const DefaultHealthGrace = 2 * time.Minute

// Options select and authenticate the connection (the --nats.* flags).
type Options struct {
	Context   string // NATS CLI context name (or path to a context JSON file); takes priority
	Servers   []string
	CredsFile string
	Nkey      string // public user nkey (U…), or a file holding a user seed
	Seed      string // user seed (SU…) for nkey or jwt auth
	JWT       string
	User      string
	Password  string
	TLSCert   string
	TLSKey    string
	TLSCA     string
	TLSFirst  bool
	ConnName  string
	JSDomain  string
	Timeout   time.Duration // per-attempt connect timeout (0 = nats.go default)
	// InboxPrefix names the connection's inboxes (nats.CustomInboxPrefix) unless its
	// NATS context sets inbox_prefix; "" keeps nats.go's _INBOX. nexd's node sets
	// protocol.NodeInboxPrefix: workloads may publish to _INBOX.> (to answer), and
	// nats.go's inboxes there are guessable from one the node sent a nexlet.
	InboxPrefix string

	// HealthGrace bounds how long Healthy tolerates reconnecting (0 = 2 min).
	HealthGrace time.Duration
}

// Configured reports whether any NATS connection is configured. When it is not,
// Connect dials nats.DefaultURL, and natsembed.Connect starts its zero-config server.
func Configured(o Options) bool {
	return o.Context != "" || len(o.Servers) > 0 ||
		o.CredsFile != "" || o.Nkey != "" || o.Seed != "" || o.JWT != "" ||
		o.User != "" || o.Password != "" || o.TLSCert != "" || o.TLSKey != "" || o.TLSCA != ""
}

// ConnInfo is the connection state for STATUS and `nexctl status`.
type ConnInfo struct {
	Server      string        `json:"server"` // connected URL, credentials redacted
	Connected   bool          `json:"connected"`
	State       string        `json:"state"` // connected, reconnecting, closed, ...
	Embedded    bool          `json:"embedded"`
	Reconnects  uint64        `json:"reconnects"`
	Disconnects uint64        `json:"disconnects"`
	RTT         time.Duration `json:"rtt"`
	LastError   string        `json:"last_error,omitempty"`
}

// InProcessServer is an in-process NATS server a Conn dials and owns (natsembed
// provides it); an interface so this package does not link nats-server.
type InProcessServer interface {
	nats.InProcessConnProvider
	// Shutdown stops the server and waits for it to finish.
	Shutdown()
}

// Conn is a NATS connection and, when in-process, the server it owns.
type Conn struct {
	NC *nats.Conn

	server     InProcessServer // nil when external
	log        *slog.Logger
	clientURLs []string
	jsDomain   string
	grace      time.Duration

	reconnects     atomic.Uint64
	disconnects    atomic.Uint64
	disconnectedAt atomic.Int64 // unix nanos, 0 while connected
	lastErr        atomic.Pointer[string]
	// violated is closed at the next permissions violation the server reports, then
	// replaced (NextViolation).
	violMu    sync.Mutex
	violated  chan struct{}
	closed    chan struct{}
	closeOnce sync.Once

	// The last RTT probe, which stands for rttFor (probeRTT).
	rttMu sync.Mutex
	rtt   time.Duration
	rttAt time.Time
}

// Connect opens the connection to the external servers o describes (nats.DefaultURL
// when none are). It keeps retrying an unreachable server until ctx ends;
// authentication and configuration errors fail at once. Once connected it
// reconnects forever.
func Connect(ctx context.Context, o Options, log *slog.Logger) (*Conn, error) {
	c := newConn(o, log)
	if err := c.connectExternal(ctx, o); err != nil {
		return nil, err
	}
	return c, nil
}

// ConnectInProcess connects to srv in-process with o's credentials and takes
// ownership of srv: Close shuts it down, and so does a failed connect. Children
// are told to dial clientURLs.
func ConnectInProcess(ctx context.Context, o Options, srv InProcessServer, clientURLs []string, log *slog.Logger) (*Conn, error) {
	c := newConn(o, log)
	c.server = srv
	c.clientURLs = slices.Clone(clientURLs)
	auth, err := authOptions(o)
	if err == nil {
		c.noteCreds(o)
		opts := append(auth, c.commonOptions(o)...)
		opts = append(opts, nats.InProcessServer(srv))
		c.NC, err = c.dialRetrying(ctx, "the in-process server", func() (*nats.Conn, error) { return nats.Connect("", opts...) })
		err = credsRefused(o, err)
	}
	if err != nil {
		c.shutdownServer()
		return nil, err
	}
	return c, nil
}

func newConn(o Options, log *slog.Logger) *Conn {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Conn{log: log, jsDomain: o.JSDomain, grace: o.HealthGrace, closed: make(chan struct{}), violated: make(chan struct{})}
	if c.grace <= 0 {
		c.grace = DefaultHealthGrace
	}
	return c
}

// ExternalClientURLs are the URLs a connection to an external server with o gives its
// children (ClientURLs), known before connecting; false with a NATS context, whose file
// names them (and is read again on every attempt).
func ExternalClientURLs(o Options) ([]string, bool) {
	if o.Context != "" {
		return nil, false
	}
	servers := SplitServers(o.Servers)
	if len(servers) == 0 {
		servers = []string{nats.DefaultURL}
	}
	return servers, true
}

func (c *Conn) connectExternal(ctx context.Context, o Options) error {
	if o.Context != "" {
		return c.connectContext(ctx, o)
	}
	auth, err := authOptions(o)
	if err != nil {
		return err
	}
	c.noteCreds(o)
	servers, _ := ExternalClientURLs(o)
	c.clientURLs = servers
	opts := append(auth, c.commonOptions(o)...)
	url := strings.Join(servers, ",")
	nc, err := c.dialRetrying(ctx, redactList(url), func() (*nats.Conn, error) { return nats.Connect(url, opts...) })
	if err != nil {
		return credsRefused(o, err)
	}
	c.NC = nc
	c.log.Info("connected to NATS", "server", natsurl.Redact(nc.ConnectedUrl()), "servers", natsurl.RedactAll(servers))
	return nil
}

// connectContext dials with a NATS CLI context, by name from the usual place
// ($XDG_CONFIG_HOME/nats/context) or from a file when given a path. The context
// is read on every attempt, so a fixed file is picked up while retrying.
func (c *Conn) connectContext(ctx context.Context, o Options) error {
	name := o.Context
	if strings.ContainsRune(name, os.PathSeparator) || strings.HasSuffix(name, ".json") {
		abs, err := filepath.Abs(name) // natscontext takes absolute names as files
		if err != nil {
			return fmt.Errorf("natsconn: NATS context file %s: %w", name, err)
		}
		name = abs
	}
	opts := c.commonOptions(o)
	var settings natscontext.Settings
	nc, err := c.dialRetrying(ctx, fmt.Sprintf("NATS context %q", o.Context), func() (*nats.Conn, error) {
		nc, s, err := natscontext.Connect(name, opts...)
		settings = s
		return nc, err
	})
	if err != nil {
		return err
	}
	c.NC = nc
	c.clientURLs = SplitServers([]string{settings.URL})
	if len(c.clientURLs) == 0 {
		c.clientURLs = []string{nats.DefaultURL}
	}
	if c.jsDomain == "" {
		c.jsDomain = settings.JSDomain
	}
	c.log.Info("connected to NATS using a NATS context", "context", o.Context,
		"server", natsurl.Redact(nc.ConnectedUrl()), "servers", natsurl.RedactAll(c.clientURLs))
	return nil
}

// dialRetrying dials, retrying with backoff while no server is reachable. what
// names the target in errors and logs, with credentials redacted.
func (c *Conn) dialRetrying(ctx context.Context, what string, dial func() (*nats.Conn, error)) (*nats.Conn, error) {
	for attempt := 0; ; attempt++ {
		nc, err := dial()
		if err == nil {
			return nc, nil
		}
		err = redactURLError(err)
		if !retryable(err) {
			return nil, fmt.Errorf("natsconn: connect to %s: %w", what, err)
		}
		c.setLastErr(err)
		delay := backoff(attempt)
		c.log.Warn("NATS not reachable yet, retrying", "servers", what, "err", err, "retry_in", delay.Round(time.Millisecond))
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("natsconn: connect to %s: gave up: %w (last error: %v)", what, ctx.Err(), err)
		case <-time.After(delay):
		}
	}
}

// redactURLError hides the userinfo of the server URL a parse error quotes: nats.go
// returns net/url's *url.Error, `parse "nats://user:password@host": invalid URL escape`,
// with the URL whole (TestUnparsableServerURLErrorHidesCredentials).
func redactURLError(err error) error {
	var ue *url.Error
	if !errors.As(err, &ue) {
		return err
	}
	return &url.Error{Op: ue.Op, URL: natsurl.Redact(ue.URL), Err: ue.Err}
}

// retryable errors mean "nobody answered"; anything else (auth, TLS, bad URL)
// will not fix itself by waiting.
func retryable(err error) bool {
	// A server URL nats.go cannot parse (*url.Error is a net.Error too).
	if ue := (*url.Error)(nil); errors.As(err, &ue) {
		return false
	}
	var (
		alert tls.AlertError
		verr  *tls.CertificateVerificationError
		uaerr x509.UnknownAuthorityError
		hnerr x509.HostnameError
		cierr x509.CertificateInvalidError
	)
	if errors.As(err, &alert) || errors.As(err, &verr) || errors.As(err, &uaerr) ||
		errors.As(err, &hnerr) || errors.As(err, &cierr) {
		return false
	}
	// crypto/tls reports alerts as net.OpError "remote error" / "local error":
	// a TLS refusal looks like a network error but will not heal by waiting.
	var oe *net.OpError
	if errors.As(err, &oe) && (oe.Op == "remote error" || oe.Op == "local error") {
		return false
	}
	if errors.Is(err, nats.ErrNoServers) || errors.Is(err, nats.ErrTimeout) {
		return true
	}
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	return errors.As(err, &oe)
}

// backoff grows from 250ms to 10s, with up to 50% jitter so a fleet restarted
// together does not reconnect in lockstep.
func backoff(attempt int) time.Duration {
	d := 250 * time.Millisecond << min(attempt, 6)
	d = min(d, 10*time.Second)
	return d/2 + rand.N(d/2+1)
}

// pingInterval is how often an idle connection is checked (see commonOptions).
const pingInterval = 5 * time.Second

// flusherTimeout bounds one socket write to the server (see commonOptions).
const flusherTimeout = 10 * time.Second

// inboxPrefix sets the connection's inbox prefix to p, unless p is "" or a NATS
// context set one already (its options come first): an operator who chose a prefix
// for nexd's user granted that one.
func inboxPrefix(p string) nats.Option {
	return func(o *nats.Options) error {
		if p == "" || o.InboxPrefix != "" {
			return nil
		}
		return nats.CustomInboxPrefix(p)(o)
	}
}

// commonOptions: identity, timeouts, reconnect-forever and the state callbacks.
func (c *Conn) commonOptions(o Options) []nats.Option {
	opts := []nats.Option{
		nats.MaxReconnects(-1),
		// A link that goes silent (a partition, a pulled cable) sends no RST: only
		// unanswered pings reveal it. nats.go's default (2 min, 2 outstanding) left a
		// partitioned node "connected" for minutes; this notices within about 15 s.
		nats.PingInterval(pingInterval),
		nats.MaxPingsOutstanding(2),
		// A write to a server that stopped reading holds the connection's lock, and
		// with it every publish, request and the ping that would notice, until its
		// deadline: nats.go's 1 min froze the node that long. A write cut short closes
		// the socket (a partial protocol op) and reconnects; a write that sent nothing
		// fails its publish, and the pings, no longer starved, find the link stale.
		nats.FlusherTimeout(flusherTimeout),
		// Servers in the order configured: a fleet lists each host's own server first,
		// so a partition of one host does not cut off the others that happened to
		// pick its server (nats.go shuffles by default). The rest are the fallbacks.
		nats.DontRandomize(),
		nats.CustomReconnectDelay(func(attempts int) time.Duration { return backoff(attempts - 1) }),
		inboxPrefix(o.InboxPrefix),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if nc.IsClosed() {
				return // our own Close, not an outage
			}
			c.disconnects.Add(1)
			c.disconnectedAt.CompareAndSwap(0, time.Now().UnixNano())
			if err != nil {
				c.setLastErr(err)
			}
			c.log.Warn("NATS disconnected", "server", natsurl.Redact(nc.ConnectedUrl()), "err", err)
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			c.reconnects.Add(1)
			down := time.Duration(0)
			if at := c.disconnectedAt.Swap(0); at != 0 {
				down = time.Since(time.Unix(0, at))
			}
			c.log.Info("NATS reconnected", "server", natsurl.Redact(nc.ConnectedUrl()), "down_for", down.Round(time.Millisecond), "reconnects", c.reconnects.Load())
		}),
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			c.setLastErr(err)
			if errors.Is(err, nats.ErrPermissionViolation) {
				c.violMu.Lock()
				close(c.violated)
				c.violated = make(chan struct{})
				c.violMu.Unlock()
			}
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			c.log.Warn("NATS async error", "err", err, "subject", subject)
		}),
		nats.ClosedHandler(func(*nats.Conn) {
			c.closeOnce.Do(func() { close(c.closed) })
		}),
	}
	if o.ConnName != "" {
		opts = append(opts, nats.Name(o.ConnName))
	}
	if o.Timeout > 0 {
		opts = append(opts, nats.Timeout(o.Timeout))
	}
	return opts
}

// authOptions builds auth and TLS options from the --nats.* flags. Priority as
// upstream: creds file, then jwt+seed, then nkey+seed, then user+password.
// checkCredsFile reads a creds file as the NATS client will at each connect: a user
// JWT and its user seed. Without the check, a file with no JWT (empty, or the seed
// alone) reached the server as an anonymous login and came back as "nats:
// Authorization Violation", with no word of the file. Its contents are never quoted.
func checkCredsFile(path string) error {
	b, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	defer clear(b)
	tok, err := nkeys.ParseDecoratedJWT(b)
	if err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	if _, err := jwt.DecodeUserClaims(tok); err != nil {
		return fmt.Errorf("%s: no user JWT (-----BEGIN NATS USER JWT-----): %w", path, err)
	}
	kp, err := nkeys.ParseDecoratedUserNKey(b)
	if err != nil {
		return fmt.Errorf("%s: no user seed (-----BEGIN USER NKEY SEED-----): %w", path, err)
	}
	kp.Wipe()
	return nil
}

// CredsInfo is what CheckCredsFile read from a creds file.
type CredsInfo struct {
	User    string    // the JWT's subject (the user's public key)
	Name    string    // the JWT's name
	Expires time.Time // zero: never
}

// CheckCredsFile reads a creds file as nexd --check does: what the client needs at
// each connect (checkCredsFile: a user JWT and a user seed, each decodable) and what
// the server will refuse it for: a seed that is not the JWT's user, a JWT not valid
// yet or expired at now. Errors name the file and what is wrong; its contents are
// never quoted (the JWT's subject is a public key). The start's connect runs it too,
// and takes a JWT not valid now (notValidNow) as a warning: see noteCreds.
func CheckCredsFile(path string, now time.Time) (CredsInfo, error) {
	if err := checkCredsFile(path); err != nil {
		return CredsInfo{}, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return CredsInfo{}, err
	}
	defer clear(b)
	tok, _ := nkeys.ParseDecoratedJWT(b)
	claims, err := jwt.DecodeUserClaims(tok)
	if err != nil {
		return CredsInfo{}, fmt.Errorf("%s: no user JWT: %w", path, err)
	}
	kp, err := nkeys.ParseDecoratedUserNKey(b)
	if err != nil {
		return CredsInfo{}, fmt.Errorf("%s: no user seed: %w", path, err)
	}
	pub, err := kp.PublicKey()
	kp.Wipe()
	if err != nil {
		return CredsInfo{}, fmt.Errorf("%s: user seed: %w", path, err)
	}
	info := CredsInfo{User: claims.Subject, Name: claims.Name}
	if claims.Expires > 0 {
		info.Expires = time.Unix(claims.Expires, 0).UTC()
	}
	switch {
	case pub != claims.Subject:
		return info, fmt.Errorf("%s: the user seed is of user %s, the JWT is of user %s: the server will refuse the login", path, pub, claims.Subject)
	case claims.NotBefore > 0 && now.Before(time.Unix(claims.NotBefore, 0)):
		return info, notValidNow{fmt.Errorf("%s: the user JWT is valid only from %s", path, time.Unix(claims.NotBefore, 0).UTC().Format(time.RFC3339))}
	case !info.Expires.IsZero() && !now.Before(info.Expires):
		return info, notValidNow{fmt.Errorf("%s: the user JWT expired at %s", path, info.Expires.Format(time.RFC3339))}
	}
	return info, nil
}

// notValidNow is CheckCredsFile's error for a JWT that is not valid at the time asked
// (expired, or valid only later): a file renewed in place may be valid by the time
// the server answers.
type notValidNow struct{ error }

func (e notValidNow) Unwrap() error { return e.error }

// The start's reading of a creds file (nats.creds_file), decided with renewal in place
// in mind: nats.go reads the file again at every connect attempt, and nexd retries the
// connect for as long as no server answers, so a rotation tool that renews an expired
// file while the server is still coming up (a boot) has nexd connect with the new one.
// What no wait mends fails the start at once, naming the file and the fault (its seed
// not the JWT's user's, or no JWT or seed: CheckCredsFile). A JWT not valid now (expired
// or not yet valid) is a warning naming the file and when, and the connect goes on; if
// the server then refuses the login, the error names the file and what is wrong with
// it then. Before, the start checked only that a JWT and a seed were there, and a file
// with another user's seed or an expired JWT failed as the server's bare
// "Authorization Violation" or "authentication expired" (TestStartNamesBadCredsFile).

// noteCreds warns of a creds file whose JWT is not valid now; the connect goes on.
func (c *Conn) noteCreds(o Options) {
	if o.CredsFile == "" {
		return
	}
	if _, err := CheckCredsFile(o.CredsFile, time.Now()); err != nil {
		c.log.Warn("the NATS creds file's JWT is not valid now; connecting with the file as it is at each attempt, so a renewal in place is taken",
			"file", o.CredsFile, "err", err)
	}
}

// credsRefused names the creds file and what is wrong with it now in err, a connect
// the server refused for its credentials; err unchanged otherwise.
func credsRefused(o Options, err error) error {
	if o.CredsFile == "" || !(errors.Is(err, nats.ErrAuthorization) || errors.Is(err, nats.ErrAuthExpired) ||
		errors.Is(err, nats.ErrAuthRevoked)) {
		return err
	}
	if _, ferr := CheckCredsFile(o.CredsFile, time.Now()); ferr != nil {
		return fmt.Errorf("%w: --nats.creds-file %v", err, ferr)
	}
	return fmt.Errorf("%w (with --nats.creds-file %s)", err, o.CredsFile)
}

func authOptions(o Options) ([]nats.Option, error) {
	var opts []nats.Option
	switch {
	case o.CredsFile != "":
		// A JWT not valid now is noteCreds' warning, not an error: see there.
		if _, err := CheckCredsFile(o.CredsFile, time.Now()); err != nil && !errors.As(err, new(notValidNow)) {
			return nil, fmt.Errorf("natsconn: --nats.creds-file: %w", err)
		}
		opts = append(opts, nats.UserCredentials(o.CredsFile))
	case o.JWT != "":
		if o.Seed == "" {
			return nil, errors.New("natsconn: --nats.jwt needs --nats.seed (the user seed that signs the server's nonce)")
		}
		if _, err := userKey(o.Seed); err != nil {
			return nil, err
		}
		opts = append(opts, nats.UserJWTAndSeed(o.JWT, o.Seed))
	case o.Nkey != "" || o.Seed != "":
		opt, err := nkeyOption(o.Nkey, o.Seed)
		if err != nil {
			return nil, err
		}
		opts = append(opts, opt)
	case o.User != "":
		opts = append(opts, nats.UserInfo(o.User, o.Password))
	case o.Password != "":
		return nil, errors.New("natsconn: --nats.password needs --nats.user")
	}
	if (o.TLSCert == "") != (o.TLSKey == "") {
		return nil, errors.New("natsconn: --nats.tlscert and --nats.tlskey must be given together")
	}
	if o.TLSCert != "" {
		opts = append(opts, nats.ClientCert(o.TLSCert, o.TLSKey))
	}
	if o.TLSCA != "" {
		opts = append(opts, nats.RootCAs(o.TLSCA))
	}
	if o.TLSFirst {
		opts = append(opts, nats.TLSHandshakeFirst())
	}
	return opts, nil
}

func userKey(seed string) (nkeys.KeyPair, error) {
	seed = strings.TrimSpace(seed)
	p, _, err := nkeys.DecodeSeed([]byte(seed))
	if err != nil {
		return nil, fmt.Errorf("natsconn: --nats.seed: not an nkey seed: %w", err)
	}
	if p != nkeys.PrefixByteUser {
		return nil, fmt.Errorf("natsconn: --nats.seed: want a user seed (SU…), got a %s seed", p)
	}
	kp, err := nkeys.FromSeed([]byte(seed))
	if err != nil {
		return nil, fmt.Errorf("natsconn: --nats.seed: %w", err)
	}
	return kp, nil
}

// nkeyOption: a public user nkey with its seed (the seed alone also works, the
// public key is derived), or --nats.nkey naming a seed file.
func nkeyOption(pub, seed string) (nats.Option, error) {
	if seed == "" {
		if _, err := os.Stat(pub); err == nil {
			opt, err := nats.NkeyOptionFromSeed(pub)
			if err != nil {
				return nil, fmt.Errorf("natsconn: --nats.nkey seed file %s: %w", pub, err)
			}
			return opt, nil
		}
		return nil, fmt.Errorf("natsconn: --nats.nkey %s needs --nats.seed (or must name a seed file)", shownKey(pub))
	}
	kp, err := userKey(seed)
	if err != nil {
		return nil, err
	}
	derived, err := kp.PublicKey()
	if err != nil {
		return nil, fmt.Errorf("natsconn: --nats.seed: %w", err)
	}
	if pub != "" && pub != derived {
		return nil, fmt.Errorf("natsconn: --nats.nkey %s does not belong to --nats.seed (its public key is %s)", shownKey(pub), derived)
	}
	return nats.Nkey(derived, func(nonce []byte) ([]byte, error) { return kp.Sign(nonce) }), nil
}

// shownKey is an --nats.nkey value fit for an error: a public key or a file name as
// given, never a seed put there by mistake.
func shownKey(s string) string {
	if _, _, err := nkeys.DecodeSeed([]byte(strings.TrimSpace(s))); err == nil {
		return "(a seed, which belongs in --nats.seed)"
	}
	return strconv.Quote(s)
}

func (c *Conn) setLastErr(err error) {
	s := err.Error()
	c.lastErr.Store(&s)
}

// NextViolation is closed when the server next reports a permissions violation on the
// connection (nats.ErrPermissionViolation, then the connection's LastError): nats.go
// tells only the error handler, and a refused request waits out its timeout.
func (c *Conn) NextViolation() <-chan struct{} {
	c.violMu.Lock()
	defer c.violMu.Unlock()
	return c.violated
}

// Connected reports whether the connection is up, without Info's round trip to the
// server (its RTT): the status line, which READY=1 carries, needs only this.
func (c *Conn) Connected() bool { return c.NC != nil && c.NC.IsConnected() }

// Info snapshots the connection state, with the RTT of a round trip to the server at
// most rttFor old.
func (c *Conn) Info() ConnInfo {
	ci := ConnInfo{
		Embedded:    c.server != nil,
		Reconnects:  c.reconnects.Load(),
		Disconnects: c.disconnects.Load(),
	}
	if e := c.lastErr.Load(); e != nil {
		ci.LastError = *e
	}
	if c.NC == nil {
		ci.State = "closed"
		return ci
	}
	ci.State = strings.ToLower(c.NC.Status().String())
	ci.Connected = c.NC.IsConnected()
	if ci.Connected {
		ci.Server = natsurl.Redact(c.NC.ConnectedUrl())
		if c.server != nil && len(c.clientURLs) > 0 {
			// The node talks to its own server in-process; the pool's URL is a
			// placeholder, so name the server by the URL children use.
			ci.Server = natsurl.Redact(c.clientURLs[0])
		}
		ci.RTT = c.probeRTT()
	}
	return ci
}

// rttFor is how long an RTT probe's result stands for the callers after it.
const rttFor = time.Second

// probeRTT measures the round trip to the server (0 when the probe fails), at most once
// per rttFor: a local user may call the public status as often as she likes, and each
// call made a round trip (TestInfoProbesRTTOncePerWindow). Callers meanwhile get the
// last result, and those that come while a probe is under way wait for it.
func (c *Conn) probeRTT() time.Duration {
	c.rttMu.Lock()
	defer c.rttMu.Unlock()
	if !c.rttAt.IsZero() && time.Since(c.rttAt) < rttFor {
		return c.rtt
	}
	start := time.Now()
	c.rtt = 0
	if err := c.NC.FlushTimeout(time.Second); err == nil {
		c.rtt = time.Since(start)
	}
	c.rttAt = time.Now()
	return c.rtt
}

// Reconnects is how many times the connection reconnected (Info without its probe).
func (c *Conn) Reconnects() uint64 { return c.reconnects.Load() }

// Healthy reports whether the connection is up, or reconnecting for less than the
// grace period.
func (c *Conn) Healthy() bool {
	if c.NC == nil {
		return false
	}
	if c.NC.IsConnected() {
		return true
	}
	if !c.NC.IsReconnecting() {
		return false
	}
	at := c.disconnectedAt.Load()
	return at != 0 && time.Since(time.Unix(0, at)) < c.grace
}

// ClientURLs are the URLs children (nexlets, workloads) connect to: the configured
// servers, or the embedded server's real client URL (then any configured servers).
func (c *Conn) ClientURLs() []string { return slices.Clone(c.clientURLs) }

// JSDomain is the JetStream domain to use (--nats.jsdomain, else the context's).
func (c *Conn) JSDomain() string { return c.jsDomain }

// Close drains the connection (bounded by ctx), then shuts the in-process server
// down and waits for it.
func (c *Conn) Close(ctx context.Context) {
	if c.NC != nil && !c.NC.IsClosed() {
		if err := c.NC.Drain(); err != nil {
			c.log.Warn("NATS drain failed, closing", "err", err)
			c.NC.Close()
		}
		select {
		case <-c.closed:
		case <-ctx.Done():
			c.log.Warn("NATS drain did not finish in time, closing", "err", ctx.Err())
			c.NC.Close()
		}
	}
	c.shutdownServer()
}

// InProcess is the in-process server the connection owns, nil when external.
func (c *Conn) InProcess() InProcessServer { return c.server }

func (c *Conn) shutdownServer() {
	if c.server != nil {
		c.server.Shutdown()
	}
}

// SplitServers flattens server lists that may hold comma-separated URLs.
func SplitServers(in []string) []string {
	var out []string
	for _, s := range in {
		for _, p := range strings.Split(s, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

func redactList(list string) string {
	return strings.Join(natsurl.RedactAll(strings.Split(list, ",")), ",")
}
