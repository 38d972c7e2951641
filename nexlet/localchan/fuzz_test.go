package localchan

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"maps"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

// bufConn is the write side of a conn for the round trips below: a frame written goes
// to the buffer.
type bufConn struct {
	net.Conn
	buf bytes.Buffer
}

func (b *bufConn) Write(p []byte) (int, error)      { return b.buf.Write(p) }
func (b *bufConn) SetWriteDeadline(time.Time) error { return nil }
func (b *bufConn) Close() error                     { return nil }
func (b *bufConn) reader() *conn                    { return &conn{r: bufio.NewReader(bytes.NewReader(b.buf.Bytes()))} }
func readerOf(data []byte) *conn                    { return &conn{r: bufio.NewReader(bytes.NewReader(data))} }
func sameHeader(a, b nats.Header) bool              { return maps.EqualFunc(a, b, slices.Equal) }
func frameSeed(m msg) []byte                        { w := &bufConn{}; (&conn{c: w}).write(m); return w.buf.Bytes() }
func feedSeed(batch ...*nats.Msg) []byte            { return encodeFeeds(batch) }
func frameOf(kind byte, id uint64, data []byte) []byte {
	return frameSeed(msg{kind: kind, id: id, data: data})
}

// FuzzReadFrame reads frames from arbitrary bytes, as each end reads what the other
// (a rogue nexlet, a broken node) sends: no panic, a frame length outside its bounds
// is refused before anything is allocated for it, and a frame read is written back
// the same.
func FuzzReadFrame(f *testing.F) {
	f.Add(frameSeed(msg{kind: kindRequest, id: 1, subject: "$NEX.SVC.ns.control.ADEPLOY.x", header: nats.Header{"a": {"1", "2"}}, data: []byte(`{"x":1}`)}))
	f.Add(frameSeed(msg{kind: kindReply, id: 7, data: []byte("ok")}))
	f.Add(frameSeed(msg{kind: kindServing}))
	f.Add(frameSeed(msg{kind: kindFeed, id: 3, data: feedSeed(&nats.Msg{Subject: "$NEX.FEED.ns.logs.W1", Data: []byte("line")})}))
	f.Add([]byte{0, 0, 0, 15, kindCall, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 2, '{', '}'})
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add([]byte{0, 0, 0, 15, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0xff, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		c := readerOf(data)
		for range 4 {
			m, err := c.read()
			if err != nil {
				if len(data) >= 4 {
					if n := binary.BigEndian.Uint32(data); n > MaxFrame && err.Error() == "" {
						t.Fatalf("frame of %d bytes refused without a reason", n)
					}
				}
				return
			}
			w := &bufConn{}
			if err := (&conn{c: w}).write(m); err != nil {
				t.Fatalf("frame %+v read but not written back: %v", m, err)
			}
			back, err := w.reader().read()
			if err != nil {
				t.Fatalf("frame %+v written back unreadable: %v", m, err)
			}
			if back.kind != m.kind || back.id != m.id || back.subject != m.subject || !bytes.Equal(back.data, m.data) || !sameHeader(back.header, m.header) {
				t.Fatalf("frame %+v read back as %+v", m, back)
			}
		}
	})
}

