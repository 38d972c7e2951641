package testkit

import (
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
)

// BlockWrite gives nc, whose server stopped reading (a LagProxy's Blackhole), more to
// send than the kernel's buffers hold: 64 KiB publishes, 64 MiB at most, on a goroutine,
// until one has not returned for 300 ms, a socket write blocked with nats.go holding
// the connection's lock over it. It returns when that publish began, or ok false when
// none blocked within 30 s. done is closed once the publishing ends (a publish failed,
// or all were sent): wait for it before the test ends; closing nc ends a blocked one.
func BlockWrite(nc *nats.Conn) (blockedAt time.Time, done <-chan struct{}, ok bool) {
	var lastDone atomic.Int64
	filled := make(chan struct{})
	go func() {
		defer close(filled)
		junk := make([]byte, 64<<10)
		for range 1 << 10 {
			lastDone.Store(time.Now().UnixNano())
			if nc.Publish("junk", junk) != nil {
				return
			}
		}
	}()
	ok = WaitFor(30*time.Second, func() bool {
		last := lastDone.Load()
		return last != 0 && time.Since(time.Unix(0, last)) > 300*time.Millisecond
	})
	return time.Unix(0, lastDone.Load()), filled, ok
}
