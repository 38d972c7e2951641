package control

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

// A socket systemd created (socket activation) is served as it is, gets the mode
// the config asks for, and outlives the server: a client that connects while no
// server runs is answered by the next one.
func TestInheritedListener(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nexd.sock")
	sys := testkit.ActivationSocket(t, path)
	if err := os.Chmod(path, 0o600); err != nil {
		t.Fatal(err)
	}

	// serve runs a server on a duplicate of systemd's socket, as a new nexd gets it.
	serve := func(allow string) (*Server, chan error) {
		f, err := sys.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		l, err := net.FileListener(f)
		if err != nil {
			t.Fatal(err)
		}
		s, err := Listen(filepath.Join(t.TempDir(), "configured.sock"), ServerOptions{
			Backend: newTestBackend(), AllowOthers: allow, Listener: l.(*net.UnixListener)})
		if err != nil {
			t.Fatalf("Listen on an inherited socket: %v", err)
		}
		if s.Path() != path {
			t.Errorf("Path() = %s, want systemd's %s", s.Path(), path)
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve(context.Background()) }()
		return s, done
	}
	mode := func() os.FileMode {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatalf("socket after server: %v", err)
		}
		return fi.Mode().Perm()
	}

	s1, done1 := serve(AllowStatus)
	if m := mode(); m != 0o666 {
		t.Errorf("mode %o with allow_others=status, want 0666", m)
	}
	c := NewClient(path)
	defer c.Close()
	sctx, scancel := context.WithTimeout(context.Background(), callWait)
	defer scancel()
	if _, err := c.Status(sctx); err != nil {
		t.Fatalf("status through the inherited socket: %v", err)
	}
	c.Close()
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done1; err != nil {
		t.Fatalf("Serve: %v", err)
	}

	// No server now: the socket is still there and a connection is queued.
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatalf("connect between servers: %v (the socket must outlive the server)", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("GET /v1/status HTTP/1.0\r\n\r\n")); err != nil {
		t.Fatal(err)
	}

	s2, done2 := serve(AllowNone)
	t.Cleanup(func() { s2.Close(); <-done2 })
	if m := mode(); m != 0o660 {
		t.Errorf("mode %o with allow_others=none, want 0660", m)
	}
	buf := make([]byte, 12)
	if _, err := conn.Read(buf); err != nil || string(buf) != "HTTP/1.0 200" {
		t.Fatalf("queued request answered %q, %v; want HTTP/1.0 200", buf, err)
	}
}

// A restart under socket activation loses no request: clients that call while one
// server closes and the next takes systemd's socket are all answered, by the one that
// accepted them or by the next. Each handover is a fresh server on a duplicate of the
// same socket, as a new nexd gets it; several clients keep calls in flight at every
// close. The calls are ones no client asks again (the Client repeats a dropped GET, so
// a status through it would pass without the drain): a POST (reload) and a GET from a
// plain HTTP client (curl, a metrics scraper).
func TestNoRequestLostAcrossHandovers(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nexd.sock")
	sys := testkit.ActivationSocket(t, path)
	serve := func() (*Server, chan error) {
		f, err := sys.File()
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		l, err := net.FileListener(f)
		if err != nil {
			t.Fatal(err)
		}
		s, err := Listen(path, ServerOptions{Backend: newTestBackend(), Listener: l.(*net.UnixListener)})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- s.Serve(context.Background()) }()
		return s, done
	}

	const clients, handovers = 8, 40
	ctx, cancel := context.WithCancel(context.Background())
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		calls    int
		failures []string
	)
	for range clients {
		wg.Go(func() {
			for i := 0; ctx.Err() == nil; i++ {
				// A client per call, as each nexctl is: a fresh connection every time.
				var err error
				if i%2 == 0 {
					c := NewClient(path)
					rctx, rcancel := context.WithTimeout(context.Background(), callWait)
					_, err = c.Reload(rctx)
					rcancel()
					c.Close()
				} else {
					err = plainGet(path, "/v1/status")
				}
				mu.Lock()
				calls++
				if err != nil {
					failures = append(failures, err.Error())
				}
				mu.Unlock()
			}
		})
	}
	s, done := serve()
	for range handovers {
		time.Sleep(5 * time.Millisecond)
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
		s, done = serve()
	}
	time.Sleep(5 * time.Millisecond)
	cancel()
	wg.Wait()
	s.Close()
	<-done
	if len(failures) > 0 {
		t.Errorf("%d of %d calls failed across %d handovers; first: %s",
			len(failures), calls, handovers, strings.Join(failures[:min(len(failures), 3)], " | "))
	}
	t.Logf("%d calls across %d handovers", calls, handovers)
}

// callWait bounds one call of these tests: a socket nobody serves any more (no
// server took systemd's socket over) queues a connection unanswered, which must fail
// the call, not hang the test until the test binary's timeout.
const callWait = time.Minute

// plainGet GETs path over the socket with a plain HTTP client, which never asks again.
func plainGet(sock, path string) error {
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr, Timeout: callWait}).Get("http://nexd" + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return nil
}

// A GET whose connection closes unanswered (the nexd that accepted it was killed) is
// asked again, on a new connection, which the next server answers; a POST is not (it
// may have taken effect) and fails at once.
func TestClientAsksAgainWhenDropped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nexd.sock")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	// drop accepts one connection, reads its request and closes it unanswered.
	drop := func() chan string {
		got := make(chan string, 1)
		go func() {
			c, err := ln.Accept()
			if err != nil {
				got <- err.Error()
				return
			}
			defer c.Close()
			line, _ := bufio.NewReader(c).ReadString('\n')
			got <- strings.TrimSpace(line)
		}()
		return got
	}
	c := NewClient(path)
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	dropped := drop()
	answered := make(chan error, 1)
	go func() {
		_, err := c.Status(ctx)
		answered <- err
	}()
	if got := <-dropped; got != "GET /v1/status HTTP/1.1" {
		t.Fatalf("first connection carried %q", got)
	}
	// The next server takes the same socket and answers the call asked again.
	s, err := Listen(path, ServerOptions{Backend: newTestBackend(), Listener: ln})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(context.Background()) }()
	if err := <-answered; err != nil {
		t.Fatalf("status after a dropped connection: %v; want it asked again and answered", err)
	}
	s.Close()
	<-done

	ln2, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	ln = ln2
	t.Cleanup(func() { ln2.Close() })
	dropped = drop()
	// Asked again, the reload would wait for an accept that never comes: ctx would end.
	_, err = c.Reload(ctx)
	if got := <-dropped; got != "POST /v1/reload HTTP/1.1" {
		t.Fatalf("first connection carried %q", got)
	}
	if err == nil || ctx.Err() != nil {
		t.Fatalf("reload on a dropped connection: %v (ctx %v); want its error at once, not asked again", err, ctx.Err())
	}
}
