package bench

import (
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strings"

	"github.com/nexd-project/nexd/internal/uidblock"
)

// A node whose runtime paths are on tmpfs of its own (runtimeTmpfs) leases its uids
// where no other nexlet sees them and holds systemd's uid locks where nobody else does:
// in the native nexlet's default range (61184-65519) it may lease a uid another
// nexlet on the host runs a workload as (a pooled uid not yet running, a start between
// its lease and its exec), and a release by either then SIGKILLs the other's workload
// (every process of the uid). Seen: a compare run's measured node killed a nexlet/native
// test's workload, and a test nexlet of that kind killed an e2e workload. So such a
// node gets a range of its own unless its arguments name one: a block of
// uidRangeSize uids from uidRangeBase (above the default range, the test kit's band
// and useradd's), reserved host-wide (uidblock) in uidRangeDir until the node exits;
// another nexbench run (or its tests) skips a held block.
const (
	uidRangeBase   = 3_500_000
	uidRangeSize   = 8192 // more than the default range's 4,336: compare's largest runs fit
	uidRangeBlocks = 256
	uidRangeDir    = "/run/nexbench-uids"
)

// ownUIDRange adds --workload-uid-range with a reserved block to args unless args set
// one; the returned file holds the reservation (nil when args had a range).
func ownUIDRange(args []string) ([]string, *os.File, error) {
	if slices.ContainsFunc(args, func(a string) bool { return strings.HasPrefix(a, "--workload-uid-range") }) {
		return args, nil, nil
	}
	band := uidblock.Band{Base: uidRangeBase, Size: uidRangeSize, Blocks: uidRangeBlocks, Dir: uidRangeDir}
	lo, f, err := band.Reserve(rand.IntN(uidRangeBlocks), nil)
	if err != nil {
		return nil, nil, fmt.Errorf("uid range of its own: %w", err)
	}
	return append(args, "--workload-uid-range", fmt.Sprintf("%d-%d", lo, lo+uidRangeSize-1)), f, nil
}
