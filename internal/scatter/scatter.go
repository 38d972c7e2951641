// Package scatter is the client side of a NATS scatter-gather: publish one request and
// collect every reply until they stop arriving. nexctl and nexbench share it, so both
// end an auction or a ping the same way.
package scatter

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
)

// Options bound a gather.
type Options struct {
	First time.Duration // wait at most this long for the first reply
	Stall time.Duration // then end this long after the latest reply
	Max   int           // and stop once this many arrived (0: no limit)
	// Header goes with the request (nexd's optional extensions; others ignore them).
	Header nats.Header
}

// Gather publishes data on subject with a fresh reply inbox and returns the replies
// that arrive: it ends Stall after the latest reply, after First without any, at Max
// replies, or at once when the server says nobody listens.
func Gather(ctx context.Context, nc *nats.Conn, subject string, data []byte, o Options) ([]*nats.Msg, error) {
	inbox := nc.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, fmt.Errorf("subscribe for replies to %s: %w", subject, err)
	}
	defer sub.Unsubscribe()
	// A large fleet answers in a burst; never drop replies for a slow reader.
	_ = sub.SetPendingLimits(-1, -1)
	if err := nc.PublishMsg(&nats.Msg{Subject: subject, Reply: inbox, Data: data, Header: o.Header}); err != nil {
		return nil, fmt.Errorf("request %s: %w", subject, err)
	}
	var out []*nats.Msg
	deadline := time.Now().Add(o.First)
	for {
		wctx, cancel := context.WithDeadline(ctx, deadline)
		m, err := sub.NextMsgWithContext(wctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return out, ctx.Err()
			}
			return out, nil // quiet long enough: done
		}
		if NoResponders(m) {
			return out, nil
		}
		out = append(out, m)
		if o.Max > 0 && len(out) >= o.Max {
			return out, nil
		}
		deadline = time.Now().Add(o.Stall)
	}
}

// NoResponders reports the server's "no responders" status reply.
func NoResponders(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header.Get("Status") == "503"
}
