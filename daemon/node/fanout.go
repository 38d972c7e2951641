package node

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
)

// gather publishes one request on subject and hands each reply to fn until max replies
// came, fn returns false, timeout passes or ctx ends (scatter-gather; nats.go has no
// RequestMany). "No responders" ends it early without an error: nobody holds the
// subject, which for a fan-out to nexlets just means none answered.
func gather(ctx context.Context, nc *nats.Conn, subject string, data []byte, max int, timeout time.Duration, fn func(*nats.Msg) bool) error {
	if max <= 0 {
		return nil
	}
	inbox := nc.NewInbox()
	ch := make(chan *nats.Msg, max+1)
	sub, err := nc.ChanSubscribe(inbox, ch)
	if err != nil {
		return fmt.Errorf("subscribe reply inbox for %s: %w", subject, err)
	}
	defer func() { _ = sub.Unsubscribe() }()
	if err := nc.PublishRequest(subject, inbox, data); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	for got := 0; got < max; {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
			return nil
		case m := <-ch:
			if isNoResponders(m) {
				return nil
			}
			got++
			if !fn(m) {
				return nil
			}
		}
	}
	return nil
}

func isNoResponders(m *nats.Msg) bool {
	return len(m.Data) == 0 && m.Header != nil && m.Header.Get("Status") == "503"
}
