package localchan

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"golang.org/x/sys/unix"

	"github.com/nexd-project/nexd/internal/testkit"
	"github.com/nexd-project/nexd/internal/testnats"
)

// The child mode of the test binary: a nexlet's end of a channel, served until the
// node's end closes. It answers "echo" with the body (after one progress report),
// "fds" with what a child process it execs holds open, "cloexec" with whether its own
// end is close-on-exec.
const childEnv = "LOCALCHAN_TEST_CHILD"

// childNATSEnv: the child answers "start.*" over NATS at this URL instead (as a nexlet
// without the channel does), until its stdin closes.
const childNATSEnv = "LOCALCHAN_TEST_NATS"

// childCallEnv "1": the child calls the node before it serves (see child).
const childCallEnv = "LOCALCHAN_TEST_CALL"

func natsChild(url string) int {
	nc, err := nats.Connect(url)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	defer nc.Close()
	if _, err := nc.Subscribe("start.*", func(m *nats.Msg) {
		go func() { _ = m.RespondMsg(&nats.Msg{Data: m.Data}) }()
	}); err != nil {
		return 2
	}
	if err := nc.Flush(); err != nil {
		return 2
	}
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) == "1" {
		os.Exit(child())
	}
	if url := os.Getenv(childNATSEnv); url != "" {
		os.Exit(natsChild(url))
	}
	os.Exit(m.Run())
}

func child() int {
	f, err := FromEnv(os.Getenv)
	if err != nil || f == nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	fd := int(f.Fd())
	flags, _ := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0)
	s, err := NewServer(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	// childCallEnv: call the node first (as a registration is), and answer "answer"
	// with what the node said.
	var answer []byte
	if os.Getenv(childCallEnv) == "1" {
		m, err := s.Call(context.Background(), "register", nats.Header{"K": {"v"}}, []byte("hi"))
		if err != nil {
			fmt.Fprintln(os.Stderr, "child: call:", err)
			return 2
		}
		answer = m.Data
	}
	if err := s.Announce(); err != nil {
		return 2
	}
	var wg sync.WaitGroup
	err = s.Serve(func(r *Request) {
		wg.Go(func() {
			switch r.Subject {
			case "echo":
				_ = r.Reply(&nats.Msg{Header: nats.Header{"Progress": {"starting"}}})
				_ = r.Reply(&nats.Msg{Header: r.Header, Data: r.Data})
			case "fds":
				out, err := exec.Command("/bin/sh", "-c", "ls -l /proc/self/fd/").CombinedOutput()
				if err != nil {
					out = append(out, err.Error()...)
				}
				_ = r.Reply(&nats.Msg{Data: out})
			case "answer":
				_ = r.Reply(&nats.Msg{Data: answer})
			case "start.x":
				_ = r.Reply(&nats.Msg{Data: r.Data})
			case "cloexec":
				_ = r.Reply(&nats.Msg{Data: fmt.Appendf(nil, "%d %v", fd, flags&unix.FD_CLOEXEC != 0)})
			}
		})
	})
	wg.Wait()
	if err != nil {
		return 1
	}
	return 0
}

// startChild runs the test binary as a nexlet holding one end of a pair, passed as
// descriptor 3 the way the supervisor passes it; it returns the node's end.
func startChild(t testing.TB, env ...string) (*Client, *exec.Cmd) {
	t.Helper()
	nodeEnd, nexletEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0])
	cmd.Env = append([]string{childEnv + "=1", EnvFD + "=3"}, env...)
	cmd.ExtraFiles = []*os.File{nexletEnd}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	nexletEnd.Close()
	c, err := NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		_ = cmd.Wait()
	})
	return c, cmd
}

func waitServing(t testing.TB, c *Client) {
	t.Helper()
	testkit.EventuallyWithin(t, 10*time.Second, "the child announced it serves", c.Serving)
}

