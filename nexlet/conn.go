package nexlet

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/nexd-project/nexd/protocol"
)

// Environment variables a node sets for the nexlets it spawns (upstream's names).
const (
	EnvNatsServers  = "NEX_AGENT_NATS_SERVERS"
	EnvNatsJWT      = "NEX_AGENT_NATS_B64_JWT"
	EnvNatsSeed     = "NEX_AGENT_NATS_USER_SEED"
	EnvNatsUser     = "NEX_AGENT_NATS_USER"
	EnvNatsPassword = "NEX_AGENT_NATS_PASSWORD"
	EnvNatsNkey     = "NEX_AGENT_NATS_USER_NKEY"
	EnvNodeID       = "NEX_AGENT_NODE_ID"
	EnvAssignedID   = "NEX_AGENT_ASSIGNED_ID"
	// EnvInboxPrefix is nexd's: the nexlet's private inbox prefix (its users may
	// subscribe to no other inbox).
	EnvInboxPrefix = protocol.EnvAgentInboxPrefix
)

// ConnDataFromEnv reads the registration credentials a node passes to a local nexlet.
// The JWT arrives base64-encoded (NEX_AGENT_NATS_B64_JWT), as upstream's node sends it.
// env is usually os.Getenv.
func ConnDataFromEnv(env func(string) string) (protocol.NatsConnectionData, error) {
	var cd protocol.NatsConnectionData
	for s := range strings.SplitSeq(env(EnvNatsServers), ",") {
		if s = strings.TrimSpace(s); s != "" {
			cd.NatsServers = append(cd.NatsServers, s)
		}
	}
	if len(cd.NatsServers) == 0 {
		return cd, fmt.Errorf("environment variable %s is required (comma-separated NATS URLs)", EnvNatsServers)
	}
	if b := env(EnvNatsJWT); b != "" {
		jwt, err := base64.StdEncoding.DecodeString(b)
		if err != nil {
			return cd, fmt.Errorf("environment variable %s: not base64: %w", EnvNatsJWT, err)
		}
		cd.NatsUserJWT = string(jwt)
	}
	cd.NatsUserSeed = env(EnvNatsSeed)
	cd.NatsUserName = env(EnvNatsUser)
	cd.NatsUserPassword = env(EnvNatsPassword)
	cd.NatsUserNkey = env(EnvNatsNkey)
	cd.InboxPrefix = env(EnvInboxPrefix)
	return cd, nil
}

// IdentityFromEnv reads the node id and the agent id a node assigns a local nexlet.
func IdentityFromEnv(env func(string) string) (nodeID, agentID string, err error) {
	nodeID, agentID = env(EnvNodeID), env(EnvAssignedID)
	if nodeID == "" {
		return "", "", fmt.Errorf("environment variable %s is required", EnvNodeID)
	}
	if agentID == "" {
		return "", "", fmt.Errorf("environment variable %s is required", EnvAssignedID)
	}
	return nodeID, agentID, nil
}

// flusherTimeout bounds one socket write to the server (see connect).
const flusherTimeout = 10 * time.Second

// Connect opens a NATS connection from connection data: JWT+seed, nkey+seed or
// user/password, TLS (file paths or inline PEM) and the private inbox prefix. Empty
// servers mean nats.DefaultURL. extra options come last.
func Connect(cd protocol.NatsConnectionData, name string, extra ...nats.Option) (*nats.Conn, error) {
	return connect(cd, name, nil, extra...)
}

// connect is Connect; with live set, a JWT user is read from live at every (re)connect,
// so renewed credentials take over the connection when it reconnects.
// connectTimeout bounds a connect's dial (and a socketDialer's).
const connectTimeout = 10 * time.Second

