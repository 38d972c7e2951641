package testkit

import (
	"fmt"
	"strings"
	"testing"
)

// A directory sync split by strace around another thread's calls still counts (seen
// in CI: two seeds written at once), and one started before the rename does not.
func TestSyncedAfterRenameJoinsSplitCalls(t *testing.T) {
	const path = "/d/node.seed"
	split := strings.Split(`26079 fsync(7</d/.seed-1> <unfinished ...>
26078 fsync(8</d/.seed-2>) = 0
26079 <... fsync resumed>)              = 0
26079 renameat(AT_FDCWD</x>, "/d/.seed-1", AT_FDCWD</x>, "/d/node.seed") = 0
26078 fsync(7</d> <unfinished ...>
26079 fsync(8</d> <unfinished ...>
26078 <... fsync resumed>)              = 0
26079 <... fsync resumed>)              = 0`, "\n")
	if !SyncedAfterRename(split, path) {
		t.Fatal("the split directory sync after the rename was not seen")
	}
	// Thread ids under five digits are padded (seen in CI: "4245  fsync(...").
	var padded []string
	for _, l := range split {
		tid, call, _ := strings.Cut(l, " ")
		padded = append(padded, fmt.Sprintf("%-5s %s", tid[1:], call))
	}
	if !SyncedAfterRename(padded, path) {
		t.Fatalf("the split directory sync after the rename was not seen with padded thread ids:\n%s", strings.Join(padded, "\n"))
	}
	early := strings.Split(`26079 fsync(8</d> <unfinished ...>
26079 <... fsync resumed>)              = 0
26079 renameat(AT_FDCWD</x>, "/d/.seed-1", AT_FDCWD</x>, "/d/node.seed") = 0`, "\n")
	if SyncedAfterRename(early, path) {
		t.Fatal("a directory sync before the rename was taken for one after it")
	}
}
