package memtrim

import (
	"context"
	"runtime"
	"runtime/metrics"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nexd-project/nexd/internal/testkit"
)

var sink [][]byte

func released() uint64 {
	m := []metrics.Sample{{Name: "/memory/classes/heap/released:bytes"}}
	metrics.Read(m)
	return m[0].Value.Uint64()
}

// TestQuietProcessGivesMemoryBack: after a burst of allocations that are then dropped,
// a quiet process returns the memory to the system within a few ticks; the runtime
// alone would keep it until its next collection and scavenge it slowly.
func TestQuietProcessGivesMemoryBack(t *testing.T) {
	for range 64 {
		sink = append(sink, make([]byte, 256<<10)) // 16 MiB, live for now
	}
	sink = nil
	before := released()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { Run(ctx, Options{Tick: 50 * time.Millisecond, Interval: time.Millisecond}) })
	defer func() { cancel(); wg.Wait() }()
	testkit.EventuallyWithin(t, 10*time.Second, "the burst's 16 MiB released", func() bool {
		return released() >= before+12<<20
	})
}

// TestBusyProcessIsLeftAlone: while the process allocates more than Quiet each tick,
// no trim runs (a trim is a full collection). The test drives the ticks and allocates
// 512 KiB (twice Quiet) before each one, so every tick is busy whatever the load: with
// a real 20 ms ticker the allocating loop, off the CPU for two ticks at load 20, looked
// quiet and was trimmed. Everything else would trim at once (Interval 1 ms, the heap
// well above Min), so a trimmer that ignored a busy tick fails here.
func TestBusyProcessIsLeftAlone(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	tick, handled := make(chan time.Time), make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		Run(ctx, Options{Interval: time.Millisecond, tick: tick, ticked: func() { handled <- struct{}{} }})
	})
	var st runtime.MemStats
	runtime.ReadMemStats(&st)
	forced := st.NumForcedGC
	for range 20 {
		for range 8 {
			sink = append(sink[:0], make([]byte, 64<<10)) // a large object: counted at once
		}
		tick <- time.Now()
		<-handled
	}
	cancel()
	wg.Wait()
	runtime.ReadMemStats(&st)
	if st.NumForcedGC != forced {
		t.Errorf("%d trims while busy, want none", st.NumForcedGC-forced)
	}
}

// TestBurstSoonAfterATrimIsTrimmed: a second burst that comes right after a trim is
// trimmed once the process is quiet again, however long Interval is (here an hour): a
// burst of deploys soon after a trim kept its garbage and free pages until Interval
// had passed.
func TestBurstSoonAfterATrimIsTrimmed(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { Run(ctx, Options{Tick: 50 * time.Millisecond, Interval: time.Hour}) })
	defer func() { cancel(); wg.Wait() }()
	for burst := range 2 {
		for range 64 {
			sink = append(sink, make([]byte, 256<<10)) // 16 MiB, live for now
		}
		sink = nil
		before := released()
		testkit.EventuallyWithin(t, 10*time.Second, "burst "+strconv.Itoa(burst+1)+"'s 16 MiB released", func() bool {
			return released() >= before+12<<20
		})
	}
}

// TestTrickleWaitsForInterval: growth with no busy tick (allocations below Quiet a
// tick) is trimmed at most once an Interval.
func TestTrickleWaitsForInterval(t *testing.T) {
	var st runtime.MemStats
	runtime.ReadMemStats(&st)
	forced := st.NumForcedGC
	ctx, cancel := context.WithCancel(context.Background())
	tick, handled := make(chan time.Time), make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		Run(ctx, Options{Quiet: 64 << 20, Min: 1, Interval: time.Hour, tick: tick, ticked: func() { handled <- struct{}{} }})
	})
	// The test sends the ticks, so a loaded machine cannot skip or merge any.
	for range 25 {
		sink = append(sink, make([]byte, 64<<10)) // quiet by Quiet; the heap grows
		tick <- time.Now()
		<-handled
	}
	sink = nil
	cancel()
	wg.Wait()
	runtime.ReadMemStats(&st)
	if n := st.NumForcedGC - forced; n != 1 {
		t.Errorf("%d trims of a trickle within an Interval, want 1 (the first)", n)
	}
}
