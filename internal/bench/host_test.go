package bench

import (
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The host's price of a page's first touch, which a process's start pays for every
// page of code, data and heap it uses (docs/performance-notes.md, Ready: on a PVM guest it is 10-30 µs,
// 100 times bare metal, and most of a Go process's start before main). Each reports
// ns/page over 4 MB of fresh anonymous memory.
func BenchmarkPageFirstTouch(b *testing.B) { benchFirstTouch(b, false) }

// BenchmarkPageFirstTouchPopulated: the same pages made by the kernel first
// (MADV_POPULATE_WRITE, not counted): what is left is the touch's own trap.
func BenchmarkPageFirstTouchPopulated(b *testing.B) { benchFirstTouch(b, true) }

func benchFirstTouch(b *testing.B, populate bool) {
	const pages = 1024
	page := unix.Getpagesize()
	var total time.Duration
	for b.Loop() {
		m, err := unix.Mmap(-1, 0, pages*page, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
		if err != nil {
			b.Fatal(err)
		}
		if populate {
			if err := unix.Madvise(m, unix.MADV_POPULATE_WRITE); err != nil {
				b.Skipf("MADV_POPULATE_WRITE: %v", err)
			}
		}
		t := time.Now()
		for i := 0; i < len(m); i += page {
			m[i] = 1
		}
		total += time.Since(t)
		if err := unix.Munmap(m); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(total.Nanoseconds())/float64(b.N*pages), "ns/page")
}
