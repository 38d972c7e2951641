// Package natsembed runs the node's in-process nats-server, either from an
// --inats-config file or, with no NATS configured at all, a zero-config server on
// 127.0.0.1 with JetStream so a lone `nexd` works, and connects to it through
// natsconn. Only nexd links it: nexctl dials with natsconn alone.
package natsembed

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/jwt/v2"
	"github.com/nats-io/nats-server/v2/server"

	"github.com/nexd-project/nexd/daemon/config"
	"github.com/nexd-project/nexd/daemon/natsconn"
	"github.com/nexd-project/nexd/internal/natsurl"
)

// DefaultPort is where the zero-config embedded server listens.
const DefaultPort = 4222

// readyTimeout bounds how long an embedded server may take to accept clients;
// JetStream recovering a large store can take a while.
const readyTimeout = 60 * time.Second

// Options select the embedded server.
type Options struct {
	InatsConfig string // nats-server config file (--inats-config)
	StateDir    string // JetStream store
	Port        int    // zero-config port: 0 = 4222, -1 = random (tests)
	// LeafRemote makes the zero-config server a leaf node of this hub URL, binding the
	// nex account to the hub account LeafCreds (a credentials file) authenticates as.
	// JSDomain is then the server's own JetStream domain, so state stays on the site.
	LeafRemote, LeafCreds, JSDomain string
}

// Connect opens the node's connection: to the --inats-config server, to a
// zero-config server when client configures no NATS at all, else to the external
// servers client names (natsconn.Connect).
func Connect(ctx context.Context, client natsconn.Options, o Options, log *slog.Logger) (*natsconn.Conn, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	switch {
	case o.InatsConfig != "":
		return connectInats(ctx, client, o, log)
	case !natsconn.Configured(client):
		return connectZeroConfig(ctx, client, o, log)
	default:
		return natsconn.Connect(ctx, client, log)
	}
}

// ExternalClientURLs are the URLs Connect's connection gives its children, when known
// before connecting: an external server named in the configuration (not an embedded
// one, not a NATS context).
func ExternalClientURLs(client natsconn.Options, o Options) ([]string, bool) {
	if o.InatsConfig != "" || !natsconn.Configured(client) {
		return nil, false
	}
	return natsconn.ExternalClientURLs(client)
}

// Server is a running in-process nats-server; a natsconn.Conn owns it.
type Server struct {
	s         *server.Server
	log       *slog.Logger
	tempStore string // removed on Shutdown
	trust     *Trust // the zero-config server's operator setup; nil for --inats-config
	leafs     int    // leaf node remotes it was configured with
	once      sync.Once
	// The store's watch (storeheal.go): stopWatch ends it, watch waits for it.
	stopWatch chan struct{}
	watch     sync.WaitGroup
}

// Leafs is how many leaf node remotes the server was configured with and how many
// leaf connections it has now: a site cut off from its hub still answers its own
// clients, and this is what shows the cut.
func (s *Server) Leafs() (remotes, connected int) { return s.leafs, s.s.NumLeafNodes() }

// Trust is the zero-config server's operator/JWT setup (nil for --inats-config).
func (s *Server) Trust() *Trust { return s.trust }

// InProcessConn lets natsconn dial the server without a socket.
func (s *Server) InProcessConn() (net.Conn, error) { return s.s.InProcessConn() }

// NATS is the underlying server, for inspection (tests, monitoring).
func (s *Server) NATS() *server.Server { return s.s }

// Shutdown stops the server, waits for it and removes a temporary store.
func (s *Server) Shutdown() {
	s.once.Do(func() {
		if s.stopWatch != nil {
			close(s.stopWatch)
			s.watch.Wait()
		}
		// The watch saves an unsaved account JWT every 5 s only: room may have come
		// since its last look, and the next start would forget its revocations.
		if s.trust != nil {
			if waiting, err := s.trust.saveAccount(); waiting {
				s.log.Error("the nex account JWT could not be saved at shutdown: the user revocations made since it was last saved are forgotten at the next start (until the users' credentials expire)", "err", err)
			}
		}
		s.s.Shutdown()
		s.s.WaitForShutdown()
		s.log.Info("embedded NATS server stopped")
		if s.tempStore != "" {
			if err := os.RemoveAll(s.tempStore); err != nil {
				s.log.Warn("removing temporary JetStream store", "dir", s.tempStore, "err", err)
			}
		}
	})
}

