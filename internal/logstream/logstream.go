// Package logstream is the optional bounded JetStream stream of workload output
// (log_stream): nexd creates it, nexctl reads a workload's history from it. It captures
// the log feeds $NEX.FEED.<namespace>.logs.<workload id>.stdout|stderr as they are
// published, keeping lines by age and bytes.
package logstream

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/nexd-project/nexd/protocol"
)

// Stream is the stream's name; every node of a NATS system shares it.
const Stream = "NEX_LOGS"

// subjects are the log feeds (a node's own logs in $NEX.FEED.system.logs.<node id>.*
// have the same shape and are kept too).
var subjects = []string{"$NEX.FEED.*.logs.*.*"}

// Ensure creates the stream, or updates its limits to maxAge and maxBytes (the last
// node to start decides when nodes disagree).
func Ensure(ctx context.Context, js jetstream.JetStream, maxAge time.Duration, maxBytes int64) error {
	cfg := jetstream.StreamConfig{
		Name:        Stream,
		Description: "workload output kept by nexd (log_stream)",
		Subjects:    subjects,
		Retention:   jetstream.LimitsPolicy,
		Discard:     jetstream.DiscardOld,
		MaxAge:      maxAge,
		MaxBytes:    maxBytes,
		Storage:     jetstream.FileStorage,
	}
	if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
		return fmt.Errorf("log stream %s: %w", Stream, err)
	}
	return nil
}

// Line is one stored line.
type Line struct {
	Time   time.Time `json:"time"`
	Stream string    `json:"stream"` // stdout or stderr
	Line   string    `json:"line"`
}

// ErrNoStream says no node keeps a log stream in this account and domain.
var ErrNoStream = errors.New("no log stream " + Stream)

// Read returns a workload's stored lines in order: those since since (zero: all), then
// only the last tail of them (0: all).
func Read(ctx context.Context, js jetstream.JetStream, ns, workloadID string, since time.Time, tail int) ([]Line, error) {
	s, err := js.Stream(ctx, Stream)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		return nil, ErrNoStream
	}
	if err != nil {
		return nil, fmt.Errorf("log stream %s: %w", Stream, err)
	}
	cc := jetstream.OrderedConsumerConfig{FilterSubjects: []string{protocol.LogsWildcard(ns, workloadID)}}
	if !since.IsZero() {
		cc.DeliverPolicy, cc.OptStartTime = jetstream.DeliverByStartTimePolicy, &since
	}
	c, err := s.OrderedConsumer(ctx, cc)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", Stream, err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", Stream, err)
	}
	pending := int(info.NumPending)
	var out []Line
	for pending > 0 {
		batch, err := c.Fetch(min(pending, 500), jetstream.FetchMaxWait(2*time.Second))
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", Stream, err)
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, _ := m.Metadata()
			l := Line{Stream: protocol.LastToken(m.Subject()), Line: string(m.Data())}
			if md != nil {
				l.Time = md.Timestamp
			}
			out = append(out, l)
			if tail > 0 && len(out) > 2*tail {
				out = append(out[:0], out[len(out)-tail:]...)
			}
		}
		if err := batch.Error(); err != nil {
			return nil, fmt.Errorf("read %s: %w", Stream, err)
		}
		if n == 0 {
			break
		}
		pending -= n
	}
	if tail > 0 && len(out) > tail {
		out = out[len(out)-tail:]
	}
	return out, nil
}
