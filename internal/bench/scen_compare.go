package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/nexd-project/nexd/protocol"
)

// cmpSide is one node kind of the comparison: a long-lived node on its own NATS server
// and a client on that server.
type cmpSide struct {
	name   string
	c      *client
	sample func() (rss, pss int64, threads int, err error)
}

// cmpFigure is one figure measured on both sides.
type cmpFigure struct {
	name, unit string
	up, nx     float64
}

// compare runs the same scenarios against an upstream `nex node up` and a nexd, each on
// its own loopback NATS server, alternating between them so that machine load hits
// both alike: exec to ready, deploy request, placement end to end, list, stop, idle
// memory, memory added per running workload, threads.
func (h *Harness) compare(ctx context.Context) ([]Result, error) {
	r := Result{Scenario: "compare", Variant: "upstream nex vs nexd, same machine, one run"}
	var figs, floor []cmpFigure
	err := h.compareInto(ctx, &r, &figs, &floor)
	for _, f := range figs {
		r.add(f.name+": upstream", f.up, f.unit)
		r.add(f.name+": nexd", f.nx, f.unit)
		if f.up > 0 {
			r.add(f.name+": nexd / upstream", f.nx/f.up, "×")
		}
	}
	// The floor's figures (nx holds the floor's): beside upstream's, as the ratio a
	// target's "× upstream" is read against.
	for _, f := range floor {
		r.add(f.name+": floor", f.nx, f.unit)
		if f.up > 0 {
			r.add(f.name+": floor / upstream", f.nx/f.up, "×")
		}
	}
	if err != nil {
		r.Err = err.Error()
	}
	return []Result{r}, nil
}

