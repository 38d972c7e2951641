package procid

import "testing"

// BenchmarkPgrpMembers is one listing of a process group: a walk of /proc reading each
// process's stat (what a workload's end costs without cgroups, sandbox.exiting).
func BenchmarkPgrpMembers(b *testing.B) {
	for b.Loop() {
		g := NewPgrp(ID{PID: 1 << 30})
		if _, err := g.Members(); err != nil {
			b.Fatal(err)
		}
	}
}
