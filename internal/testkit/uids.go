package testkit

import (
	"bufio"
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/nexd-project/nexd/internal/uidblock"
)

// The band UIDs hands out: blocks of uidBlockSize from uidBase, far above useradd's
// ranges and outside the native nexlet's default workload_uid_range (61184-65519),
// where the e2e nodes and nexlets on the shared lease directory take theirs, above the
// fixed uids (2000xxx, 1061xxx) tests of earlier commits used, which a run of an older
// checkout beside this one may still take, and below nexbench's (3,500,000 on).
const (
	uidBase      = 2_200_000
	uidBlockSize = 1024
	uidBlocks    = 1024
)

// UIDs reserves n (1-1024) consecutive uids, unused by any process or host user, for t
// until it ends, and returns the first. For a test that runs a native nexlet (or its
// users) with a lease directory of its own: such a nexlet kills, at a release, every
// process running as the uid it releases, so a uid given to two tests at once (a fixed
// one, two packages' tests, or two runs of one package at the same time on one host:
// go test runs packages in parallel, CI beside a developer's run) let one's release
// SIGKILL the other's workload. The reservation is a flock on a file per block in a
// host-wide directory (/run/nexd-test-uids as root), held by the test process: another
// test process, of any run, skips the block, and a killed run's blocks are free again
// once it is gone (a block where a process still runs as one of its uids is skipped;
// in a pid namespace of its own, InPidNamespace's, only the namespace's are seen).
func UIDs(t testing.TB, n int) uint32 {
	t.Helper()
	if n < 1 || n > uidBlockSize {
		t.Fatalf("testkit.UIDs(%d): between 1 and %d uids", n, uidBlockSize)
	}
	dir := filepath.Join(os.TempDir(), "nexd-test-uids-"+strconv.Itoa(os.Geteuid()))
	if os.Geteuid() == 0 {
		dir = "/run/nexd-test-uids"
	}
	return uidsFrom(t, dir, rand.IntN(uidBlocks))
}

// uidsFrom is UIDs with the lock directory and the first block tried given.
func uidsFrom(t testing.TB, dir string, start int) uint32 {
	t.Helper()
	hostIDs := hostIDsIn("/etc/passwd", "/etc/group")
	band := uidblock.Band{Base: uidBase, Size: uidBlockSize, Blocks: uidBlocks, Dir: dir}
	lo, f, err := band.Reserve(start, func(lo int) bool { return blockUsed(uint32(lo), hostIDs) })
	if err != nil {
		t.Fatalf("testkit.UIDs: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return uint32(lo)
}

// blockUsed: a host user or group, or a process (a killed run's leftover, which a
// release would kill and whose files a test could meet), has a uid of lo's block.
func blockUsed(lo uint32, hostIDs map[uint32]bool) bool {
	in := func(v uint32) bool { return v >= lo && v < lo+uidBlockSize }
	for v := range hostIDs {
		if in(v) {
			return true
		}
	}
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return true
	}
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		for _, v := range procIDs(filepath.Join("/proc", e.Name(), "status")) {
			if in(v) {
				return true
			}
		}
	}
	return false
}

// procIDs are the uids and gids (real, effective, saved, filesystem) of a process's
// status file; none when it is gone.
func procIDs(status string) []uint32 {
	b, err := os.ReadFile(status)
	if err != nil {
		return nil
	}
	var out []uint32
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "Uid:") && !strings.HasPrefix(line, "Gid:") {
			continue
		}
		for _, f := range strings.Fields(line)[1:] {
			if v, err := strconv.ParseUint(f, 10, 32); err == nil {
				out = append(out, uint32(v))
			}
		}
	}
	return out
}

// hostIDsIn reads the ids (third field) of passwd- and group-format files.
func hostIDsIn(files ...string) map[uint32]bool {
	ids := map[uint32]bool{}
	for _, name := range files {
		b, err := os.ReadFile(name)
		if err != nil {
			continue
		}
		for line := range strings.SplitSeq(string(b), "\n") {
			f := strings.Split(line, ":")
			if len(f) < 3 {
				continue
			}
			if v, err := strconv.ParseUint(f[2], 10, 32); err == nil {
				ids[uint32(v)] = true
			}
		}
	}
	return ids
}