func call(t *testing.T, c *Client, subject string, hdr nats.Header, data []byte) []*nats.Msg {
	t.Helper()
	ch := make(chan *nats.Msg, 8)
	cancel, err := c.Request(subject, hdr, data, ch)
	if err != nil {
		t.Fatal(err)
	}
	defer cancel()
	var got []*nats.Msg
	for {
		select {
		case m := <-ch:
			got = append(got, m)
			if m.Header.Get("Progress") == "" {
				return got
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: no answer; got %d messages", subject, len(got))
		}
	}
}

// TestRequestsToAChildProcess: requests and their replies (a progress report, then the
// answer with its headers and body) cross a real socket pair to a real child process,
// many at once, and one larger than any datagram; each reply reaches its own request.
func TestRequestsToAChildProcess(t *testing.T) {
	c, _ := startChild(t)
	waitServing(t, c)
	big := bytes.Repeat([]byte("x"), 3<<20)
	got := call(t, c, "echo", nats.Header{"A": {"1", "2"}}, big)
	if len(got) != 2 || got[0].Header.Get("Progress") != "starting" || !bytes.Equal(got[1].Data, big) ||
		strings.Join(got[1].Header["A"], ",") != "1,2" {
		t.Fatalf("echo of 3 MiB: %d messages", len(got))
	}
	var wg sync.WaitGroup
	for i := range 50 {
		wg.Go(func() {
			body := fmt.Appendf(nil, "request %d", i)
			got := call(t, c, "echo", nil, body)
			if !bytes.Equal(got[len(got)-1].Data, body) {
				t.Errorf("request %d answered %q", i, got[len(got)-1].Data)
			}
		})
	}
	wg.Wait()
}

// TestNoChildInheritsTheNexletsEnd: the nexlet's end is close-on-exec once FromEnv
// took it (it was inherited without the flag), so a process the nexlet starts (a
// workload) holds no socket; the node's end is close-on-exec from the start.
func TestNoChildInheritsTheNexletsEnd(t *testing.T) {
	c, _ := startChild(t)
	waitServing(t, c)
	if got := string(call(t, c, "cloexec", nil, nil)[0].Data); got != "3 true" {
		t.Fatalf("the nexlet's end: %q, want descriptor 3 close-on-exec", got)
	}
	if got := string(call(t, c, "fds", nil, nil)[0].Data); strings.Contains(got, "socket:") {
		t.Fatalf("a process the nexlet started holds a socket:\n%s", got)
	}
	nodeEnd, nexletEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	defer nodeEnd.Close()
	defer nexletEnd.Close()
	for _, f := range []*os.File{nodeEnd, nexletEnd} {
		if fl, _ := unix.FcntlInt(f.Fd(), unix.F_GETFD, 0); fl&unix.FD_CLOEXEC == 0 {
			t.Fatalf("%s is not close-on-exec", f.Name())
		}
	}
}

// TestNexletExitClosesTheChannel: when the nexlet dies, the node's end reports closed
// and a request fails at once (the node then goes over NATS); a reply that never came
// is left to the caller's timeout.
func TestNexletExitClosesTheChannel(t *testing.T) {
	c, cmd := startChild(t)
	waitServing(t, c)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the channel stops serving after its nexlet died", func() bool { return !c.Serving() })
	if _, err := c.Request("echo", nil, nil, make(chan *nats.Msg, 1)); err == nil {
		t.Fatal("a request on a closed channel succeeded")
	}
}

// TestNotServingUntilAnnounced: a nexlet that holds its end but never announces (one
// that does not serve the channel) leaves the node on NATS.
func TestNotServingUntilAnnounced(t *testing.T) {
	c, _ := clientOnly(t)
	time.Sleep(50 * time.Millisecond)
	if c.Serving() {
		t.Fatal("serving without an announcement")
	}
}

// TestFromEnvRefusesWhatIsNotAUnixStreamSocket: a descriptor that is not a Unix stream
// socket (a file, a datagram socket, a TCP socket) or a bad number is refused, naming
// the variable and what is wrong (before, the datagram and TCP sockets' refusals ended
// in "(<nil>)", the getsockopt error of a call that had succeeded).
func TestFromEnvRefusesWhatIsNotAUnixStreamSocket(t *testing.T) {
	f, err := os.CreateTemp(t.TempDir(), "x")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[0])
	defer unix.Close(fds[1])
	tcp, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(tcp)
	for _, c := range []struct{ v, want string }{
		{"x", "want a file descriptor"}, {"1", "want a file descriptor"},
		{fmt.Sprint(f.Fd()), "not a socket: socket operation on non-socket"},
		{fmt.Sprint(fds[0]), "not a stream socket (type 2)"},
		{fmt.Sprint(tcp), "not a Unix socket (domain 2)"},
	} {
		_, err := FromEnv(func(string) string { return c.v })
		if err == nil || !strings.Contains(err.Error(), EnvFD) || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s=%s: %v, want a refusal naming the variable and %q", EnvFD, c.v, err, c.want)
		}
	}
	if _, err := FromEnv(func(string) string { return fmt.Sprint(f.Fd()) }); !errors.Is(err, unix.ENOTSOCK) {
		t.Errorf("a file: %v, want ENOTSOCK wrapped", err)
	}
	if f, err := FromEnv(func(string) string { return "" }); f != nil || err != nil {
		t.Errorf("without the variable: %v %v", f, err)
	}
}

