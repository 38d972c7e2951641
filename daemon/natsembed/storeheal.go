package natsembed

import (
	"fmt"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// A write error in a JetStream store (ENOSPC: the state directory's file system filled
// up) is sticky in nats-server: the stream refuses every write from then on, or
// JetStream shuts itself down, until the server restarts. An external server is its
// operator's to restart; the embedded one is nexd's, and restarting nexd for it would
// be an outage. So once the store has room again, JetStream is restarted in place: the
// streams are read back from the store and take writes again.
const (
	storeCheckEvery = 5 * time.Second
	// storeMinFree is the room the store must have before JetStream is restarted (as a
	// deploy needs in the state directory: daemon's minFreeBytes).
	storeMinFree = 4 << 20
)

// watchStore starts the store's watch when the server runs JetStream on its own (a
// clustered JetStream's streams are the cluster's to recover) or keeps the nex account
// JWT (zero-config). Shutdown ends it. Call it once the server is set up (s.trust).
func (s *Server) watchStore() {
	cfg := s.s.JetStreamConfig()
	if cfg != nil && s.s.JetStreamIsClustered() {
		cfg = nil
	}
	if cfg == nil && s.trust == nil {
		return
	}
	s.stopWatch = make(chan struct{})
	s.watch.Go(func() { s.healStore(cfg) })
}

// healStore checks every storeCheckEvery: a JetStream store (cfg, when not nil) with a
// write error (or JetStream shut down) gets JetStream restarted once it has
// storeMinFree again; an account JWT not saved yet (revocations) is saved.
func (s *Server) healStore(cfg *server.JetStreamConfig) {
	t := time.NewTicker(storeCheckEvery)
	defer t.Stop()
	waiting := false // said that the store waits for room
	unsaved := false // said that the account JWT waits to be saved
	for {
		select {
		case <-s.stopWatch:
			return
		case <-t.C:
		}
		if s.trust != nil {
			switch w, err := s.trust.saveAccount(); {
			case w && !unsaved:
				s.log.Warn("the nex account JWT (its user revocations) could not be saved; they are in force, and saving is retried: a restart before then forgets them",
					"err", err)
				unsaved = true
			case !w && unsaved:
				s.log.Info("the nex account JWT (its user revocations) is saved")
				unsaved = false
			}
		}
		if cfg == nil {
			continue
		}
		broken := s.storeBroken()
		if broken == "" {
			waiting = false
			continue
		}
		free, known := freeBytes(cfg.StoreDir)
		if known && free < storeMinFree {
			if !waiting {
				s.log.Error("JetStream store cannot be written; JetStream restarts once the store has room again",
					"store", cfg.StoreDir, "free_bytes", free, "needed_bytes", storeMinFree, "err", broken)
				waiting = true
			}
			continue
		}
		waiting = false
		s.log.Warn("JetStream store could not be written; it has room again: restarting JetStream",
			"store", cfg.StoreDir, "free_bytes", free, "err", broken)
		if err := s.restartJetStream(*cfg); err != nil {
			s.log.Error("restarting JetStream failed; retrying", "err", err)
			continue
		}
		s.log.Info("JetStream restarted; its store takes writes again", "store", cfg.StoreDir)
	}
}

// storeBroken says what keeps the store from being written, "" when nothing does.
func (s *Server) storeBroken() string {
	if !s.s.JetStreamEnabled() {
		return "JetStream shut down"
	}
	h := s.s.Healthz(&server.HealthzOptions{Details: true})
	for _, e := range h.Errors {
		if (e.Type == server.HealthzErrorStream || e.Type == server.HealthzErrorConsumer) && strings.Contains(e.Error, "write error") {
			return e.Error
		}
	}
	return ""
}

// restartJetStream shuts JetStream down and enables it again with cfg, the
// configuration it ran with.
func (s *Server) restartJetStream(cfg server.JetStreamConfig) error {
	if s.s.JetStreamEnabled() {
		if err := s.s.ShutdownJetStream(); err != nil {
			return fmt.Errorf("shut JetStream down: %w", err)
		}
	}
	// EnableJetStream adds the "jetstream" directory itself.
	cfg.StoreDir = filepath.Dir(cfg.StoreDir)
	if err := s.s.EnableJetStream(&cfg); err != nil {
		return fmt.Errorf("enable JetStream: %w", err)
	}
	return nil
}

// freeBytes is what dir's file system has free for an unprivileged writer.
func freeBytes(dir string) (uint64, bool) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(dir, &st); err != nil {
		return 0, false
	}
	return st.Bavail * uint64(st.Bsize), true
}
