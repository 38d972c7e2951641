package logging

import (
	"bytes"
	"context"
	"log/slog"
	"sync/atomic"

	"github.com/nexd-project/nexd/protocol"
)

// natsHandler publishes each record as one formatted line on the node log feed:
// stdout below WARN, stderr from WARN up. Until AttachNATS it drops records.
type natsHandler struct {
	stdout, stderr slog.Handler
}

func newNATSHandler(pub *atomic.Pointer[publisher], format string, attrs []slog.Attr) *natsHandler {
	return &natsHandler{
		stdout: lineHandler(&feedWriter{pub: pub, stream: "stdout"}, format).WithAttrs(attrs),
		stderr: lineHandler(&feedWriter{pub: pub, stream: "stderr"}, format).WithAttrs(attrs),
	}
}

func (h *natsHandler) Enabled(context.Context, slog.Level) bool { return true }

func (h *natsHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level >= slog.LevelWarn {
		return h.stderr.Handle(ctx, r)
	}
	return h.stdout.Handle(ctx, r)
}

func (h *natsHandler) WithAttrs(attrs []slog.Attr) slog.Handler {
	return &natsHandler{stdout: h.stdout.WithAttrs(attrs), stderr: h.stderr.WithAttrs(attrs)}
}

func (h *natsHandler) WithGroup(name string) slog.Handler {
	return &natsHandler{stdout: h.stdout.WithGroup(name), stderr: h.stderr.WithGroup(name)}
}

// feedWriter receives exactly one Write per record from slog's text and JSON
// handlers and publishes it as one message.
type feedWriter struct {
	pub    *atomic.Pointer[publisher]
	stream string
}

func (w *feedWriter) Write(p []byte) (int, error) {
	pub := w.pub.Load()
	if pub == nil {
		return len(p), nil
	}
	m := feedMsg{subject: protocol.NodeLogSubject(pub.nodeID, w.stream), data: bytes.Clone(bytes.TrimRight(p, "\n"))}
	select {
	case pub.queue <- m:
	default:
		pub.dropped.Add(1)
	}
	return len(p), nil
}

// feedQueue bounds the records waiting for NATS; beyond it they are dropped.
const feedQueue = 1024

type feedMsg struct {
	subject string
	data    []byte
}

// publisher hands records to NATS from its own goroutine, so logging never waits
// on the network, and never re-enters the NATS client (or an embedded server that
// logs from inside its own locks) from a log call.
type publisher struct {
	p       Publisher
	nodeID  string
	queue   chan feedMsg
	stop    chan struct{}
	done    chan struct{}
	dropped atomic.Uint64
}

func startPublisher(p Publisher, nodeID string) *publisher {
	pub := &publisher{p: p, nodeID: nodeID, queue: make(chan feedMsg, feedQueue), stop: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(pub.done)
		for {
			select {
			case m := <-pub.queue:
				_ = pub.p.Publish(m.subject, m.data) // nowhere to report it but the log itself
			case <-pub.stop:
				// Hand over what is queued (the last lines before a shutdown
				// matter most), then stop.
				for {
					select {
					case m := <-pub.queue:
						_ = pub.p.Publish(m.subject, m.data)
					default:
						return
					}
				}
			}
		}
	}()
	return pub
}

func (pub *publisher) halt() {
	if pub != nil {
		close(pub.stop)
		<-pub.done
	}
}
