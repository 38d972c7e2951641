package metrics

import (
	"bytes"
	"os"
	"runtime"
	rtmetrics "runtime/metrics"
	"strconv"
	"strings"
	"syscall"
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
	r.gaugeFunc("go_info", "Information about the Go environment.", "gauge", labels("version", runtime.Version()), func() float64 { return 1 })
	r.add("go_threads", "Number of OS threads created.", "gauge", func(add func(sample)) {
		if st, ok := readStat(); ok {
			add(sample{value: st.threads})
		}
	})
	r.add("process_cpu_seconds_total", "Total user and system CPU time spent in seconds.", "counter", func(add func(sample)) {
		if st, ok := readStat(); ok {
			add(sample{value: st.cpu})
		}
	})
	r.add("process_resident_memory_bytes", "Resident memory size in bytes.", "gauge", func(add func(sample)) {
		if st, ok := readStat(); ok {
			add(sample{value: st.rss})
		}
	})
	r.add("process_virtual_memory_bytes", "Virtual memory size in bytes.", "gauge", func(add func(sample)) {
		if st, ok := readStat(); ok {
			add(sample{value: st.vsize})
		}
	})
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
