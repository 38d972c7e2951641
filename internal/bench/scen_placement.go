package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"
)

// fleetUp starts count nodes on one external server and a client that sees all their
// bids; with --nats.servers it uses the nodes already there instead.
func (h *Harness) fleetUp(ctx context.Context, count int, stateKV bool) (*client, []*nodeProc, error) {
	if len(h.o.Servers) > 0 {
		c, err := newClient(h.o.Servers[0], h.o.Namespace)
		if err != nil {
			return nil, nil, err
		}
		return c, nil, nil
	}
	ns, err := h.natsServer()
	if err != nil {
		return nil, nil, err
	}
	nodes, err := h.startNodes(ctx, count, func(i int) nodeSpec {
		return nodeSpec{Servers: []string{ns.URL()}, StateKV: stateKV}
	})
	if err != nil {
		return nil, nil, err
	}
	c, err := newClient(ns.URL(), h.o.Namespace)
	if err != nil {
		return nil, nil, err
	}
	if err := waitBids(ctx, c, count); err != nil {
		c.Close()
		return nil, nil, err
	}
	return c, nodes, nil
}

// startNodes starts count nodes, a few at a time so the 2-core machine is not swamped,
// and waits for each to be READY.
func (h *Harness) startNodes(ctx context.Context, count int, spec func(i int) nodeSpec) ([]*nodeProc, error) {
	nodes := make([]*nodeProc, count)
	errs := make([]error, count)
	sem := make(chan struct{}, 4)
	var wg sync.WaitGroup
	for i := range count {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			nodes[i], _, errs[i] = h.readyNode(ctx, spec(i))
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return nodes, nil
}

// bidders counts the nodes that bid in the external fleet (--nats.servers).
func (h *Harness) bidders(ctx context.Context, c *client) int {
	bids, err := c.auction(ctx, gatherOpts{first: 2 * time.Second, stall: time.Second})
	if err != nil {
		return 0
	}
	return len(bids)
}

// placement: auction + deploy + process running, sequentially, on 1 and on N nodes,
// with an auction that returns once every node bid and with a fixed stall.
func (h *Harness) placement(ctx context.Context) ([]Result, error) {
	counts := []int{1, h.o.Nodes}
	if len(h.o.Servers) > 0 {
		counts = []int{0}
	}
	var out []Result
	for _, count := range counts {
		c, _, err := h.fleetUp(ctx, count, false)
		if err != nil {
			return out, err
		}
		if count == 0 {
			count = h.bidders(ctx, c)
			if count == 0 {
				c.Close()
				return out, errors.New("no node bids at --nats.servers")
			}
		}
		for _, early := range []bool{true, false} {
			r, err := h.placeMany(ctx, c, count, early)
			out = append(out, r)
			if err != nil {
				c.Close()
				return out, err
			}
		}
		c.Close()
		h.stopAllNodes()
	}
	return out, nil
}

func (h *Harness) placeMany(ctx context.Context, c *client, count int, early bool) (Result, error) {
	ao := gatherOpts{first: 5 * time.Second, stall: time.Second, max: count}
	mode := "early return"
	if !early {
		ao = gatherOpts{first: 5 * time.Second, stall: h.o.Stall}
		mode = fmt.Sprintf("fixed %s stall", h.o.Stall)
	}
	r := Result{Scenario: "placement", Variant: fmt.Sprintf("%d node(s), %s", count, mode)}
	uo := gatherOpts{first: 30 * time.Second, stall: 15 * time.Second, max: count} // every node answers; a stop may outlast a short stall
	w := h.workload()
	const warmup = 5
	var auc, dep, st, tot []time.Duration
	var samples []placement
	short := 0
	deadline := time.Now().Add(time.Duration(h.o.Placements+warmup) * 2 * time.Second)
	for i := range h.o.Placements + warmup {
		if ctx.Err() != nil || time.Now().After(deadline) {
			r.notef("stopped early after %d placements (time bound)", len(tot))
			break
		}
		p, err := c.place(ctx, ao, w, fmt.Sprintf("place-%d", i), time.Minute)
		if err != nil {
			return r, fmt.Errorf("placement %d: %w", i, err)
		}
		if err := c.undeploy(ctx, p.ID, uo); err != nil {
			return r, err
		}
		if i < warmup {
			continue
		}
		if p.Bids < count {
			short++
		}
		auc, dep, st, tot = append(auc, p.Auction), append(dep, p.Deploy), append(st, p.Start), append(tot, p.Total)
		samples = append(samples, p)
	}
	if err := h.writeSamples(r.Variant, samples); err != nil {
		return r, err
	}
	r.add("placements", float64(len(tot)), "")
	sTot := Summarize(tot)
	m := r.ms("total p50", sTot.P50)
	if count == 1 && early {
		m.atMost(5, "<= 5 ms")
	}
	r.ms("total p90", sTot.P90)
	r.ms("total p99", sTot.P99)
	for _, ph := range []struct {
		name string
		ds   []time.Duration
	}{{"auction", auc}, {"deploy request", dep}, {"process start", st}} {
		s := Summarize(ph.ds)
		r.ms(ph.name+" p50", s.P50)
		r.ms(ph.name+" p99", s.P99)
	}
	if short > 0 {
		r.add("auctions missing bids", float64(short), "")
	}
	r.notef("workload %q; process start = deploy reply to the workload's announcement (0 when it came first); each workload is stopped before the next placement", w.Kind)
	return r, nil
}

// writeSamples appends placements to --samples-out, one tab-separated line each.
func (h *Harness) writeSamples(variant string, ps []placement) error {
	if h.o.SamplesOut == "" || len(ps) == 0 {
		return nil
	}
	f, err := os.OpenFile(h.o.SamplesOut, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("samples: %w", err)
	}
	w := bufio.NewWriter(f)
	us := func(d time.Duration) float64 { return float64(d) / float64(time.Microsecond) }
	for _, p := range ps {
		fmt.Fprintf(w, "%s\t%d\t%.1f\t%.1f\t%.1f\t%.1f\n", variant, p.At.UnixNano(), us(p.Auction), us(p.Deploy), us(p.Start), us(p.Total))
	}
	if err := w.Flush(); err != nil {
		f.Close()
		return fmt.Errorf("samples %s: %w", h.o.SamplesOut, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("samples %s: %w", h.o.SamplesOut, err)
	}
	return nil
}