// BenchmarkRoundTrip compares one request and its answer (a start request's size)
// between two connections through a NATS server on loopback, as a node and its nexlet
// talk without the channel, with the same over a socket pair. Both ends run in this
// process (the NATS server too), so it shows the transport's own cost; across
// processes each hop also waits for a core.
func BenchmarkRoundTrip(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 1500)
	hdr := nats.Header{"Nex-Progress": {"5s"}}
	b.Run("nats", func(b *testing.B) {
		s := testnats.Start(b, testnats.Options{})
		node, nexlet := testnats.Connect(b, s), testnats.Connect(b, s)
		if _, err := nexlet.Subscribe("start.*", func(m *nats.Msg) {
			_ = m.RespondMsg(&nats.Msg{Data: m.Data})
		}); err != nil {
			b.Fatal(err)
		}
		_ = nexlet.Flush()
		benchNATS(b, node, hdr, body)
	})
	b.Run("local", func(b *testing.B) {
		nodeEnd, nexletEnd, err := Pair()
		if err != nil {
			b.Fatal(err)
		}
		c, err := NewClient(nodeEnd)
		if err != nil {
			b.Fatal(err)
		}
		s, err := NewServer(nexletEnd)
		if err != nil {
			b.Fatal(err)
		}
		_ = s.Announce()
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = s.Serve(func(r *Request) { go func() { _ = r.Reply(&nats.Msg{Data: r.Data}) }() })
		}()
		benchLocal(b, c, hdr, body)
		b.StopTimer()
		c.Close()
		<-done
		s.Close()
	})
}

// TestStuckNexletClosesTheChannel: a nexlet that stops reading (stuck, stopped) does
// not hold the node's requests up: once the socket is full, a write waits at most its
// bound, fails, and closes the channel (the node then goes over NATS).
func TestStuckNexletClosesTheChannel(t *testing.T) {
	c, _ := clientOnly(t)
	c.c.writeWait = 100 * time.Millisecond
	big := make([]byte, 1<<20)
	start := time.Now()
	for i := 0; ; i++ {
		if _, err := c.Request("echo", nil, big, make(chan *nats.Msg, 1)); err != nil {
			break
		}
		if i > 100 {
			t.Fatal("100 MiB written to a socket nobody reads")
		}
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Fatalf("the failing write took %s", d)
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the channel closed after a failed write", c.closedNow)
}

func (cl *Client) closedNow() bool {
	cl.mu.Lock()
	defer cl.mu.Unlock()
	return cl.closed
}

// BenchmarkRoundTripProcess is BenchmarkRoundTrip with the answering end in a child
// process, as the nexlet is: the node's request and its answer through a NATS server (in
// this process, so one process hop fewer than a node, its server and its nexlet have)
// against the same over the socket pair.
func BenchmarkRoundTripProcess(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 1500)
	hdr := nats.Header{"Nex-Progress": {"5s"}}
	b.Run("nats", func(b *testing.B) {
		s := testnats.Start(b, testnats.Options{})
		node := testnats.Connect(b, s)
		cmd := exec.Command(os.Args[0])
		cmd.Env = []string{childNATSEnv + "=" + s.ClientURL()}
		cmd.Stderr = os.Stderr
		in, _ := cmd.StdinPipe()
		out, _ := cmd.StdoutPipe()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		defer func() { in.Close(); _ = cmd.Wait() }()
		if line, _ := bufio.NewReader(out).ReadString('\n'); line != "ready\n" {
			b.Fatalf("child: %q", line)
		}
		benchNATS(b, node, hdr, body)
	})
	b.Run("local", func(b *testing.B) {
		c, _ := startChild(b)
		waitServing(b, c)
		benchLocal(b, c, hdr, body)
	})
}

