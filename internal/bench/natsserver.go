package bench

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// natsServer is an in-process nats-server on loopback with JetStream in a temp dir.
type natsServer struct {
	s   *server.Server
	dir string
}

func (n *natsServer) URL() string { return n.s.ClientURL() }

func (n *natsServer) Shutdown() {
	n.s.Shutdown()
	n.s.WaitForShutdown()
}

// startNATS runs one server; cluster, when set, is configured before start.
func startNATS(dir string, configure func(*server.Options)) (*natsServer, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("nats-server store dir: %w", err)
	}
	opts := &server.Options{
		Host: "127.0.0.1", Port: -1, NoLog: true, NoSigs: true,
		JetStream: true, StoreDir: dir,
	}
	if configure != nil {
		configure(opts)
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("nats-server: %w", err)
	}
	go s.Start()
	if !s.ReadyForConnections(15 * time.Second) {
		s.Shutdown()
		return nil, errors.New("nats-server: not ready for connections within 15s")
	}
	return &natsServer{s: s, dir: dir}, nil
}

// startCluster runs size servers clustered over loopback routes, JetStream included.
func startCluster(dir string, size int) ([]*natsServer, error) {
	ports := make([]int, size)
	for i := range ports {
		p, err := freePort()
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	var routes []*url.URL
	for _, p := range ports {
		routes = append(routes, &url.URL{Scheme: "nats", Host: "127.0.0.1:" + strconv.Itoa(p)})
	}
	var out []*natsServer
	for i := range size {
		s, err := startNATS(filepath.Join(dir, fmt.Sprintf("n%d", i)), func(o *server.Options) {
			o.ServerName = fmt.Sprintf("bench-%d", i)
			o.Cluster.Name = "nexbench"
			o.Cluster.Host = "127.0.0.1"
			o.Cluster.Port = ports[i]
			o.Routes = routes
		})
		if err != nil {
			for _, s := range out {
				s.Shutdown()
			}
			return nil, err
		}
		out = append(out, s)
	}
	// Wait until every server routes to every other, so interest propagates everywhere.
	deadline := time.Now().Add(30 * time.Second)
	for _, s := range out {
		for s.s.NumRoutes() < size-1 {
			if time.Now().After(deadline) {
				for _, s := range out {
					s.Shutdown()
				}
				return nil, fmt.Errorf("nats cluster: %s has %d of %d routes after 30s", s.s.Name(), s.s.NumRoutes(), size-1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return out, nil
}

// freePort asks the kernel for an unused loopback TCP port.
func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
