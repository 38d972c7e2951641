package nexlets

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/nexd-project/nexd/internal/procid"
	"github.com/nexd-project/nexd/nexlet/localchan"
)

// A native nexlet this nexd adopted (left running by the previous nexd with
// live_restore, or across a re-exec) has no socket pair with it: the pair's node end
// closed with the nexd that spawned it. It dials the socket below instead
// (localchan.EnvSocket, set at every spawn) when it is told to register again, and
// speaks the pair's protocol on it: its registration, its workloads' feeds (held by the
// nexlet while no nexd takes them, acknowledged once published) and start requests.
// Only the process this nexd adopted is admitted: the kernel's peer credentials
// (SO_PEERCRED, as of connect()) must give nexd's uid and the adopted process's pid,
// and that pid must still name the process of the recorded start time (a pid alone can
// be reused). The directory is nexd's, 0700: no other uid reaches the socket at all.

// adoptedSocketName is the socket's name in <runtime_dir>/supervise, beside the
// nexlets' output FIFOs.
const adoptedSocketName = "nexlets.sock"

// AdoptedSocketPath is where nexd serves adopted nexlets' channels.
func AdoptedSocketPath(runtimeDir string) string {
	return filepath.Join(runtimeDir, "supervise", adoptedSocketName)
}

// maxSocketPath is what fits sun_path (108 bytes with its NUL).
const maxSocketPath = 107

// listenAdopted serves the adopted nexlets' socket, when this nexd adopts any: before
// the supervisor tells them to register again (Start), so that they find it. Stop
// closes it and waits for its goroutine.
func (m *Manager) listenAdopted() {
	m.mu.Lock()
	adopting := len(m.adopted) > 0
	m.mu.Unlock()
	if !adopting || m.sock != nil {
		return
	}
	path := AdoptedSocketPath(m.o.RuntimeDir)
	ln, err := listenPrivate(path, "unix")
	if err != nil {
		m.log.Warn("no socket for adopted nexlets; they relay their feeds and get their starts over NATS", "path", path, "err", err)
		return
	}
	m.mu.Lock()
	m.sock = ln
	m.mu.Unlock()
	m.sockWG.Go(func() { m.acceptAdopted(ln) })
}

// listenPrivate listens on path (network "unix" or "unixpacket") in a directory of
// nexd's that no other uid may enter.
func listenPrivate(path, network string) (*net.UnixListener, error) {
	if len(path) > maxSocketPath {
		return nil, fmt.Errorf("socket path of %d bytes is over %d", len(path), maxSocketPath)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	st, err := os.Lstat(dir)
	if err != nil {
		return nil, err
	}
	if !st.IsDir() {
		return nil, fmt.Errorf("%s is not a directory", dir)
	}
	// What keeps other users off the socket; MkdirAll keeps an existing directory's mode.
	if err := os.Chmod(dir, 0o700); err != nil {
		return nil, err
	}
	_ = os.Remove(path) // a killed nexd's; the runtime dir is this nexd's alone (its lock)
	ln, err := net.ListenUnix(network, &net.UnixAddr{Name: path, Net: network})
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}

// acceptAdopted admits or refuses each connection until the listener closes.
func (m *Manager) acceptAdopted(ln *net.UnixListener) {
	for {
		c, err := ln.AcceptUnix()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			m.log.Warn("accepting on the adopted nexlets' socket failed", "err", err)
			time.Sleep(50 * time.Millisecond) // out of descriptors: not a busy loop
			continue
		}
		m.admit(c)
	}
}

// admit makes c the channel of the adopted nexlet that connected it, or refuses it
// (closed at once, logged and counted).
func (m *Manager) admit(c *net.UnixConn) {
	peer, err := localchan.PeerOf(c)
	name := ""
	if err == nil {
		name, err = m.adoptedPeer(peer)
	}
	if err != nil {
		// Logged and counted before the close, so that a peer that sees its refusal
		// finds it counted.
		m.log.Warn("connection on the adopted nexlets' socket refused", "pid", peer.PID, "uid", peer.UID, "err", err)
		if m.o.OnSocketRefused != nil {
			m.o.OnSocketRefused()
		}
		c.Close()
		return
	}
	f, err := c.File()
	c.Close()
	if err != nil {
		m.log.Warn("adopted nexlet's connection lost", "nexlet", name, "err", err)
		return
	}
	cl, err := localchan.NewClient(f)
	if err != nil {
		m.log.Warn("adopted nexlet's connection lost", "nexlet", name, "err", err)
		return
	}
	s, _ := m.ByName(name)
	m.mu.Lock()
	if _, still := m.adopted[name]; !still || m.sock == nil {
		// It ended meanwhile, or the manager stops.
		m.mu.Unlock()
		_ = cl.Close()
		return
	}
	old := m.locals[name]
	m.locals[name] = cl
	if m.reg != nil {
		// The channel serves a registration signed with the key of the adopted start.
		m.reg.SetAdoptedLocal(s.AgentID, m.adoptKeys[name], cl)
	}
	m.mu.Unlock()
	if old != nil {
		_ = old.Close() // an earlier connection of the same process
	}
	m.log.Info("adopted nexlet connected on its socket", "nexlet", name, "pid", peer.PID)
}

// adoptedPeer names the adopted nexlet that peer is, or says why it is none.
func (m *Manager) adoptedPeer(peer localchan.Peer) (string, error) {
	if euid := os.Geteuid(); peer.UID != uint32(euid) {
		return "", fmt.Errorf("peer uid %d is not nexd's (%d)", peer.UID, euid)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	for name, id := range m.adopted {
		if id.PID != peer.PID {
			continue
		}
		// The pid named the adopted process at connect() only if it names it now:
		// that process has held the pid since before this socket existed.
		if cur, err := procid.Of(peer.PID); err != nil || cur != id || !id.Alive() {
			return "", fmt.Errorf("pid %d is no longer the adopted nexlet %q (process %s)", peer.PID, name, id)
		}
		return name, nil
	}
	return "", fmt.Errorf("pid %d is not a nexlet this nexd adopted", peer.PID)
}

// stopAdoptedSocket closes the listener and waits for its goroutine; the channels it
// admitted are closed with the other local channels.
func (m *Manager) stopAdoptedSocket() {
	m.mu.Lock()
	ln := m.sock
	m.sock = nil
	m.mu.Unlock()
	if ln != nil {
		ln.Close()
	}
	m.sockWG.Wait()
}
