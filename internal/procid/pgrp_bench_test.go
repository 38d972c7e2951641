package procid

import "testing"

// BenchmarkPgrpMembers is one listing of a process group (what a workload's end costs
// without cgroups, sandbox.exiting): a walk of /proc, getpgid of each process, the stat
// of the group's. Reading each process's stat instead took 1-4 ms on this host (240
// processes), 30-40 times as long.
func BenchmarkPgrpMembers(b *testing.B) {
	for b.Loop() {
		g := NewPgrp(ID{PID: 1 << 30})
		if _, err := g.Members(); err != nil {
			b.Fatal(err)
		}
	}
}