// benchNATS times one request and its answer through node's NATS server: the node's
// side of a start request without the channel (a reply inbox per request).
func benchNATS(b *testing.B, node *nats.Conn, hdr nats.Header, body []byte) {
	ch := make(chan *nats.Msg, 64)
	b.ResetTimer()
	for b.Loop() {
		inbox := node.NewInbox()
		sub, err := node.ChanSubscribe(inbox, ch)
		if err != nil {
			b.Fatal(err)
		}
		if err := node.PublishMsg(&nats.Msg{Subject: "start.x", Reply: inbox, Header: hdr, Data: body}); err != nil {
			b.Fatal(err)
		}
		<-ch
		_ = sub.Unsubscribe()
	}
}

// benchLocal times the same on the channel c.
func benchLocal(b *testing.B, c *Client, hdr nats.Header, body []byte) {
	ch := make(chan *nats.Msg, 64)
	b.ResetTimer()
	for b.Loop() {
		cancel, err := c.Request("start.x", hdr, body, ch)
		if err != nil {
			b.Fatal(err)
		}
		<-ch
		cancel()
	}
}

// TestCallFromAChildProcess: a real child calls the node before it serves (as the
// native nexlet registers); the call waits on the node's end until the node takes
// calls (OnCall), its answer reaches the child, and the child then serves requests.
func TestCallFromAChildProcess(t *testing.T) {
	c, _ := startChild(t, childCallEnv+"=1")
	time.Sleep(50 * time.Millisecond) // the call waits for OnCall meanwhile
	if c.Serving() {
		t.Fatal("the child served before its call was answered")
	}
	c.OnCall(func(cl *Call) {
		go func() {
			if cl.Subject != "register" || cl.Header.Get("K") != "v" {
				_ = cl.Reply(&nats.Msg{Data: []byte("bad call")})
				return
			}
			_ = cl.Reply(&nats.Msg{Data: append([]byte("ok:"), cl.Data...)})
		}()
	})
	waitServing(t, c)
	got := call(t, c, "answer", nil, nil)
	if string(got[len(got)-1].Data) != "ok:hi" {
		t.Fatalf("the child got %q, want %q", got[len(got)-1].Data, "ok:hi")
	}
}

// clientOnly is the node's client on a new pair whose nexlet end no server serves:
// the test's to read from, leave unread or close. Both close at the test's end.
func clientOnly(t *testing.T) (*Client, *os.File) {
	t.Helper()
	nodeEnd, nexletEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nexletEnd.Close() })
	c, err := NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, nexletEnd
}

// pairInProcess is a connected Client and Server in this process.
func pairInProcess(t testing.TB) (*Client, *Server) {
	t.Helper()
	nodeEnd, nexletEnd, err := Pair()
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewServer(nexletEnd)
	if err != nil {
		t.Fatal(err)
	}
	c, err := NewClient(nodeEnd)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	return c, s
}

