package bench

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/nexd-project/nexd/control"
)

// ready: exec of nexd to READY=1, against an external server and with the embedded one
// (JetStream in a fresh state dir each time, so every start is a cold one).
func (h *Harness) ready(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	runs := 5
	if h.o.Quick {
		runs = 3
	}
	ns, err := h.natsServer()
	if err != nil {
		return nil, err
	}
	var out []Result
	for _, v := range []struct {
		name   string
		limit  float64
		target string
	}{{"external NATS", 100, "<= 100 ms"}, {"embedded NATS + JetStream", 250, "<= 250 ms"}} {
		r := Result{Scenario: "ready", Variant: v.name}
		var ds []time.Duration
		for i := range runs {
			spec := nodeSpec{Name: fmt.Sprintf("ready%d", i)}
			if v.name == "external NATS" {
				spec.Servers = []string{ns.URL()}
			} else {
				port, err := freePort()
				if err != nil {
					return out, err
				}
				spec.Embedded = port
			}
			n, d, err := h.readyNode(ctx, spec)
			if err != nil {
				return append(out, r), err
			}
			ds = append(ds, d)
			if err := h.stopNode(n); err != nil {
				r.notef("%v", err)
			}
		}
		s := Summarize(ds)
		r.add("starts", float64(s.N), "")
		r.ms("exec to READY=1 p50", s.P50).atMost(v.limit, v.target)
		r.ms("exec to READY=1 max", s.Max)
		r.notef("READY=1 is sent after NATS is up and the native nexlet registered; fresh state dir per start")
		out = append(out, r)
	}
	return out, nil
}

// control: status requests over the control socket, one client then eight.
func (h *Harness) control(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	ns, err := h.natsServer()
	if err != nil {
		return nil, err
	}
	n, _, err := h.readyNode(ctx, nodeSpec{Servers: []string{ns.URL()}})
	if err != nil {
		return nil, err
	}
	window := 5 * time.Second
	if h.o.Quick {
		window = time.Second
	}
	var out []Result
	for _, clients := range []int{1, 8} {
		r := Result{Scenario: "control", Variant: fmt.Sprintf("status, %d client(s)", clients)}
		var mu sync.Mutex
		var ds []time.Duration
		var errs int
		var firstErr error
		var wg sync.WaitGroup
		end := time.Now().Add(window)
		start := time.Now()
		for range clients {
			wg.Go(func() {
				c := control.NewClient(n.Socket())
				defer c.Close()
				var local []time.Duration
				for time.Now().Before(end) && ctx.Err() == nil && len(local) < 1_000_000 {
					t := time.Now()
					_, err := c.Status(ctx)
					if err != nil {
						mu.Lock()
						errs++
						if firstErr == nil {
							firstErr = err
						}
						mu.Unlock()
						continue
					}
					local = append(local, time.Since(t))
				}
				mu.Lock()
				ds = append(ds, local...)
				mu.Unlock()
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		s := Summarize(ds)
		r.add("requests/s", float64(s.N)/elapsed.Seconds(), "req/s")
		r.addSummary("latency", s)
		if errs > 0 {
			r.add("errors", float64(errs), "")
			r.notef("first error: %v", firstErr)
		}
		out = append(out, r)
	}
	return out, nil
}
