package metrics

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"
)

// Listener serves /metrics over TCP (opt-in; the examples use loopback).
type Listener struct {
	l   net.Listener
	srv *http.Server
}

// Listen binds addr; nothing is served until Serve.
func (m *Metrics) Listen(addr string) (*Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics_listen %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", m.Handler())
	return &Listener{l: l, srv: &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}}, nil
}

// Addr is the bound address (the port chosen for ":0").
func (l *Listener) Addr() net.Addr { return l.l.Addr() }

// Serve serves until Close; it returns nil after Close.
func (l *Listener) Serve() error {
	if err := l.srv.Serve(l.l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// Close stops accepting and waits (bounded by ctx) for scrapes in flight.
func (l *Listener) Close(ctx context.Context) error {
	err := l.srv.Shutdown(ctx)
	l.l.Close() // Shutdown closes it only if Serve ran
	return err
}