func connect(cd protocol.NatsConnectionData, name string, live *liveCreds, extra ...nats.Option) (*nats.Conn, error) {
	if cd.ConnName != "" {
		name = cd.ConnName
	}
	opts := []nats.Option{nats.Name(name), nats.MaxReconnects(-1), nats.Timeout(connectTimeout),
		// A write to a server that stopped reading holds the connection's lock, and
		// with it every publish, request and answer of the nexlet, until its deadline:
		// nats.go's 1 min froze the nexlet that long. A write cut short closes the
		// socket (a partial protocol op) and reconnects. nexd's own bound (natsconn).
		nats.FlusherTimeout(flusherTimeout)}
	tlsOpts, err := tlsOptions(cd)
	if err != nil {
		return nil, err
	}
	opts = append(opts, tlsOpts...)
	if cd.InboxPrefix != "" {
		// Replies come only to this prefix: nexd's scoped users may subscribe to no
		// other inbox.
		opts = append(opts, nats.CustomInboxPrefix(cd.InboxPrefix))
	}
	switch {
	case live != nil:
		opts = append(opts, nats.UserJWT(live.jwt, live.sign))
	case cd.NatsUserJWT != "" && cd.NatsUserSeed != "":
		opts = append(opts, nats.UserJWTAndSeed(cd.NatsUserJWT, cd.NatsUserSeed))
	case cd.NatsUserNkey != "" && cd.NatsUserSeed != "":
		kp, err := nkeys.FromSeed([]byte(cd.NatsUserSeed))
		if err != nil {
			return nil, fmt.Errorf("connection data: nats_user_seed: %w", err)
		}
		opts = append(opts, nats.Nkey(cd.NatsUserNkey, kp.Sign))
	case cd.NatsUserName != "" || cd.NatsUserPassword != "":
		opts = append(opts, nats.UserInfo(cd.NatsUserName, cd.NatsUserPassword))
	}
	servers := cd.NatsServers
	if len(servers) == 0 {
		servers = []string{nats.DefaultURL}
	}
	// In nexd's order (its own server first, see natsconn): a nexlet must not end up
	// on another host's server and be cut off by that host's partition.
	opts = append(opts, nats.DontRandomize())
	opts = append(opts, extra...)
	nc, err := nats.Connect(strings.Join(servers, ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s as %q: %w", strings.Join(servers, ","), name, err)
	}
	return nc, nil
}

func isPEM(s string) bool { return strings.Contains(s, "-----BEGIN") }

func tlsOptions(cd protocol.NatsConnectionData) ([]nats.Option, error) {
	var opts []nats.Option
	if cd.TLSFirst {
		opts = append(opts, nats.TLSHandshakeFirst())
	}
	inline := isPEM(cd.TLSCA) || isPEM(cd.TLSCert) || isPEM(cd.TLSKey)
	if !inline {
		if cd.TLSCert != "" && cd.TLSKey != "" {
			opts = append(opts, nats.ClientCert(cd.TLSCert, cd.TLSKey))
		}
		if cd.TLSCA != "" {
			opts = append(opts, nats.RootCAs(cd.TLSCA))
		}
		return opts, nil
	}
	conf := &tls.Config{MinVersion: tls.VersionTLS12}
	if cd.TLSCA != "" {
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM([]byte(cd.TLSCA)) {
			return nil, errors.New("connection data: tls_ca holds no PEM certificate")
		}
		conf.RootCAs = pool
	}
	if cd.TLSCert != "" || cd.TLSKey != "" {
		cert, err := tls.X509KeyPair([]byte(cd.TLSCert), []byte(cd.TLSKey))
		if err != nil {
			return nil, fmt.Errorf("connection data: tls_cert/tls_key: %w", err)
		}
		conf.Certificates = []tls.Certificate{cert}
	}
	return append(opts, nats.Secure(conf)), nil
}

// RemoteInit is the remote registration bootstrap: it asks the nexus (exactly one node
// answers) for an agent id and registration credentials. Without a deadline on ctx it
// waits 3 s, as upstream does.
func RemoteInit(ctx context.Context, nc *nats.Conn, nexus string) (*protocol.RegisterRemoteAgentResponse, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 3*time.Second)
		defer cancel()
	}
	subj := protocol.RemoteRegisterSubject(nexus)
	msg, err := nc.RequestWithContext(ctx, subj, []byte("{}"))
	if err != nil {
		return nil, fmt.Errorf("remote registration on %s: %w (is the node started with --allow-remote-agent-registration?)", subj, err)
	}
	if code := msg.Header.Get(protocol.HeaderErrorCode); code != "" {
		return nil, fmt.Errorf("remote registration on %s refused: %s %s", subj, code, msg.Header.Get(protocol.HeaderError))
	}
	var resp protocol.RegisterRemoteAgentResponse
	if err := protocol.Decode(msg.Data, &resp); err != nil {
		return nil, fmt.Errorf("remote registration on %s: %w", subj, err)
	}
	return &resp, nil
}