// connectInats runs the server an --inats-config file describes and connects to
// it in-process with the --nats.* credentials. Children get the server's real
// client URL, then any configured --nats.servers (e.g. the rest of a cluster).
func connectInats(ctx context.Context, client natsconn.Options, o Options, log *slog.Logger) (*natsconn.Conn, error) {
	sopts, err := server.ProcessConfigFile(o.InatsConfig)
	if err != nil {
		return nil, fmt.Errorf("natsembed: --inats-config %s: %w", o.InatsConfig, err)
	}
	sopts.NoSigs = true // signals belong to nexd
	if sopts.JetStream && sopts.StoreDir == "" && o.StateDir != "" {
		sopts.StoreDir = o.StateDir // <state>/jetstream rather than a temp dir
	}
	srv, err := start(ctx, sopts, "--inats-config "+o.InatsConfig, log)
	if err != nil {
		return nil, err
	}
	srv.watchStore()
	urls := []string{}
	if u := srv.realClientURL(); u != "" {
		urls = append(urls, u)
	}
	for _, s := range natsconn.SplitServers(client.Servers) {
		if !slices.Contains(urls, s) {
			urls = append(urls, s)
		}
	}
	if len(urls) == 0 {
		srv.Shutdown()
		return nil, fmt.Errorf("natsembed: --inats-config %s: the server does not listen for clients and no --nats.servers are given, so nexlets could not connect", o.InatsConfig)
	}
	c, err := natsconn.ConnectInProcess(ctx, client, srv, urls, log)
	if err != nil {
		return nil, err
	}
	log.Info("embedded NATS server started from config file", "config", o.InatsConfig,
		"client_url", urls[0], "jetstream", srv.s.JetStreamEnabled())
	return c, nil
}

// connectZeroConfig runs a local server on 127.0.0.1 with JetStream, so a node
// with no NATS configured works on its own (KV state, events, agent health).
func connectZeroConfig(ctx context.Context, client natsconn.Options, o Options, log *slog.Logger) (*natsconn.Conn, error) {
	srv, store, tempStore, err := startZeroConfig(ctx, o, log)
	if err != nil {
		return nil, err
	}
	trust := srv.trust
	url := srv.realClientURL()
	// The node's own user: every subject, no expiry, in-process connections only (it
	// is useless to anyone who might read it).
	nodeJWT, nodeSeed, err := trust.User("nexd-node", 0, jwt.ConnectionTypeInProcess)
	if err != nil {
		srv.Shutdown()
		return nil, err
	}
	// Only the connection's own knobs apply: nothing else is configured here.
	inproc := natsconn.Options{ConnName: client.ConnName, JSDomain: client.JSDomain,
		Timeout: client.Timeout, HealthGrace: client.HealthGrace, InboxPrefix: client.InboxPrefix, JWT: nodeJWT, Seed: nodeSeed}
	c, err := natsconn.ConnectInProcess(ctx, inproc, srv, []string{url}, log)
	if err != nil {
		return nil, err
	}
	// Why there is no other server is the configuration's warning, logged before: this
	// says where this one is, not again that none was configured.
	log.Info("embedded NATS server serving (operator mode: every client needs a user JWT signed by nexd)",
		"client_url", url, "account", trust.AccountPub(), "jetstream_store", filepath.Join(store, server.JetStreamStoreDir),
		"persistent", tempStore == "")
	if o.LeafRemote != "" {
		log.Info("embedded NATS server is a leaf node", "hub", natsurl.Redact(o.LeafRemote), "js_domain", o.JSDomain, "creds", o.LeafCreds)
	}
	return c, nil
}