// TestCallKeepsStartRequestsForServe: a start request the node sends before its answer
// to the call (it may, once it accepted the registration) is handed to Serve first.
func TestCallKeepsStartRequestsForServe(t *testing.T) {
	c, s := pairInProcess(t)
	replies := make(chan *nats.Msg, 4)
	c.OnCall(func(cl *Call) {
		if _, err := c.Request("start.early", nil, []byte("w1"), replies); err != nil {
			t.Error(err)
		}
		_ = cl.Reply(&nats.Msg{Data: []byte("accepted")})
	})
	m, err := s.Call(context.Background(), "register", nil, nil)
	if err != nil || string(m.Data) != "accepted" {
		t.Fatalf("call: %v %v", m, err)
	}
	got := make(chan string, 1)
	go func() {
		_ = s.Serve(func(r *Request) {
			got <- r.Subject + " " + string(r.Data)
			_ = r.Reply(&nats.Msg{Data: r.Data})
		})
	}()
	select {
	case g := <-got:
		if g != "start.early w1" {
			t.Fatalf("Serve got %q", g)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the start request read during the call never reached Serve")
	}
	select {
	case m := <-replies:
		if string(m.Data) != "w1" {
			t.Fatalf("reply %q", m.Data)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no reply to the early start")
	}
	_ = s.StopServing()
}

// TestCallsBeforeTheNodeServesAreBounded: calls beyond maxQueuedCalls that come
// before OnCall are answered with an error at once, not kept.
func TestCallsBeforeTheNodeServesAreBounded(t *testing.T) {
	c, s := pairInProcess(t)
	for i := range maxQueuedCalls {
		if err := s.c.write(msg{kind: kindCall, id: uint64(i + 1), subject: "x"}); err != nil {
			t.Fatal(err)
		}
	}
	m, err := s.Call(context.Background(), "one too many", nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if m.Header.Get("Nats-Service-Error-Code") != "503" {
		t.Fatalf("the call over the bound got %v %q, want a 503", m.Header, m.Data)
	}
	var n int
	var mu sync.Mutex
	c.OnCall(func(*Call) { mu.Lock(); n++; mu.Unlock() })
	mu.Lock()
	defer mu.Unlock()
	if n != maxQueuedCalls {
		t.Fatalf("%d calls were kept, want %d", n, maxQueuedCalls)
	}
}

// TestCallEndsWithItsContext: a call nobody answers ends with its context, and the
// channel is closed (a half-read frame cannot be resumed); the node sees it closed.
func TestCallEndsWithItsContext(t *testing.T) {
	c, s := pairInProcess(t)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := s.Call(ctx, "register", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call: %v, want the context's deadline", err)
	}
	if _, err := s.Call(context.Background(), "again", nil, nil); err == nil {
		t.Fatal("a second call on the closed channel succeeded")
	}
	testkit.EventuallyWithin(t, 10*time.Second, "the node's end closed", c.closedNow)
}

// TestServesRegistrationFromEnv: only a node that says so (EnvCalls) gets the
// registration on the channel; an older nexd ignores calls and never answers.
func TestServesRegistrationFromEnv(t *testing.T) {
	env := func(v string) func(string) string {
		return func(k string) string {
			if k == EnvCalls {
				return v
			}
			return ""
		}
	}
	if !ServesRegistration(env(CallRegister)) || ServesRegistration(env("")) || ServesRegistration(env("other")) {
		t.Fatal("ServesRegistration reads EnvCalls wrong")
	}
}

// TestLogLevelReachesTheNexlet: a level the node sends reaches the nexlet's OnLogLevel,
// in order with the start requests around it.
func TestLogLevelReachesTheNexlet(t *testing.T) {
	c, s := pairInProcess(t)
	got := make(chan string, 4)
	s.OnLogLevel = func(l string) { got <- "level " + l }
	served := make(chan error, 1)
	go func() {
		served <- s.Serve(func(r *Request) { got <- "request " + r.Subject })
	}()
	for _, send := range []func() error{
		func() error { _, err := c.Request("A", nil, nil, make(chan *nats.Msg, 1)); return err },
		func() error { return c.LogLevel("WARN") },
		func() error { _, err := c.Request("B", nil, nil, make(chan *nats.Msg, 1)); return err },
	} {
		if err := send(); err != nil {
			t.Fatal(err)
		}
	}
	for _, want := range []string{"request A", "level WARN", "request B"} {
		select {
		case g := <-got:
			if g != want {
				t.Fatalf("nexlet got %q, want %q", g, want)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("nexlet never got %q", want)
		}
	}
	_ = s.Close()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// endsAtTheAnswer is the nexlet's socket, ending the call's context at the moment the
// answer is read: the first read that returns data cancels, then waits until the
// context's callback has set the read deadline before it hands the answer on.
type endsAtTheAnswer struct {
	net.Conn
	cancel   context.CancelFunc
	once     sync.Once
	deadline chan struct{} // closed at the first deadline set in the past
	set      sync.Once
}

func (e *endsAtTheAnswer) Read(b []byte) (int, error) {
	n, err := e.Conn.Read(b)
	if n > 0 {
		e.once.Do(func() {
			e.cancel()
			select {
			case <-e.deadline:
			case <-time.After(10 * time.Second):
				panic("the context's callback never set the read deadline")
			}
		})
	}
	return n, err
}

func (e *endsAtTheAnswer) SetReadDeadline(t time.Time) error {
	err := e.Conn.SetReadDeadline(t)
	if !t.IsZero() && !t.After(time.Now()) {
		e.set.Do(func() { close(e.deadline) })
	}
	return err
}

// TestCallAnsweredAsItsContextEnds: the call's context ends just as the answer
// arrives (its callback has set the read deadline, stop reports false). The call
// succeeds, and the Serve that follows serves the node's start requests instead of
// returning at once as if StopServing had been called.
func TestCallAnsweredAsItsContextEnds(t *testing.T) {
	c, s := pairInProcess(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := &endsAtTheAnswer{Conn: s.c.c, cancel: cancel, deadline: make(chan struct{})}
	s.c.c, s.c.r = e, bufio.NewReaderSize(e, 64<<10)
	c.OnCall(func(cl *Call) { _ = cl.Reply(&nats.Msg{Data: []byte("accepted")}) })
	m, err := s.Call(ctx, "register", nil, nil)
	if err != nil || string(m.Data) != "accepted" {
		t.Fatalf("call: %v %v", m, err)
	}
	if ctx.Err() == nil {
		t.Fatal("the test did not end the context at the answer")
	}
	got := make(chan string, 1)
	served := make(chan error, 1)
	go func() {
		served <- s.Serve(func(r *Request) {
			got <- r.Subject
			_ = r.Reply(&nats.Msg{Data: r.Data})
		})
	}()
	replies := make(chan *nats.Msg, 1)
	if _, err := c.Request("start.w1", nil, []byte("w1"), replies); err != nil {
		t.Fatal(err)
	}
	select {
	case g := <-got:
		if g != "start.w1" {
			t.Fatalf("Serve got %q", g)
		}
	case err := <-served:
		t.Fatalf("Serve returned (%v) before serving a start request: the call's deadline ended it", err)
	case <-time.After(10 * time.Second):
		t.Fatal("the start request never reached Serve")
	}
	select {
	case <-replies:
	case <-time.After(10 * time.Second):
		t.Fatal("no reply to the start")
	}
	_ = s.StopServing()
	if err := <-served; err != nil {
		t.Fatalf("Serve: %v", err)
	}
}

// TestCallerGoneOnceTheNexletGaveUp: a call kept until the node serves calls is known
// stale when it is served if the nexlet gave it up meanwhile (its context ended, it
// closed its end), though the channel's reader may not have seen the close yet; a call
// whose nexlet waits is not.
func TestCallerGoneOnceTheNexletGaveUp(t *testing.T) {
	c, s := pairInProcess(t)
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Call(ctx, "register", nil, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("call: %v, want the context's deadline", err)
	}
	got := make(chan bool, 1)
	c.OnCall(func(cl *Call) { got <- cl.CallerGone() })
	if gone := <-got; !gone {
		t.Fatal("the call the nexlet gave up is not known stale")
	}

	c2, s2 := pairInProcess(t)
	c2.OnCall(func(cl *Call) {
		got <- cl.CallerGone()
		_ = cl.Reply(&nats.Msg{Data: []byte("ok")})
	})
	if _, err := s2.Call(context.Background(), "register", nil, nil); err != nil {
		t.Fatal(err)
	}
	if gone := <-got; gone {
		t.Fatal("a call whose nexlet waits is taken for stale")
	}
}

// TestSlowReaderIsNotStuck: a peer that keeps taking a large frame, if slowly (a
// nexlet starved on a loaded host), is not taken for a stuck one: the write deadline
// bounds each wait for the peer to take more, not the whole frame. Before, a 3 MiB
// frame read 64 KiB every 100 ms (about 5 s in all) failed at the 2 s deadline of the
// whole write, and the channel closed.
func TestSlowReaderIsNotStuck(t *testing.T) {
	c, nexletEnd := clientOnly(t)
	big := bytes.Repeat([]byte("x"), 3<<20)
	read := make(chan int64, 1)
	go func() {
		defer nexletEnd.Close()
		var n int64
		buf := make([]byte, 64<<10)
		for n < int64(len(big)) {
			k, err := nexletEnd.Read(buf)
			n += int64(k)
			if err != nil {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		read <- n
	}()
	if _, err := c.Request("echo", nil, big, make(chan *nats.Msg, 1)); err != nil {
		t.Fatalf("a 3 MiB frame to a slow reader: %v", err)
	}
	if n := <-read; n < int64(len(big)) {
		t.Fatalf("the reader got %d bytes of at least %d", n, len(big))
	}
	if c.closedNow() {
		t.Fatal("the channel closed")
	}
}