// compareInto measures into out and floorOut (kept when a later step fails) and notes
// into r. floorOut's figures hold upstream's in up and the floor's in nx.
func (h *Harness) compareInto(ctx context.Context, r *Result, out, floorOut *[]cmpFigure) error {
	if len(h.o.Servers) > 0 {
		return errNoServers
	}
	if h.o.Upstream == "" {
		return errors.New("compare needs --upstream-nex PATH (upstream's nex binary, built from synadia-io/nex)")
	}
	nsUp, err := h.natsServer()
	if err != nil {
		return err
	}
	nsNx, err := h.natsServer()
	if err != nil {
		return err
	}
	figs, floorFigs := *out, *floorOut
	defer func() { *out, *floorOut = figs, floorFigs }()

	// Exec to ready: a fresh node each time, upstream first in even runs.
	upReady, nxReady, err := h.alternateReady(ctx, nsUp.URL(), nsNx.URL(), "cmpready", h.o.ReadyStarts)
	if err != nil {
		return err
	}
	figs = append(figs, msFigure("exec → ready p50", Summarize(upReady).P50, Summarize(nxReady).P50))

	// Long-lived nodes for the rest, each from a private copy of its binary read afresh
	// (privateCopy), so that PSS counts the pages of each side whole.
	upBin, err := privateCopy(h.o.Upstream, filepath.Join(h.dir, "bin-upstream"))
	if err != nil {
		return err
	}
	nxBin, err := privateCopy(h.o.Nexd, filepath.Join(h.dir, "bin-nexd"))
	if err != nil {
		return err
	}
	up, err := startUpstream(upBin, filepath.Join(h.dir, "upstream-main"), "upstream-main", nsUp.URL())
	if err != nil {
		return err
	}
	defer func() { _ = up.stop(30 * time.Second) }()
	if _, err := up.waitReady(ctx, time.Minute); err != nil {
		return err
	}
	// Into the run's cgroup, with the workloads it forks from now on: they outlive
	// upstream's death, and a killed run's next run finds them there (reap.go).
	if err := adopt(h.runID, "upstream-main", up.Pid()); err != nil {
		return err
	}
	spec := nodeSpec{Name: "nexd-main", Servers: []string{nsNx.URL()}, Nexd: nxBin}
	runtime := "on the host's file systems (--runtime-on-host)"
	if !h.o.RuntimeOnHost && h.o.Self != "" && os.Geteuid() == 0 {
		spec.RuntimeTmpfs = h.o.Self
		runtime = "on tmpfs in a mount namespace of its own, as /run is on a systemd host (--runtime-on-host: the host's)"
	} else if !h.o.RuntimeOnHost {
		runtime = "on the host's file systems (tmpfs needs root)"
	}
	nx, _, err := h.readyNode(ctx, spec)
	if err != nil {
		return err
	}
	sides := [2]*cmpSide{{name: "upstream"}, {name: "nexd"}}
	sides[0].sample = func() (int64, int64, int, error) {
		rss, th, err := procStatus(up.Pid())
		if err != nil {
			return 0, 0, 0, err
		}
		pss, err := procPSS(up.Pid())
		return rss, pss, th, err
	}
	sides[1].sample = func() (int64, int64, int, error) {
		s, err := sampleNode(nx)
		return s.nexdRSS + s.nexletRSS, s.nexdPSS + s.nexletPSS, s.nexdThreads + s.nexletThreads, err
	}
	for i, url := range []string{nsUp.URL(), nsNx.URL()} {
		c, err := newClient(url, h.o.Namespace)
		if err != nil {
			return err
		}
		defer c.Close()
		if err := waitBids(ctx, c, 1); err != nil {
			return fmt.Errorf("%s: %w", sides[i].name, err)
		}
		sides[i].c = c
	}

	// sampleAll waits settle, then samples each side's RSS, PSS and threads.
	sampleAll := func() (m [2][3]float64, err error) {
		time.Sleep(settle)
		for i, s := range sides {
			rss, pss, th, err := s.sample()
			if err != nil {
				return m, fmt.Errorf("%s: %w", s.name, err)
			}
			m[i] = [3]float64{float64(rss), float64(pss), float64(th)}
		}
		return m, nil
	}

	// Idle memory, before any workload ran.
	idle, err := sampleAll()
	if err != nil {
		return err
	}
	figs = append(figs,
		cmpFigure{name: "idle RSS", unit: "MB", up: idle[0][0] / (1 << 20), nx: idle[1][0] / (1 << 20)},
		cmpFigure{name: "idle PSS", unit: "MB", up: idle[0][1] / (1 << 20), nx: idle[1][1] / (1 << 20)},
		cmpFigure{name: "idle threads", unit: "", up: idle[0][2], nx: idle[1][2]})

	// The floor (floor.go), a third side in the latency rounds: the least any node can
	// take to answer this client, on its own NATS server. It needs this tool's binary.
	var floor *cmpSide
	if h.o.Self != "" {
		nsFl, err := h.natsServer()
		if err != nil {
			return err
		}
		fl, err := startFloor(ctx, h.o.Self, nsFl.URL(), h.o.Namespace)
		if err != nil {
			return err
		}
		defer func() {
			if err := fl.stop(); err != nil {
				r.notef("floor: %v", err)
			}
		}()
		if err := adopt(h.runID, "floor", fl.cmd.Process.Pid); err != nil {
			return err
		}
		c, err := newClient(nsFl.URL(), h.o.Namespace)
		if err != nil {
			return err
		}
		defer c.Close()
		floor = &cmpSide{name: "floor", c: c}
	}

	// Latencies: two rounds, each side in turn, the order swapped between rounds.
	type lat struct{ auction, deploy, start, place, list, stop []time.Duration }
	var lats [3]lat
	var first [2]time.Duration // each side's first deploy request, the first work after idle
	w := workloadSpec{Kind: "sh"}
	for round := range 2 {
		for _, i := range turns(round, floor != nil) {
			s := floor
			if i < 2 {
				s = sides[i]
			}
			for k := range h.o.Placements + 5 {
				p, err := s.c.place(ctx, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1}, w, fmt.Sprintf("cmp%d-%d", round, k), time.Minute)
				if err != nil {
					return fmt.Errorf("%s: placement %d: %w", s.name, k, err)
				}
				t := time.Now()
				if err := s.c.list(ctx); err != nil {
					return fmt.Errorf("%s: list: %w", s.name, err)
				}
				if round == 0 && k == 0 && i < 2 {
					first[i] = p.Deploy
				}
				dl := time.Since(t)
				t = time.Now()
				if err := s.c.undeploy(ctx, p.ID, gatherOpts{first: 30 * time.Second, stall: time.Second, max: 1}); err != nil {
					return fmt.Errorf("%s: %w", s.name, err)
				}
				ds := time.Since(t)
				if k < 5 {
					continue // warm-up
				}
				l := &lats[i]
				l.deploy, l.place, l.list, l.stop = append(l.deploy, p.Deploy), append(l.place, p.Total), append(l.list, dl), append(l.stop, ds)
				l.auction, l.start = append(l.auction, p.Auction), append(l.start, p.Start)
			}
		}
	}
	figs = append(figs,
		msFigure("deploy request p50", Summarize(lats[0].deploy).P50, Summarize(lats[1].deploy).P50),
		msFigure("deploy request p99", Summarize(lats[0].deploy).P99, Summarize(lats[1].deploy).P99),
		msFigure("placement end to end p50", Summarize(lats[0].place).P50, Summarize(lats[1].place).P50),
		msFigure("placement end to end p99", Summarize(lats[0].place).P99, Summarize(lats[1].place).P99),
		msFigure("placement's auction p50", Summarize(lats[0].auction).P50, Summarize(lats[1].auction).P50),
		msFigure("placement's announcement after the reply p50", Summarize(lats[0].start).P50, Summarize(lats[1].start).P50),
		msFigure("list p50", Summarize(lats[0].list).P50, Summarize(lats[1].list).P50),
		msFigure("stop p50", Summarize(lats[0].stop).P50, Summarize(lats[1].stop).P50),
		msFigure("first deploy request (after idle)", first[0], first[1]))
	if floor != nil {
		for _, f := range []struct {
			name string
			d    []time.Duration
			up   []time.Duration
			p99  bool
		}{
			{"deploy request p50", lats[2].deploy, lats[0].deploy, false},
			{"placement end to end p50", lats[2].place, lats[0].place, false},
			{"placement end to end p99", lats[2].place, lats[0].place, true},
			{"placement's auction p50", lats[2].auction, lats[0].auction, false},
		} {
			fl, up := Summarize(f.d).P50, Summarize(f.up).P50
			if f.p99 {
				fl, up = Summarize(f.d).P99, Summarize(f.up).P99
			}
			floorFigs = append(floorFigs, cmpFigure{name: f.name, unit: "ms", up: float64(up) / float64(time.Millisecond), nx: float64(fl) / float64(time.Millisecond)})
		}
	}

	// Idle memory again, the workloads of the latency phases stopped: what a node that
	// has worked keeps, beside the fresh start's above.
	worked, err := sampleAll()
	if err != nil {
		return err
	}
	figs = append(figs,
		cmpFigure{name: "idle RSS after the latency phases", unit: "MB", up: worked[0][0] / (1 << 20), nx: worked[1][0] / (1 << 20)},
		cmpFigure{name: "idle PSS after the latency phases", unit: "MB", up: worked[0][1] / (1 << 20), nx: worked[1][1] / (1 << 20)})

	// Memory with workloads running: deploy up to each count on both, then sample. What
	// a workload adds is counted from the idle memory after the latency phases: from the
	// fresh start's, it would include the code and heap the first deploys bring in once
	// (nexd unmaps its start-up pages at READY, and they come back with the first deploys).
	running := 0
	for _, want := range h.o.CompareWorkloads {
		if want <= running {
			continue
		}
		for _, s := range sides {
			if _, _, err := deployN(ctx, s.c, w, 1, want-running, 8, fmt.Sprintf("cmpw%d", want)); err != nil {
				return fmt.Errorf("%s: %d workloads: %w", s.name, want, err)
			}
		}
		running = want
		per, err := sampleAll()
		if err != nil {
			return err
		}
		for i := range per {
			per[i][0] = (per[i][0] - worked[i][0]) / float64(running) / 1024
			per[i][1] = (per[i][1] - worked[i][1]) / float64(running) / 1024
		}
		figs = append(figs,
			cmpFigure{name: fmt.Sprintf("RSS added per workload, %d running", running), unit: "KB", up: per[0][0], nx: per[1][0]},
			cmpFigure{name: fmt.Sprintf("PSS added per workload, %d running", running), unit: "KB", up: per[0][1], nx: per[1][1]},
			cmpFigure{name: fmt.Sprintf("threads, %d running", running), up: per[0][2], nx: per[1][2]})
	}

	r.notef("each node on its own in-process NATS server on loopback; nexd's figures are nexd + its nexlet, upstream's its single process (its native agent runs inside it)")
	r.notef("workload: /bin/sh -c 'echo %s; exec sleep 86400', seen on the $NEX log feed; %d placements per side per round (after 5 warm-up), 2 rounds, order swapped", readyLine, h.o.Placements)
	r.notef("the measured nodes run private copies of both binaries, read afresh: no other process (another run, the exec → ready nodes) shares their pages, which would halve their PSS, and neither's text is mapped in the 2 MiB pages a fresh write leaves in the page cache (they count whole in RSS)")
	r.notef("idle memory twice: fresh (%s after ready), and again %s after the latency phases' last stop; memory added per workload counts from the second", settle, settle)
	r.notef("the measured nexd's runtime dir, /run/nex-workloads, /run/nex-dynamic-uid and /run/systemd/dynamic-uid are %s; its state dir is in the run's temp dir; the exec → ready nodes use the host's", runtime)
	if floor != nil {
		r.notef("floor: %s floor-node, on a NATS server of its own, in the latency rounds' turns: the same client, auction, deploy, list and stop, answered by a Go process that decodes, starts the process in a group of its own with stdout on a pipe, replies, and forwards the output lines to the log feed; no identity, signature, uid, cgroup, limits, record or nexlet. No node can be faster than it here with this client: a target below the floor is out of reach on this machine", filepath.Base(h.o.Self))
		if v := os.Getenv(floorVariantEnv); v != "" {
			r.notef("floor: with %s=%s, parts of nexd's path added to the floor (see floor_variants.go)", floorVariantEnv, v)
		}
	}
	r.notef("auction returns at the first bid; list and stop return at the first reply; exec → ready is READY=1 for nexd, the %q log line for upstream; %d starts each", upstreamReadyLog, h.o.ReadyStarts)
	return nil
}