// startZeroConfig runs the zero-config server (operator mode, the node's own keys)
// and returns it with its store directory and, when the store is temporary, that.
func startZeroConfig(ctx context.Context, o Options, log *slog.Logger) (*Server, string, string, error) {
	port := o.Port
	if port == 0 {
		port = DefaultPort
	}
	if port == -1 {
		// "Any free port": the one the previous start used when it is free, so that
		// nexlets which outlived that nexd find the server again.
		port = lastPort(o.StateDir)
	}
	store, tempStore := o.StateDir, ""
	if store != "" {
		if err := os.MkdirAll(filepath.Join(store, server.JetStreamStoreDir), 0o700); err != nil {
			return nil, "", "", fmt.Errorf("natsembed: JetStream store in state directory: %w", err)
		}
	} else {
		tmp, err := os.MkdirTemp("", "nexd-nats-")
		if err != nil {
			return nil, "", "", fmt.Errorf("natsembed: temporary JetStream store: %w", err)
		}
		store, tempStore = tmp, tmp
	}
	sopts := &server.Options{
		ServerName: "nexd",
		Host:       "127.0.0.1",
		Port:       port,
		NoSigs:     true,
		JetStream:  true,
		StoreDir:   store, // nats-server adds /jetstream
	}
	// Never open: operator mode with keys of the node's own, so that every client
	// needs a user JWT nexd signed.
	trust, err := loadOrCreateTrust(o.StateDir)
	if err == nil {
		err = trust.configure(sopts)
	}
	if err == nil && o.LeafRemote != "" {
		err = leafRemote(sopts, o, trust.AccountPub())
	}
	if err != nil {
		if tempStore != "" {
			os.RemoveAll(tempStore)
		}
		return nil, "", "", err
	}
	// The nex account is registered before the server starts, which then sets up its
	// JetStream before it accepts a connection. Looked up lazily, its JetStream was set
	// up by the first connection to name it, and nats-server publishes an account's
	// JetStream before it removes the empty streams directory its check made: a leaf
	// connection and nexd's own looking it up at once lost nexd's first KV create
	// ("could not create storage directory", TestAccountJetStreamReadyBeforeAnyConnection).
	srv, err := start(ctx, sopts, "embedded NATS on 127.0.0.1:"+portString(port), log, trust.AccountPub())
	if err != nil {
		if tempStore != "" {
			os.RemoveAll(tempStore)
		}
		return nil, "", "", portTakenError(err, port)
	}
	srv.tempStore = tempStore
	srv.trust = trust
	srv.watchStore()
	if o.Port == -1 && o.StateDir != "" {
		if addr, ok := srv.s.Addr().(*net.TCPAddr); ok {
			_ = os.WriteFile(filepath.Join(o.StateDir, portFile), []byte(strconv.Itoa(addr.Port)), 0o600)
		}
	}
	trust.mu.Lock()
	trust.srv = srv.s
	trust.mu.Unlock()
	return srv, store, tempStore, nil
}

// Ping settings of a leaf site's embedded server (they apply to its local clients too,
// which answer pings from their read loop).
const (
	leafPingInterval = 5 * time.Second
	leafMaxPingsOut  = 3
)

// leafRemote joins the hub at o.LeafRemote: nexlets and workloads keep talking to the
// local server when the WAN is down, and the fleet's subjects reach the hub when it
// is up. The site's JetStream domain keeps JetStream requests on the site's server.
func leafRemote(sopts *server.Options, o Options, account string) error {
	u, err := url.Parse(o.LeafRemote)
	if err != nil {
		// Not err itself: net/url's error quotes the URL whole, userinfo and all.
		if ue := (*url.Error)(nil); errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("natsembed: nats.leaf_remote %s is not a URL: %w", natsurl.Redact(o.LeafRemote), err)
	}
	if o.JSDomain == "" {
		return fmt.Errorf("natsembed: nats.leaf_remote needs nats.jsdomain, the site's own JetStream domain")
	}
	if u.Scheme == "nats-leaf" {
		u.Scheme = "nats" // the leafnode port speaks the nats scheme to the server's client code
	}
	sopts.JetStreamDomain = o.JSDomain
	// The leaf connection is pinged at the server's interval (2 min by default, so a
	// silent WAN link went unnoticed for minutes); with these a cut shows (STATUS,
	// nexd_nats_leaf_connected) within about 15 s, as nexd's own client does.
	sopts.PingInterval, sopts.MaxPingsOut = leafPingInterval, leafMaxPingsOut
	sopts.LeafNode.Remotes = append(sopts.LeafNode.Remotes, &server.RemoteLeafOpts{
		URLs:         []*url.URL{u},
		Credentials:  o.LeafCreds,
		LocalAccount: account,
	})
	return nil
}

