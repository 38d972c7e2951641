package metrics

import (
	"bytes"
	"os"
	"runtime"
	"runtime/debug"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// goMetric is one Go runtime metric served under client_golang's name for it.
type goMetric struct {
	name, help, typ string
	from            []string // runtime/metrics names, summed
}

// goMetrics are the Go collector's series dashboards use most, read from
// runtime/metrics (which stops no goroutine, unlike runtime.ReadMemStats).
var goMetrics = []goMetric{
	{"go_goroutines", "Number of goroutines that currently exist.", "gauge", []string{"/sched/goroutines:goroutines"}},
	{"go_sched_gomaxprocs_threads", "The current runtime.GOMAXPROCS setting.", "gauge", []string{"/sched/gomaxprocs:threads"}},
	{"go_memstats_alloc_bytes", "Number of bytes allocated in heap and currently in use.", "gauge", []string{"/memory/classes/heap/objects:bytes"}},
	{"go_memstats_heap_alloc_bytes", "Number of heap bytes allocated and currently in use.", "gauge", []string{"/memory/classes/heap/objects:bytes"}},
	{"go_memstats_alloc_bytes_total", "Total number of bytes allocated in heap until now, even if released already.", "counter", []string{"/gc/heap/allocs:bytes"}},
	{"go_memstats_mallocs_total", "Total number of heap objects allocated.", "counter", []string{"/gc/heap/allocs:objects", "/gc/heap/tiny/allocs:objects"}},
	{"go_memstats_frees_total", "Total number of heap objects freed.", "counter", []string{"/gc/heap/frees:objects", "/gc/heap/tiny/allocs:objects"}},
	{"go_memstats_heap_objects", "Number of currently allocated objects.", "gauge", []string{"/gc/heap/objects:objects"}},
	{"go_memstats_heap_inuse_bytes", "Number of heap bytes that are in use.", "gauge", []string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes"}},
	{"go_memstats_heap_idle_bytes", "Number of heap bytes waiting to be used.", "gauge", []string{"/memory/classes/heap/released:bytes", "/memory/classes/heap/free:bytes"}},
	{"go_memstats_heap_released_bytes", "Number of heap bytes released to OS.", "gauge", []string{"/memory/classes/heap/released:bytes"}},
	{"go_memstats_stack_inuse_bytes", "Number of bytes obtained from system for stack allocator in non-CGO environments.", "gauge", []string{"/memory/classes/heap/stacks:bytes"}},
	{"go_memstats_sys_bytes", "Number of bytes obtained from system.", "gauge", []string{"/memory/classes/total:bytes"}},
	{"go_memstats_next_gc_bytes", "Number of heap bytes when next garbage collection will take place.", "gauge", []string{"/gc/heap/goal:bytes"}},
	{"go_memstats_heap_sys_bytes", "Number of heap bytes obtained from system.", "gauge", []string{"/memory/classes/heap/objects:bytes", "/memory/classes/heap/unused:bytes", "/memory/classes/heap/released:bytes", "/memory/classes/heap/free:bytes"}},
	{"go_memstats_stack_sys_bytes", "Number of bytes obtained from system for stack allocator.", "gauge", []string{"/memory/classes/heap/stacks:bytes", "/memory/classes/os-stacks:bytes"}},
	{"go_memstats_mspan_inuse_bytes", "Number of bytes in use by mspan structures.", "gauge", []string{"/memory/classes/metadata/mspan/inuse:bytes"}},
	{"go_memstats_mspan_sys_bytes", "Number of bytes used for mspan structures obtained from system.", "gauge", []string{"/memory/classes/metadata/mspan/inuse:bytes", "/memory/classes/metadata/mspan/free:bytes"}},
	{"go_memstats_mcache_inuse_bytes", "Number of bytes in use by mcache structures.", "gauge", []string{"/memory/classes/metadata/mcache/inuse:bytes"}},
	{"go_memstats_mcache_sys_bytes", "Number of bytes used for mcache structures obtained from system.", "gauge", []string{"/memory/classes/metadata/mcache/inuse:bytes", "/memory/classes/metadata/mcache/free:bytes"}},
	{"go_memstats_buck_hash_sys_bytes", "Number of bytes used by the profiling bucket hash table.", "gauge", []string{"/memory/classes/profiling/buckets:bytes"}},
	{"go_memstats_gc_sys_bytes", "Number of bytes used for garbage collection system metadata.", "gauge", []string{"/memory/classes/metadata/other:bytes"}},
	{"go_memstats_other_sys_bytes", "Number of bytes used for other system allocations.", "gauge", []string{"/memory/classes/other:bytes"}},
	{"go_gc_cycles_total", "Count of completed GC cycles.", "counter", []string{"/gc/cycles/total:gc-cycles"}},
	{"go_gc_gogc_percent", "Heap size target percentage configured by the user, otherwise 100.", "gauge", []string{"/gc/gogc:percent"}},
	{"go_gc_gomemlimit_bytes", "Go runtime memory limit configured by the user, otherwise math.MaxInt64.", "gauge", []string{"/gc/gomemlimit:bytes"}},
}

// watchRuntime registers the Go runtime's and the process's metrics.
func (r *registry) watchRuntime() {
	for _, g := range goMetrics {
		r.gaugeFunc(g.name, g.help, g.typ, "", func() float64 {
			s := make([]rtmetrics.Sample, len(g.from))
			for i, n := range g.from {
				s[i].Name = n
			}
			rtmetrics.Read(s)
			var v float64
			for _, x := range s {
				switch x.Value.Kind() {
				case rtmetrics.KindUint64:
					v += float64(x.Value.Uint64())
				case rtmetrics.KindFloat64:
					v += x.Value.Float64()
				}
			}
			return v
		})
	}
	// The GC's pauses and its last run, as client_golang's Go collector served them
	// (from the runtime's GC statistics: no stop of the world).
	r.add("go_gc_duration_seconds", "A summary of the wall-time pause (stop-the-world) duration in garbage collection cycles.", "summary", func(add func(sample)) {
		s := debug.GCStats{PauseQuantiles: make([]time.Duration, 5)}
		debug.ReadGCStats(&s)
		for i, q := range []string{"0", "0.25", "0.5", "0.75", "1"} {
			add(sample{labels: labels("quantile", q), value: s.PauseQuantiles[i].Seconds()})
		}
		add(sample{suffix: "_sum", value: s.PauseTotal.Seconds()})
		add(sample{suffix: "_count", value: float64(s.NumGC)})
	})
	r.gaugeFunc("go_memstats_last_gc_time_seconds", "Number of seconds since 1970 of last garbage collection.", "gauge", "", func() float64 {
		var s debug.GCStats
		debug.ReadGCStats(&s)
		if s.LastGC.IsZero() {
			return 0
		}
		return float64(s.LastGC.UnixNano()) / 1e9
	})
	r.gaugeFunc("go_info", "Information about the Go environment.", "gauge", labels("version", runtime.Version()), func() float64 { return 1 })
	// Each from its own read of /proc/self/stat; none when it cannot be read.
	stat := func(name, help, typ string, of func(procStat) float64) {
		r.add(name, help, typ, func(add func(sample)) {
			if st, ok := readStat(); ok {
				add(sample{value: of(st)})
			}
		})
	}
	stat("go_threads", "Number of OS threads created.", "gauge", func(s procStat) float64 { return s.threads })
	stat("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter", func(s procStat) float64 { return s.cpu })
	stat("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", func(s procStat) float64 { return s.rss })
	stat("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", func(s procStat) float64 { return s.vsize })
	r.add("process_start_time_seconds", "Start time of the process since unix epoch in seconds.", "gauge", func(add func(sample)) {
		if st, ok := readStat(); ok && st.start > 0 {
			add(sample{value: st.start})
		}
	})
	r.add("process_open_fds", "Number of open file descriptors.", "gauge", func(add func(sample)) {
		if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
			add(sample{value: float64(len(ents))})
		}
	})
	r.add("process_virtual_memory_max_bytes", "Maximum amount of virtual memory available in bytes.", "gauge", func(add func(sample)) {
		var l syscall.Rlimit
		if syscall.Getrlimit(syscall.RLIMIT_AS, &l) == nil {
			add(sample{value: float64(l.Cur)})
		}
	})
	r.add("process_network_receive_bytes_total", "Number of bytes received by the process over the network.", "counter", func(add func(sample)) {
		if in, _, ok := netOctets(); ok {
			add(sample{value: in})
		}
	})
	r.add("process_network_transmit_bytes_total", "Number of bytes sent by the process over the network.", "counter", func(add func(sample)) {
		if _, out, ok := netOctets(); ok {
			add(sample{value: out})
		}
	})
	r.add("process_max_fds", "Maximum number of open file descriptors.", "gauge", func(add func(sample)) {
		var l syscall.Rlimit
		if syscall.Getrlimit(syscall.RLIMIT_NOFILE, &l) == nil {
			add(sample{value: float64(l.Cur)})
		}
	})
}

// procStat is what /proc/self/stat says of this process, in the units served.
type procStat struct{ threads, cpu, rss, vsize, start float64 }

// userHZ is the kernel's USER_HZ, which /proc counts CPU time in: 100 on Linux.
const userHZ = 100

func readStat() (procStat, bool) {
	b, err := os.ReadFile("/proc/self/stat")
	if err != nil {
		return procStat{}, false
	}
	// The command name may hold spaces; fields count from after its closing paren,
	// starting at field 3 (state).
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 22 {
		return procStat{}, false
	}
	num := func(field int) float64 { // field numbers as proc(5) gives them
		v, _ := strconv.ParseFloat(f[field-3], 64)
		return v
	}
	st := procStat{
		threads: num(20),
		cpu:     (num(14) + num(15)) / userHZ,
		vsize:   num(23),
		rss:     num(24) * float64(os.Getpagesize()),
	}
	if bt := bootTime(); bt > 0 {
		st.start = bt + num(22)/userHZ
	}
	return st, true
}

// netOctets is IpExt's InOctets and OutOctets in /proc/self/net/netstat (the process's
// network namespace), as client_golang's process collector served them.
func netOctets() (in, out float64, ok bool) {
	b, err := os.ReadFile("/proc/self/net/netstat")
	if err != nil {
		return 0, 0, false
	}
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, values := strings.Fields(lines[i]), strings.Fields(lines[i+1])
		if len(names) == 0 || names[0] != "IpExt:" || len(values) != len(names) || values[0] != "IpExt:" {
			continue
		}
		var gotIn, gotOut bool
		for j, n := range names {
			v, err := strconv.ParseFloat(values[j], 64)
			switch {
			case err != nil:
			case n == "InOctets":
				in, gotIn = v, true
			case n == "OutOctets":
				out, gotOut = v, true
			}
		}
		return in, out, gotIn && gotOut
	}
	return 0, 0, false
}

// bootTime is the btime line of /proc/stat: when the system booted, in seconds.
func bootTime() float64 {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "btime "); ok {
			t, _ := strconv.ParseFloat(strings.TrimSpace(v), 64)
			return t
		}
	}
	return 0
}
