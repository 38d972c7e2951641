// Package coldpages unmaps the resident pages of the executable's own read-only
// mappings (its code, read-only data and the runtime's pclntab) once start-up is over.
//
// Start-up runs code scattered over the whole binary (some 130 package inits, flag and
// config parsing, the first connections), and the kernel maps a read fault of a file
// page that is in the page cache together with its neighbours (fault-around, 64 KiB),
// so a quiet nexd keeps ~16 MB of its binary resident of which it no longer touches
// most. madvise(MADV_DONTNEED) on these mappings drops the page table entries only:
// the pages stay in the page cache, and a page the process runs or reads again comes
// back by a minor fault (no disk read unless the system evicted it meanwhile).
//
// Only mappings of /proc/self/exe that are not writable and hold no private page are
// touched: MADV_DONTNEED on a private page (a writable mapping's data, or a read-only
// one written before it was protected, such as a PIE binary's relocated .data.rel.ro)
// would discard its contents rather than unmap a copy of the file.
package coldpages

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Result says what Drop did.
type Result struct {
	Mappings int    // read-only mappings of the executable dropped
	Size     uint64 // their size in bytes
	Before   uint64 // their resident bytes before the drop
	After    uint64 // their resident bytes right after it (what the drop's own path faulted back)
	Kept     int    // read-only mappings of the executable kept because they hold private pages
}

// Drop unmaps the resident pages of the executable's read-only mappings and says what
// it did. It is safe to call at any time and more than once; the process keeps working,
// refaulting what it uses.
func Drop() (Result, error) {
	exe, err := os.Readlink("/proc/self/exe")
	if err != nil {
		return Result{}, fmt.Errorf("coldpages: %w", err)
	}
	regions, kept, err := readMaps(exe)
	if err != nil {
		return Result{}, err
	}
	r := Result{Kept: kept}
	for _, g := range regions {
		if _, _, errno := unix.Syscall(unix.SYS_MADVISE, g.start, g.end-g.start, unix.MADV_DONTNEED); errno != 0 {
			return r, fmt.Errorf("coldpages: madvise %x-%x: %w", g.start, g.end, errno)
		}
		r.Mappings++
		r.Size += uint64(g.end - g.start)
		r.Before += g.rss
	}
	after, _, err := readMaps(exe)
	if err != nil {
		return r, err
	}
	for _, g := range after {
		r.After += g.rss
	}
	return r, nil
}

// DropLogged drops (Drop) and logs what it did: at debug, or a warning if it failed.
// Sizes are in KiB, whole numbers in any log encoding.
func DropLogged(log *slog.Logger) {
	r, err := Drop()
	if err != nil {
		log.Warn("start-up pages not dropped", "err", err)
		return
	}
	log.Debug("start-up pages dropped", "mappings", r.Mappings, "resident_kib_before", r.Before>>10,
		"resident_kib_after", r.After>>10, "kept", r.Kept)
}

// region is one mapping Drop may drop.
type region struct {
	start, end uintptr
	rss        uint64 // resident bytes
}

func readMaps(exe string) ([]region, int, error) {
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return nil, 0, fmt.Errorf("coldpages: %w", err)
	}
	defer f.Close()
	regions, kept, err := pick(f, exe)
	if err != nil {
		return nil, 0, fmt.Errorf("coldpages: /proc/self/smaps: %w", err)
	}
	return regions, kept, nil
}

// pick returns the mappings of exe in smaps that are read-only and hold no private
// (anonymous, resident or swapped) page, and how many read-only ones it kept because they do. exe is
// /proc/self/exe's target, which ends in " (deleted)" as the mapping's path does once
// an upgrade replaced the file.
func pick(smaps io.Reader, exe string) ([]region, int, error) {
	var (
		out     []region
		kept    int
		cur     region
		ours    bool // cur is a read-only mapping of exe
		private bool // cur holds anonymous pages
	)
	flush := func() {
		switch {
		case !ours:
		case private:
			kept++
		default:
			out = append(out, cur)
		}
		ours, private = false, false
	}
	sc := bufio.NewScanner(smaps)
	for sc.Scan() {
		line := sc.Text()
		first, rest, _ := strings.Cut(line, " ")
		if strings.HasSuffix(first, ":") { // a field of the current mapping
			v, _ := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			switch first {
			case "Rss:":
				cur.rss = v << 10
			case "Anonymous:", "Swap:":
				// A written page swapped out counts under Swap, not Anonymous:
				// MADV_DONTNEED would discard it as well.
				private = private || v != 0
			}
			continue
		}
		flush()
		// start-end perms offset dev inode path
		fields := strings.Fields(rest)
		lo, hi, ok := strings.Cut(first, "-")
		if !ok || len(fields) < 4 {
			return nil, 0, fmt.Errorf("unexpected line %q", line)
		}
		perms := fields[0]
		path := afterFields(rest, 4) // everything after the inode, spaces included
		if path != exe || len(perms) < 4 || perms[0] != 'r' || perms[1] != '-' {
			continue
		}
		s, err1 := strconv.ParseUint(lo, 16, 64)
		e, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || e <= s {
			return nil, 0, fmt.Errorf("unexpected range %q", first)
		}
		cur, ours = region{start: uintptr(s), end: uintptr(e)}, true
	}
	flush()
	return out, kept, sc.Err()
}

// afterFields returns s after its first n space-separated fields and the spaces that
// follow them.
func afterFields(s string, n int) string {
	for range n {
		s = strings.TrimLeft(s, " ")
		i := strings.IndexByte(s, ' ')
		if i < 0 {
			return ""
		}
		s = s[i:]
	}
	return strings.TrimLeft(s, " ")
}
