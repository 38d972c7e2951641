// Package memtrim gives memory the Go runtime holds but no longer uses back to the
// system once the process has gone quiet: after start-up, and after a burst (many
// deploys, a listing of thousands of workloads). Without it the heap stays sized for
// the burst until the next collection, which a quiet daemon may not run for two
// minutes, and the runtime's background scavenger returns the free pages slowly.
package memtrim

import (
	"context"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Options tunes the trimmer; the zero value takes the defaults.
type Options struct {
	Tick     time.Duration // how often the allocation rate is looked at (1 s)
	Quiet    uint64        // bytes allocated per Tick below which the process is quiet (256 KiB)
	Ticks    int           // quiet ticks in a row before a trim (2)
	Min      uint64        // least growth of the heap since the last trim worth a new one (256 KiB)
	Interval time.Duration // least time between two trims with no busy tick between them (10 s)

	// Tests drive the ticks: tick, when set, replaces the ticker, and ticked, when set,
	// is called once each tick has been handled, so a test knows the sample was taken.
	tick   <-chan time.Time
	ticked func()
}

func (o *Options) defaults() {
	if o.Tick <= 0 {
		o.Tick = time.Second
	}
	if o.Quiet == 0 {
		o.Quiet = 256 << 10
	}
	if o.Ticks <= 0 {
		o.Ticks = 2
	}
	if o.Min == 0 {
		o.Min = 256 << 10
	}
	if o.Interval <= 0 {
		o.Interval = 10 * time.Second
	}
}

// Run trims until ctx ends. A trim is a full collection and a return of every free
// page (debug.FreeOSMemory): it runs only once the process has allocated little for
// Ticks ticks, its heap (objects, whether still live or not, and free pages not yet
// returned) grew by at least Min since the last trim (or start), and either it was busy
// (a tick not quiet) since the last trim or that trim is Interval old, so a busy or
// already lean process is left alone. The end of a burst (deploys, a large listing) is
// trimmed Ticks ticks after it whenever the last trim was: held back by Interval, a burst
// that came soon after a trim kept its garbage and free pages for up to Interval (10 s),
// about 1 MB a process after 100 deploys. Interval bounds only trims of a heap that grew
// by trickles, with no busy tick, of which a process could otherwise trim every few ticks.
func Run(ctx context.Context, o Options) {
	o.defaults()
	tick := o.tick
	if tick == nil {
		t := time.NewTicker(o.Tick)
		defer t.Stop()
		tick = t.C
	}
	var last time.Time
	var base uint64 // the heap right after the last trim
	busy := false   // a tick since the last trim was not quiet
	prev, quiet := read().allocs, 0
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		}
		s := read()
		if s.allocs-prev < o.Quiet {
			quiet++
		} else {
			quiet, busy = 0, true
		}
		prev = s.allocs
		if quiet >= o.Ticks && s.heap() >= base+o.Min && (busy || time.Since(last) >= o.Interval) {
			debug.FreeOSMemory()
			last, busy = time.Now(), false
			after := read()
			prev, base = after.allocs, after.heap()
		}
		if o.ticked != nil {
			o.ticked()
		}
	}
}

type sample struct{ allocs, free, objects, unused uint64 }

// heap is what the heap holds of the system's memory: its objects (live or garbage not
// yet collected), the unused parts of its spans and its free pages not yet returned.
func (s sample) heap() uint64 { return s.objects + s.unused + s.free }

func read() sample {
	m := []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
	}
	metrics.Read(m)
	v := func(i int) uint64 {
		if m[i].Value.Kind() == metrics.KindUint64 {
			return m[i].Value.Uint64()
		}
		return 0
	}
	return sample{allocs: v(0), free: v(1), objects: v(2), unused: v(3)}
}