// FuzzDecodeFeeds decodes arbitrary feed batches, as the node does a rogue nexlet's:
// no panic, at most maxFeedHeaders header pairs a message, one message in a batch over
// MaxFeedBatch, no more messages than the batch has bytes, and a batch decoded is
// encoded back to a batch that decodes the same.
func FuzzDecodeFeeds(f *testing.F) {
	f.Add(feedSeed(&nats.Msg{Subject: "$NEX.FEED.ns.logs.W1", Header: nats.Header{"Nex-Level": {"info"}}, Data: []byte("a line")},
		&nats.Msg{Subject: "$NEX.FEED.ns.metrics.W1", Data: []byte(`{"cpu":1}`)}))
	f.Add(feedSeed(&nats.Msg{Subject: "s"}))
	f.Add([]byte{0, 0xff, 0xff, 0xff, 0xff, 0x0f})
	f.Add([]byte{0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, data []byte) {
		batch, err := decodeFeeds(data)
		if err != nil {
			if err != errBadFeeds {
				t.Fatalf("error %v, want %v", err, errBadFeeds)
			}
			return
		}
		if len(data) > MaxFeedBatch && len(batch) > 1 {
			t.Fatalf("a batch of %d bytes (over %d) decoded to %d messages", len(data), MaxFeedBatch, len(batch))
		}
		if len(batch) > len(data) {
			t.Fatalf("%d bytes decoded to %d messages", len(data), len(batch))
		}
		for _, m := range batch {
			pairs := 0
			for _, vs := range m.Header {
				pairs += len(vs)
			}
			if pairs > maxFeedHeaders {
				t.Fatalf("a message with %d header pairs", pairs)
			}
		}
		again, err := decodeFeeds(encodeFeeds(batch))
		if err != nil || len(again) != len(batch) {
			t.Fatalf("batch of %d messages re-encoded: %d messages, %v", len(batch), len(again), err)
		}
		for i := range batch {
			a, b := batch[i], again[i]
			if a.Subject != b.Subject || !bytes.Equal(a.Data, b.Data) || !sameHeader(a.Header, b.Header) {
				t.Fatalf("message %d: %+v re-encoded as %+v", i, a, b)
			}
		}
	})
}

// FuzzClientStream has a rogue nexlet write arbitrary bytes on its end of a real socket
// pair, then close it: the node's end must not panic, must close (a request in flight
// gets ErrClosed or its channel nothing), and must not hang.
func FuzzClientStream(f *testing.F) {
	f.Add(frameOf(kindServing, 0, nil))
	f.Add(append(frameOf(kindReply, 1, []byte("r")), frameOf(kindFeed, 1, feedSeed(&nats.Msg{Subject: "$NEX.FEED.ns.logs.W1"}))...))
	f.Add(frameSeed(msg{kind: kindCall, id: 2, subject: "$NEX.SVC.x", header: nats.Header{"k": {"v"}}, data: []byte("{}")}))
	f.Add(append(frameOf(kindFeed, 1, []byte{0xff}), frameOf(kindFeed, 2, nil)...))
	f.Add([]byte{0, 0, 0, 3, 1})
	f.Fuzz(func(t *testing.T, data []byte) {
		node, nf, err := Pair()
		if err != nil {
			t.Fatal(err)
		}
		nexlet, err := net.FileConn(nf)
		nf.Close()
		if err != nil {
			t.Fatal(err)
		}
		cl, err := NewClient(node)
		if err != nil {
			t.Fatal(err)
		}
		defer cl.Close()
		cl.OnFeed(func([]*nats.Msg) error { return nil }, nil)
		cl.OnCall(func(c *Call) { _ = c.Reply(&nats.Msg{Data: []byte("ok")}) })
		replies := make(chan *nats.Msg, 1)
		cancel, _ := cl.Request("$NEX.SVC.ns.control.ADEPLOY.x", nil, []byte("{}"), replies)
		if cancel != nil {
			defer cancel()
		}
		// The nexlet's end reads what the node sends (the request, acks, call
		// replies) so that the node's writes never wait on a full socket.
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b [4096]byte
			for {
				if _, err := nexlet.Read(b[:]); err != nil {
					return
				}
			}
		}()
		_ = nexlet.SetWriteDeadline(time.Now().Add(10 * time.Second))
		_, _ = nexlet.Write(data)
		_ = nexlet.(*net.UnixConn).CloseWrite()
		defer nexlet.Close()
		select {
		case <-cl.done:
		case <-time.After(10 * time.Second):
			t.Fatalf("the node's end still open 10 s after the nexlet closed its end, having sent %q", data)
		}
		if !cl.Gone() {
			t.Fatal("the channel closed but the client is not gone")
		}
	})
}
