package bench

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// nodeUIDRangeStart is the first uid of the --workload-uid-range nexd pid runs with
// (0: none).
func nodeUIDRangeStart(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		t.Fatal(err)
	}
	args := strings.Split(string(b), "\x00")
	i := slices.Index(args, "--workload-uid-range")
	if i < 0 || i+1 >= len(args) {
		return 0
	}
	lo, _, _ := strings.Cut(args[i+1], "-")
	n, _ := strconv.Atoi(lo)
	return n
}

// TestOwnUIDRange: a node on tmpfs of its own gets a uid range above the default one
// (61184-65519) that no other holder of a reservation gets until it is given back, and
// a range its arguments name is kept.
func TestOwnUIDRange(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("the reservations live in /run (root)")
	}
	given := []string{"--state-dir", "x", "--workload-uid-range=100000-199999"}
	if got, f, err := ownUIDRange(given); err != nil || f != nil || !slices.Equal(got, given) {
		t.Fatalf("with a range given: %v, %v, %v", got, f, err)
	}
	rangeOf := func(args []string) (lo, hi int) {
		t.Helper()
		if len(args) < 2 || args[len(args)-2] != "--workload-uid-range" {
			t.Fatalf("no range added: %v", args)
		}
		a, b, _ := strings.Cut(args[len(args)-1], "-")
		lo, _ = strconv.Atoi(a)
		hi, _ = strconv.Atoi(b)
		return lo, hi
	}
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	seen := map[int]bool{}
	for range 8 {
		args, f, err := ownUIDRange([]string{"--state-dir", "x"})
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, f)
		lo, hi := rangeOf(args)
		if lo <= 65519 || hi-lo+1 != uidRangeSize || seen[lo] {
			t.Fatalf("range %d-%d: want %d uids above 65519, none held by another", lo, hi, uidRangeSize)
		}
		seen[lo] = true
	}
}
