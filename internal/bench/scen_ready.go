package bench

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nexd-project/nexd/control"
)

// ready: exec of nexd to READY=1, against an external server and with the embedded one
// (JetStream in a fresh state dir each time, so every start is a cold one). With
// --upstream-nex, upstream's exec to its ready line against an external server too,
// its starts alternating with nexd's so that load hits both alike.
func (h *Harness) ready(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	runs := h.o.ReadyStarts
	ns, err := h.natsServer()
	if err != nil {
		return nil, err
	}
	var out []Result
	if h.o.NexdB != "" || len(h.o.EnvB) > 0 {
		var stateEnv [2][]string // --state-records: node state in KV, one node id a side
		for i := range stateEnv {
			if h.o.ReadyStateKV {
				if stateEnv[i], err = readyState(ctx, ns.URL(), h.o.StateRecords); err != nil {
					return nil, err
				}
			}
		}
		r, err := h.readyAB(ctx, ns.URL(), runs, stateEnv)
		out = append(out, r)
		if err != nil || h.o.Upstream == "" {
			return out, err // an A/B run times only A and B
		}
	}
	if h.o.Upstream != "" {
		r, err := h.readySideBySide(ctx, ns.URL(), runs)
		out = append(out, r)
		if err != nil {
			return out, err
		}
	}
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
		r.notef("READY=1 is sent after NATS is up and the native nexlet registered and sent its first heartbeat (it bids); fresh state dir per start")
		out = append(out, r)
	}
	return out, nil
}

// readySideBySide alternates starts of upstream's node and of nexd against one
// external server (upstream first in even rounds) and reports both p50s and their
// ratio, the figure compare gives from its own starts.
func (h *Harness) readySideBySide(ctx context.Context, url string, runs int) (Result, error) {
	r := Result{Scenario: "ready", Variant: "upstream vs nexd, external NATS, alternating"}
	up, nx, err := h.alternateReady(ctx, url, url, "sbsready", runs)
	if err != nil {
		r.Err = err.Error()
		return r, err
	}
	u, x := Summarize(up), Summarize(nx)
	r.add("starts per side", float64(runs), "")
	r.ms("upstream exec to ready p50", u.P50)
	r.ms("nexd exec to READY=1 p50", x.P50)
	r.ms("upstream exec to ready max", u.Max)
	r.ms("nexd exec to READY=1 max", x.Max)
	if u.P50 > 0 {
		r.add("nexd / upstream (p50)", float64(x.P50)/float64(u.P50), "×")
	}
	r.notef("upstream: its %q log line (after its agents' Run: registered, first heartbeat published); nexd: READY=1 with the native nexlet registered and its first heartbeat in; a fresh state dir per start", upstreamReadyLog)
	return r, nil
}

// alternateReady times runs starts of upstream's node (against upURL) and of nexd
// (against nxURL), alternating, upstream first in even rounds.
func (h *Harness) alternateReady(ctx context.Context, upURL, nxURL, name string, runs int) (up, nx []time.Duration, err error) {
	for i := range runs {
		for _, upstreamTurn := range alternate(i) {
			if upstreamTurn {
				d, err := h.upstreamReady(ctx, upURL, i)
				if err != nil {
					return nil, nil, err
				}
				up = append(up, d)
				continue
			}
			n, d, err := h.readyNode(ctx, nodeSpec{Name: fmt.Sprintf("%s%d", name, i), Servers: []string{nxURL}})
			if err != nil {
				return nil, nil, err
			}
			nx = append(nx, d)
			if err := h.stopNode(n); err != nil {
				return nil, nil, err
			}
		}
	}
	return up, nx, nil
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

// readyAB alternates starts of two nexd (NexdB, or Nexd with EnvB) against one external
// server, one by one (A first in even rounds), so that load hits both alike, and
// reports both p50s and the median of the per-round ratios B/A.
func (h *Harness) readyAB(ctx context.Context, url string, runs int, stateEnv [2][]string) (Result, error) {
	b := cmp.Or(h.o.NexdB, h.o.Nexd)
	r := Result{Scenario: "ready", Variant: "A/B, external NATS, alternating"}
	var as, bs []time.Duration
	var ratios []float64
	first := 0
	if h.o.ReadyStateKV {
		first = -1 // a start of each side, not timed, on its bucket first (readyState)
	}
	for i := first; i < runs; i++ {
		var a, bd time.Duration
		for _, aTurn := range alternate(max(i, 0)) {
			spec := nodeSpec{Name: fmt.Sprintf("ab%d", i), Servers: []string{url}, Env: stateEnv[0]}
			if !aTurn {
				spec.Nexd, spec.Env = b, append(slices.Clone(stateEnv[1]), h.o.EnvB...)
			}
			n, d, err := h.readyNode(ctx, spec)
			if err != nil {
				r.Err = err.Error()
				return r, err
			}
			if err := h.stopNode(n); err != nil {
				r.Err = err.Error()
				return r, err
			}
			if aTurn {
				a = d
			} else {
				bd = d
			}
		}
		if i < 0 {
			continue
		}
		as, bs = append(as, a), append(bs, bd)
		ratios = append(ratios, float64(bd)/float64(a))
	}
	sa, sb := Summarize(as), Summarize(bs)
	slices.Sort(ratios)
	r.add("starts per side", float64(runs), "")
	r.ms("A exec to READY=1 p50", sa.P50)
	r.ms("B exec to READY=1 p50", sb.P50)
	r.add("B / A (p50)", float64(sb.P50)/float64(sa.P50), "×")
	r.add("B / A (median of the rounds' ratios)", ratios[len(ratios)/2], "×")
	r.notef("A: %s; B: %s %s", h.o.Nexd, b, strings.Join(h.o.EnvB, " "))
	if h.o.ReadyStateKV {
		r.notef("node state in KV, one node id a side, %d records of a type no nexlet runs in its bucket (stored as <type>_<id>; a start of each side first, not timed)", h.o.StateRecords)
	}
	return r, nil
}
