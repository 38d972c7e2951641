package natsconn

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// readyTimeout bounds how long an embedded server may take to accept clients;
// JetStream recovering a large store can take a while.
const readyTimeout = 60 * time.Second

// startInats runs the server an --inats-config file describes and connects to it
// in-process with the --nats.* credentials. Children get the server's real
// client URL, then any configured --nats.servers (e.g. the rest of a cluster).
func (c *Conn) startInats(ctx context.Context, o Options) error {
	sopts, err := server.ProcessConfigFile(o.InatsConfig)
	if err != nil {
		return fmt.Errorf("natsconn: --inats-config %s: %w", o.InatsConfig, err)
	}
	sopts.NoSigs = true // signals belong to nexd
	if sopts.JetStream && sopts.StoreDir == "" && o.StateDir != "" {
		sopts.StoreDir = o.StateDir // <state>/jetstream rather than a temp dir
	}
	if err := c.startServer(ctx, sopts, "--inats-config "+o.InatsConfig); err != nil {
		return err
	}
	urls := []string{}
	if u := c.realClientURL(); u != "" {
		urls = append(urls, u)
	}
	for _, s := range splitServers(o.Servers) {
		if !slices.Contains(urls, s) {
			urls = append(urls, s)
		}
	}
	if len(urls) == 0 {
		return fmt.Errorf("natsconn: --inats-config %s: the server does not listen for clients and no --nats.servers are given, so nexlets could not connect", o.InatsConfig)
	}
	c.clientURLs = urls
	auth, err := authOptions(o)
	if err != nil {
		return err
	}
	if err := c.connectInProcess(ctx, o, auth); err != nil {
		return err
	}
	c.log.Info("embedded NATS server started from config file", "config", o.InatsConfig,
		"client_url", urls[0], "jetstream", c.Embedded.JetStreamEnabled())
	return nil
}

// startZeroConfig runs a local server on 127.0.0.1 with JetStream, so a node with
// no NATS configured works on its own (KV state, events, agent health).
func (c *Conn) startZeroConfig(ctx context.Context, o Options) error {
	port := o.EmbeddedPort
	if port == 0 {
		port = DefaultEmbeddedPort
	}
	store := ""
	if o.StateDir != "" {
		store = o.StateDir
		if err := os.MkdirAll(filepath.Join(store, server.JetStreamStoreDir), 0o700); err != nil {
			return fmt.Errorf("natsconn: embedded NATS: JetStream store in state directory: %w", err)
		}
	} else {
		tmp, err := os.MkdirTemp("", "nexd-nats-")
		if err != nil {
			return fmt.Errorf("natsconn: embedded NATS: temporary JetStream store: %w", err)
		}
		store, c.tempStore = tmp, tmp
	}
	sopts := &server.Options{
		ServerName: "nexd",
		Host:       "127.0.0.1",
		Port:       port,
		NoSigs:     true,
		JetStream:  true,
		StoreDir:   store, // nats-server adds /jetstream
	}
	if err := c.startServer(ctx, sopts, "embedded NATS on 127.0.0.1:"+portString(port)); err != nil {
		return fmt.Errorf("%w (no NATS is configured, so nexd starts its own server; if one already runs here, point nexd at it with --nats.servers)", err)
	}
	c.clientURLs = []string{c.realClientURL()}
	if err := c.connectInProcess(ctx, o, nil); err != nil {
		return err
	}
	c.log.Info("no NATS configured: using an embedded NATS server",
		"client_url", c.clientURLs[0], "jetstream_store", filepath.Join(store, server.JetStreamStoreDir),
		"persistent", c.tempStore == "")
	return nil
}

func (c *Conn) startServer(ctx context.Context, sopts *server.Options, what string) error {
	s, err := server.NewServer(sopts)
	if err != nil {
		return fmt.Errorf("natsconn: %s: %w", what, err)
	}
	logger := &serverLogger{log: c.log.With("component", "nats-server")}
	s.SetLoggerV2(logger, false, false, false)
	c.Embedded = s
	go s.Start()
	// Poll in short steps so a listen failure (reported through Fatalf) or ctx
	// ends the wait at once instead of after the full timeout.
	deadline := time.Now().Add(readyTimeout)
	for !s.ReadyForConnections(200 * time.Millisecond) {
		if f := logger.fatal(); f != "" {
			return fmt.Errorf("natsconn: %s: %s", what, f)
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("natsconn: %s: waiting for the server: %w", what, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("natsconn: %s: server not ready for connections within %s", what, readyTimeout)
		}
	}
	return nil
}

func (c *Conn) connectInProcess(ctx context.Context, o Options, auth []nats.Option) error {
	opts := append(auth, c.commonOptions(o)...)
	opts = append(opts, nats.InProcessServer(c.Embedded))
	nc, err := c.dialRetrying(ctx, "", opts)
	if err != nil {
		return err
	}
	c.NC = nc
	return nil
}

// realClientURL is the URL the server actually listens on, with an unspecified
// host (0.0.0.0, ::) replaced by loopback so children on this machine can dial it.
func (c *Conn) realClientURL() string {
	sopts := c.Embedded.ClientURL() // scheme and configured host
	addr, ok := c.Embedded.Addr().(*net.TCPAddr)
	if !ok {
		return ""
	}
	u, err := url.Parse(sopts)
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
// reason so startServer can report it.
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
