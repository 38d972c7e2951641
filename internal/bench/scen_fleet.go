package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"time"
)

// fleet: three clustered nats-servers on loopback and nodes spread across them; auction
// latency and bid completeness at each fleet size, and `nexctl node list` at 10 nodes.
func (h *Harness) fleet(ctx context.Context) ([]Result, error) {
	if len(h.o.Servers) > 0 {
		return nil, errNoServers
	}
	servers, err := h.natsCluster(3)
	if err != nil {
		return nil, err
	}
	c, err := newClient(servers[0].URL(), h.o.Namespace)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	auctions := 200
	lists := 20
	if h.o.Quick {
		auctions, lists = 20, 5
	}
	var out []Result
	running := 0
	for _, size := range h.o.FleetSizes {
		if size > running {
			from := running
			if _, err := h.startNodes(ctx, size-running, func(i int) nodeSpec {
				return nodeSpec{Servers: []string{servers[(from+i)%len(servers)].URL()}, Name: fmt.Sprintf("fleet%d", from+i)}
			}); err != nil {
				return out, err
			}
			running = size
		}
		if err := waitBids(ctx, c, size); err != nil {
			return out, err
		}
		r := Result{Scenario: "fleet", Variant: fmt.Sprintf("%d node(s) on 3 clustered servers", size)}
		var early []time.Duration
		timedOut := 0
		for range auctions {
			t := time.Now()
			bids, err := c.auction(ctx, gatherOpts{first: 5 * time.Second, stall: 2 * time.Second, max: size})
			if err != nil {
				return append(out, r), err
			}
			early = append(early, time.Since(t))
			if len(bids) < size {
				timedOut++
			}
		}
		s := Summarize(early)
		r.ms("auction until all bids p50", s.P50)
		r.ms("auction until all bids p99", s.P99)
		if timedOut > 0 {
			r.add("auctions that ended without every bid", float64(timedOut), "")
		}
		var got int
		for range auctions {
			bids, err := c.auction(ctx, gatherOpts{first: 5 * time.Second, stall: h.o.Stall})
			if err != nil {
				return append(out, r), err
			}
			got += len(bids)
		}
		r.add(fmt.Sprintf("bid completeness, %s stall", h.o.Stall), 100*float64(got)/float64(auctions*size), "%")
		if size == 10 {
			if err := h.nodeList(ctx, &r, servers[0].URL(), size, lists); err != nil {
				r.notef("nexctl node list: %v", err)
			}
		}
		out = append(out, r)
		// Bids are reserved for the auction TTL; let them expire between sizes.
	}
	return out, nil
}

// nodeList times `nexctl node list --json` (exec included) and checks it saw every node.
func (h *Harness) nodeList(ctx context.Context, r *Result, url string, size, times int) error {
	if err := h.nodeListWith(ctx, r, url, size, times, ""); err != nil {
		return err
	}
	if err := h.nodeListWith(ctx, r, url, size, times, "10ms"); err != nil {
		return err
	}
	// The same scatter-gather in process, without exec and connect.
	c, err := newClient(url, h.o.Namespace)
	if err != nil {
		return err
	}
	defer c.Close()
	var in []time.Duration
	for range times * 5 {
		t := time.Now()
		if _, err := c.ping(ctx, gatherOpts{first: 5 * time.Second, stall: 100 * time.Millisecond}); err != nil {
			return err
		}
		in = append(in, time.Since(t))
	}
	r.ms("ping gather in process, 100 ms stall, p50", Summarize(in).P50)
	return nil
}

func (h *Harness) nodeListWith(ctx context.Context, r *Result, url string, size, times int, stall string) error {
	var ds []time.Duration
	short := 0
	args := []string{"node", "list", "--json", "--nats.servers", url}
	label := "nexctl node list"
	if stall != "" {
		args = append(args, "--gather-stall", stall)
		label += " --gather-stall " + stall
	}
	for range times {
		cmd := exec.CommandContext(ctx, h.o.Nexctl, args...)
		cmd.Env = childEnv()
		t := time.Now()
		outb, err := cmd.Output()
		d := time.Since(t)
		if err != nil {
			return fmt.Errorf("%s: %w", h.o.Nexctl, err)
		}
		var nodes []json.RawMessage
		if err := json.Unmarshal(outb, &nodes); err != nil {
			return fmt.Errorf("nexctl node list --json output: %w", err)
		}
		if len(nodes) < size {
			short++
		}
		ds = append(ds, d)
	}
	s := Summarize(ds)
	m := r.ms(label+" p50 (exec included)", s.P50)
	if stall == "" {
		m.atMost(50, "<= 50 ms")
	}
	r.ms(label+" max", s.Max)
	if short > 0 {
		r.add(label+": lists missing nodes", float64(short), "")
	}
	return nil
}