// start runs a server and waits until it accepts clients; on failure the server
// is shut down. The accounts are registered before it starts, so their JetStream is
// set up before any connection (see startZeroConfig).
func start(ctx context.Context, sopts *server.Options, what string, log *slog.Logger, accounts ...string) (*Server, error) {
	s, err := server.NewServer(sopts)
	if err != nil {
		return nil, fmt.Errorf("natsembed: %s: %w", what, err)
	}
	for _, a := range accounts {
		if _, err := s.LookupAccount(a); err != nil {
			s.Shutdown()
			return nil, fmt.Errorf("natsembed: %s: account %s: %w", what, a, err)
		}
	}
	logger := &serverLogger{log: log.With("component", "nats-server")}
	s.SetLoggerV2(logger, false, false, false)
	srv := &Server{s: s, log: log, leafs: len(sopts.LeafNode.Remotes)}
	go s.Start() // nats-server owns its goroutines; Shutdown waits for them
	// Poll in short steps so a listen failure (reported through Fatalf) or ctx
	// ends the wait at once instead of after the full timeout.
	deadline := time.Now().Add(readyTimeout)
	for !s.ReadyForConnections(200 * time.Millisecond) {
		err := error(nil)
		if f := logger.fatal(); f != "" {
			err = fmt.Errorf("natsembed: %s: %s", what, f)
		} else if cerr := ctx.Err(); cerr != nil {
			err = fmt.Errorf("natsembed: %s: waiting for the server: %w", what, cerr)
		} else if time.Now().After(deadline) {
			err = fmt.Errorf("natsembed: %s: server not ready for connections within %s", what, readyTimeout)
		}
		if err != nil {
			srv.Shutdown()
			return nil, err
		}
	}
	return srv, nil
}

// realClientURL is the URL the server actually listens on, with an unspecified
// host (0.0.0.0, ::) replaced by loopback so children on this machine can dial it.
func (s *Server) realClientURL() string {
	addr, ok := s.s.Addr().(*net.TCPAddr)
	if !ok {
		return ""
	}
	u, err := url.Parse(s.s.ClientURL()) // scheme and configured host
	if err != nil {
		return ""
	}
	host := u.Hostname()
	if ip := net.ParseIP(host); host == "" || (ip != nil && ip.IsUnspecified()) {
		host = "127.0.0.1"
		if ip != nil && ip.To4() == nil {
			host = "::1"
		}
	}
	u.Host = net.JoinHostPort(host, strconv.Itoa(addr.Port))
	return u.String()
}

// portString is a port for messages.
func portString(p int) string {
	if p < 0 {
		return "random"
	}
	return strconv.Itoa(p)
}

// serverLogger routes nats-server's log into the node's slog logger. Its chatty
// start-up notices go to DEBUG; nexd logs one INFO line of its own.
type serverLogger struct {
	log *slog.Logger

	mu        sync.Mutex
	lastFatal string
}

func (l *serverLogger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *serverLogger) Tracef(format string, v ...any)  {}

// Fatalf must not exit the process (the default server logger does): remember the
// reason so start can report it.
func (l *serverLogger) Fatalf(format string, v ...any) {
	msg := fmt.Sprintf(format, v...)
	l.mu.Lock()
	l.lastFatal = msg
	l.mu.Unlock()
	l.log.Error(msg)
}

func (l *serverLogger) fatal() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lastFatal
}

// CheckServerConfig parses a nats-server config file as --inats-config would; it is
// config.LoadOptions.CheckInats for nexd.
// A file that configures no authentication is accepted with a config.InatsWarning:
// it stays the operator's choice, but every local user could take the node over.
func CheckServerConfig(path string) error {
	o, err := server.ProcessConfigFile(path)
	if err != nil {
		return err
	}
	if w := authWarning(o); w != "" {
		return config.InatsWarning{Msg: w}
	}
	return nil
}

// authWarning says what is open about a server's client authentication, "" when
// every client must authenticate.
func authWarning(o *server.Options) string {
	if o.NoAuthUser != "" {
		return fmt.Sprintf("no_auth_user %q: clients without credentials are let in as that user", o.NoAuthUser)
	}
	if len(o.Users) > 0 || len(o.Nkeys) > 0 || o.Username != "" || o.Authorization != "" ||
		len(o.TrustedOperators) > 0 || len(o.TrustedKeys) > 0 || o.AuthCallout != nil {
		return ""
	}
	return "it configures no authentication: anyone who can reach the server can deploy workloads and stop the node (add authorization, accounts or an operator, or drop inats_config for nexd's authenticated zero-config server)"
}

// portFile keeps the port the zero-config server got when any free one was asked for.
const portFile = "embedded-nats.port"

// lastPort is the port the previous start recorded in stateDir when it is free now,
// else -1 (any free port).
func lastPort(stateDir string) int {
	if stateDir == "" {
		return -1
	}
	b, err := os.ReadFile(filepath.Join(stateDir, portFile))
	if err != nil {
		return -1
	}
	p, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || p <= 0 || p > 65535 {
		return -1
	}
	l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(p)))
	if err != nil {
		return -1
	}
	l.Close()
	return p
}