// upstreamReady starts an upstream node, waits for its ready line and stops it.
func (h *Harness) upstreamReady(ctx context.Context, url string, i int) (time.Duration, error) {
	u, err := startUpstream(h.o.Upstream, filepath.Join(h.dir, fmt.Sprintf("upstream-ready%d", i)), fmt.Sprintf("upready%d", i), url)
	if err != nil {
		return 0, err
	}
	d, err := u.waitReady(ctx, time.Minute)
	serr := u.stop(30 * time.Second)
	if err != nil {
		return 0, err
	}
	return d, serr
}

// alternate says, for round i, whether upstream goes first (true) or second.
func alternate(i int) []bool {
	if i%2 == 0 {
		return []bool{true, false}
	}
	return []bool{false, true}
}

// turns gives round i's order of the sides (0 upstream, 1 nexd, 2 the floor when
// withFloor), reversed every other round so that each side goes first as often.
func turns(i int, withFloor bool) []int {
	t := []int{0, 1}
	if withFloor {
		t = append(t, 2)
	}
	if i%2 == 1 {
		slices.Reverse(t)
	}
	return t
}

func msFigure(name string, up, nx time.Duration) cmpFigure {
	return cmpFigure{name: name, unit: "ms", up: float64(up) / float64(time.Millisecond), nx: float64(nx) / float64(time.Millisecond)}
}

// list asks the namespace's nodes for their workloads and returns at the first answer
// (one node per server here).
func (c *client) list(ctx context.Context) error {
	data, _ := json.Marshal(protocol.AgentListWorkloadsRequest{Namespace: c.ns, Filter: []string{}})
	msgs, err := c.gather(ctx, protocol.WPingSubject(c.ns), data, gatherOpts{first: 5 * time.Second, stall: time.Second, max: 1})
	if err != nil {
		return err
	}
	if len(msgs) == 0 {
		return errors.New("no node answered the workload list")
	}
	return replyErr(msgs[0])
}
