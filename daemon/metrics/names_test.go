package metrics

import (
	"runtime"
	"testing"
)

// servedByClientGolang is every family an idle nexd served while it used client_golang
// (d648042; its Go and process collectors): dashboards and alerts are written against
// these names, so the exposition written here must keep each of them.
var servedByClientGolang = []string{
	"go_gc_duration_seconds", "go_gc_gogc_percent", "go_gc_gomemlimit_bytes", "go_goroutines", "go_info",
	"go_memstats_alloc_bytes", "go_memstats_alloc_bytes_total", "go_memstats_buck_hash_sys_bytes",
	"go_memstats_frees_total", "go_memstats_gc_sys_bytes", "go_memstats_heap_alloc_bytes",
	"go_memstats_heap_idle_bytes", "go_memstats_heap_inuse_bytes", "go_memstats_heap_objects",
	"go_memstats_heap_released_bytes", "go_memstats_heap_sys_bytes", "go_memstats_last_gc_time_seconds",
	"go_memstats_mallocs_total", "go_memstats_mcache_inuse_bytes", "go_memstats_mcache_sys_bytes",
	"go_memstats_mspan_inuse_bytes", "go_memstats_mspan_sys_bytes", "go_memstats_next_gc_bytes",
	"go_memstats_other_sys_bytes", "go_memstats_stack_inuse_bytes", "go_memstats_stack_sys_bytes",
	"go_memstats_sys_bytes", "go_sched_gomaxprocs_threads", "go_threads",
	"nexd_auction_seconds", "nexd_deploy_seconds", "nexd_state_errors_total",
	"nexd_state_workloads_removed_total", "nexd_state_workloads_stored_total",
	"process_cpu_seconds_total", "process_max_fds", "process_network_receive_bytes_total",
	"process_network_transmit_bytes_total", "process_open_fds", "process_resident_memory_bytes",
	"process_start_time_seconds", "process_virtual_memory_bytes", "process_virtual_memory_max_bytes",
}

// TestSameFamiliesAsClientGolang: no family client_golang served went missing.
func TestSameFamiliesAsClientGolang(t *testing.T) {
	runtime.GC() // a pause to summarise, a last GC time
	fams := scrape(t, New())
	for _, name := range servedByClientGolang {
		if fams[name] == nil {
			t.Errorf("%s is no longer served", name)
		}
	}
	gc := fams["go_gc_duration_seconds"]
	if gc == nil {
		return
	}
	s := gc.GetMetric()[0].GetSummary()
	if len(s.GetQuantile()) != 5 || s.GetSampleCount() == 0 {
		t.Errorf("go_gc_duration_seconds: %d quantiles, count %d; want 5 and at least one GC", len(s.GetQuantile()), s.GetSampleCount())
	}
	if v := fams["go_memstats_last_gc_time_seconds"].GetMetric()[0].GetGauge().GetValue(); v < 1e9 {
		t.Errorf("go_memstats_last_gc_time_seconds %g after a GC", v)
	}
}
